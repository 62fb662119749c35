//! The demos of `scripts/demo.sh`, which make the kernel's side of serving visible: the accept
//! queue, the SYN queue, socket buffers, Nagle's algorithm, SO_REUSEPORT's spread, the
//! thundering herd, copy-on-write snapshots, and how many workers are too many; and two of
//! PostgreSQL's durability trade-offs: asynchronous commit against a crash, and synchronous
//! against asynchronous replication; and the anatomy of one request, from the client, the
//! server's `--trace` and the wire. Each one has a page, `docs/demo-NAME.md`.
//!
//! This crate holds no code of its own beyond this list: `tests/demos.rs` runs every demo's
//! quick path (`scripts/demo.sh --quick NAME`) and checks that it reaches its verdict line, so
//! that `cargo test --workspace` keeps the demos working.

/// The demos, in the order `scripts/demo.sh` lists them.
pub const DEMOS: [&str; 11] = [
    "backlog",
    "syn-queue",
    "buffers",
    "nagle",
    "reuseport",
    "herd",
    "cow",
    "workers",
    "commit",
    "replication",
    "anatomy",
];
