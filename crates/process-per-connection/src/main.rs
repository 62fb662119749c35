//! # process-per-connection: a master forks a child for each connection (PostgreSQL, inetd)
//!
//! The master binds the listening socket and accepts. For each connection it forks a child
//! process that serves that one connection, from its first byte to its close, with plain
//! blocking `read` and `write` calls, then exits. The master serves nothing: it accepts, forks,
//! closes its own copy of the connection, and reaps children as they exit. PostgreSQL's
//! postmaster (a backend process per client session), inetd and systemd's `Accept=yes`
//! sockets (a server process per connection), sshd (a child per login) and NCSA httpd, before
//! Apache preforked, all serve this way.
//!
//! ```text
//!                 ┌──────── master (one thread; accepts, forks, reaps; serves nothing) ───────┐
//!   clients ─TCP─▶│ socket+bind+listen ─▶ fd 3: accept ─▶ fork ─▶ close the master's copy     │
//!   (at the bound │ signals, SIGCHLD ─▶ flags + self-pipe ─▶ waitpid(WNOHANG): reap, free slot │
//!   they wait in  │ mmap(MAP_SHARED): /stats, stop   jobs process: fork at start, respawn     │
//!   the backlog)  └──────┬────────────────────────┬────────────────────────┬─────────────────┘
//!            fork at     │      fork per          │                        │
//!            start       ▼      connection        ▼                        ▼
//!                ┌─ jobs (slot 0) ──┐     ┌─ conn-1 (slot 1) ─┐    ┌─ conn-N (slot N) ─┐
//!                │ job-0, job-1 ... │     │ one socket:       │    │ one socket:       │
//!                │ runs every job   │     │ read ▸ handle ▸   │    │ blocked in read,  │
//!                │ the conns accept │     │ write, until it   │    │ idle between      │
//!                │                  │     │ closes; exit 0    │    │ requests          │
//!                └────────▲─────────┘     └─────────┬─────────┘    └───────────────────┘
//!                         └──── the journal (files + a shared mapping, opened before any
//!                               fork): POST /jobs appends a job owned by the jobs process,
//!                               which adopts it when the log moves
//! ```
//!
//! Who owns what. The master opens everything that must be shared before its first fork: the
//! listening socket, the `/stats` counters and a stop flag in anonymous shared mappings, and
//! the app (its journal, and the journal's own mapping). It starts no thread, ever, because
//! fork copies only the calling thread. A child inherits all of that, drops the listening
//! socket and the master's signal handlers, and starts its own threads (the journal watcher
//! and the committer) after the fork.
//!
//! Jobs. A child lives only as long as its connection, so it must not run jobs. As the
//! postmaster forks background workers, the master forks one `jobs` process at start (and again
//! if it dies), which runs the app's job workers; every connection child hands the jobs it
//! accepts to it (`JobRole::HandTo`). A held request (long poll, Server-Sent Events) is held by
//! its child, woken through the journal's futex like any blocking driver.
//!
//! The bound. At most `--max-children` (or `--max-conns`, if lower) connection children live
//! at once. At the bound the master stops calling accept(2): new connections complete their
//! handshake in the kernel and wait in the listen queue until a child exits.
//!
//! Signals to the master: SIGTERM or SIGINT, graceful (the master closes the listening socket,
//! raises the stop flag and wakes every child's journal watcher, so each child finishes the
//! request in flight and exits; the master exits 0 after the last one and SIGKILLs stragglers
//! `--shutdown-timeout` + 1 s after the stop); SIGQUIT, or a second SIGINT, fast (every child is
//! killed at once). The children ignore SIGINT and SIGQUIT (Ctrl-C reaches the whole process
//! group), and SIGTERM ends one child at once, with its connection. A child that dies, however,
//! takes down only its own connection: the master logs it and frees its slot.
//!
//! Trade-offs: the strongest isolation there is (a crash, a leak or a corrupted heap dies with
//! one connection; a child can drop privileges or `chroot` for one client, as sshd does) and
//! the simplest serving code (blocking calls, one client). The cost is a fork, copy-on-write
//! page faults and a process exit per connection, plus the child's threads, on every connection
//! (see docs/process-per-connection.md for the measurements against prefork and nginx), and a
//! process for every open connection, idle keep-alive ones included: the bound is on
//! connections, so `--max-children` idle clients lock everyone else out until
//! `--idle-timeout` closes them. That is why PostgreSQL deployments put a pooler (PgBouncer) in
//! front, and why Apache moved to preforking, then to threads.
//!
//! The code: this file holds the flags and start-up; `master.rs` the master's life (accept,
//! fork, reap, the jobs process, stop) and its signals; `child.rs` the lives of a connection
//! child and of the jobs process; `shared.rs` the counters and the stop flag in shared memory.
//!
//! Run: `cargo run --release -p process-per-connection -- --addr 127.0.0.1:8080`
//! then `ps -o pid,ppid,nlwp,comm -g $(pgrep -o process-per-c)` shows the master, the `jobs`
//! process and a `conn-N` process for each open connection.

