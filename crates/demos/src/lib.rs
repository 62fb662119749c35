//! The demos of `scripts/demo.sh`, which make the kernel's side of serving visible: the accept
//! queue, the SYN queue, socket buffers, Nagle's algorithm, SO_REUSEPORT's spread, the
//! thundering herd, copy-on-write snapshots, and how many workers are too many; two of
//! PostgreSQL's durability trade-offs: asynchronous commit against a crash, and synchronous
//! against asynchronous replication; a cut upload, resumed with tus or sent again; and the
//! anatomy of one request, from the client, the server's `--trace` and the wire. Each one has
//! a page, `docs/demo-NAME.md` ([`page`]).
//!
//! This crate holds no code of its own beyond this list: `tests/demos.rs` runs every demo's
//! quick path (`scripts/demo.sh --quick NAME`) and checks that it reaches its verdict line, so
//! that `cargo test --workspace` keeps the demos working.

/// The demos, in the order `scripts/demo.sh` lists them.
pub const DEMOS: [&str; 12] = [
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
    "upload",
    "anatomy",
];

/// A demo's page, relative to the workspace: `docs/demo-NAME.md`, except upload's, which is
/// the page on uploads as a whole (`docs/upload.md`).
pub fn page(name: &str) -> String {
    match name {
        "upload" => "docs/upload.md".to_string(),
        _ => format!("docs/demo-{name}.md"),
    }
}