mod child;
mod master;
mod shared;

use std::io;
use std::sync::Arc;

use clap::Parser;
use nix::unistd::Pid;
use runtime::{App, ServeConfig, ServerArgs};

use crate::child::Setup;
use crate::master::Master;

const PATTERN: &str = "process-per-connection";

/// A child's exit code meaning "I cannot start": a connection child that exits with it lost
/// its connection; a jobs process that exits with it stops the server (exit code 2 too), since
/// a server that accepts jobs nobody runs is worse than none. 101 (or SIGABRT in release
/// builds) is a panic.
const EXIT_FATAL: i32 = 2;

#[derive(Parser, Debug)]
#[command(name = PATTERN, about = "A master accepts and forks a child process for each connection (PostgreSQL, inetd).")]
struct Args {
    #[command(flatten)]
    server: ServerArgs,

    /// Connection children alive at once at most (or --max-conns, if lower); past it, new
    /// connections wait in the accept queue. `/stats` lists a slot for each. (--workers is
    /// not used: the children are made per connection.)
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=65535))]
    max_children: u32,
}

fn main() -> io::Result<()> {
    let args: Args = runtime::cli::parse();
    let max_children = (args.max_children as usize).min(args.server.max_conns);

    let listener = runtime::listener::bind(&args.server, false)?;
    let addr = listener.local_addr()?;
    // The accepted sockets are blocking (accept does not copy O_NONBLOCK): the children's
    // driver wants that. The listener stays non-blocking: the master polls it.
    let stats = Arc::new(shared::stats(max_children)?);
    // The journal is opened (and recovered) here, once, before any fork: the children inherit
    // it, its shared mapping and its directory lock. Its threads start in each child.
    let app = App::open(PATTERN, stats.clone(), &args.server.app).unwrap_or_else(|e| {
        eprintln!("{PATTERN}: {e}");
        std::process::exit(1)
    });
    // What every child would otherwise do again is done here once, and inherited: the CPU
    // feature detection behind memchr and crc32c is a run of cpuid instructions, each a trap
    // to the hypervisor in a VM (measured: ~10% of a child's CPU when each child did it).
    #[cfg(target_arch = "x86_64")]
    let _ = std::arch::is_x86_feature_detected!("avx2");
    let setup = Setup {
        config: ServeConfig::new(PATTERN, &args.server),
        app,
        master: Pid::this(),
        stop: shared::StopFlag::new()?,
        caught_up: 0,
    };

    let mut master = Master::new(listener, setup, stats, args.server.shutdown_timeout)?;
    if let Err(e) = master.start() {
        eprintln!("{PATTERN}: {e}");
        std::process::exit(EXIT_FATAL);
    }
    runtime::announce(PATTERN, addr, max_children);
    std::process::exit(master.supervise())
}
