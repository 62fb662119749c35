//! # prefork: a master process and N forked workers (nginx, Apache prefork, PostgreSQL)
//!
//! The master binds the listening socket, then forks N worker processes that inherit it and all
//! accept from its one queue. The master serves nothing: it supervises. Its signal handlers only
//! set flags; its loop sleeps, reaps dead workers and forks replacements into the same slots.
//! Workers share no memory with each other, only a small shared mapping of counters, so a crash
//! takes down one worker's connections and nothing else. nginx (`--mode event`: an epoll loop per
//! worker), Apache's prefork MPM (`--mode blocking`: one connection at a time), PostgreSQL's
//! postmaster and gunicorn all run this way.
//!
//! ```text
//!                   ┌────────── master (one thread; serves nothing) ──────────┐
//!                   │ socket+bind+listen ─▶ fd 3      mmap(MAP_SHARED): slots  │
//!                   │ signals ─▶ flags + self-pipe    loop: poll, waitpid,     │
//!                   │                                 respawn, restart, stop   │
//!                   └──────┬───────────────────┬───────────────────┬───────────┘
//!        fork: the child   │                   │                   │
//!        inherits fd 3 and │                   │                   │
//!        the mapping       ▼                   ▼                   ▼
//!                  ┌── worker-0 ───┐   ┌── worker-1 ───┐   ┌── worker-2 ───┐
//!   clients ─TCP─▶ │ accept(fd 3)  │   │ accept(fd 3)  │   │ accept(fd 3)  │ ◀─ one accept
//!                  │ its own epoll │   │ its own epoll │   │ its own epoll │    queue, in
//!                  │ (or blocking) │   │ (or blocking) │   │ (or blocking) │    the kernel
//!                  │ writes slot 0 │   │ writes slot 1 │   │ writes slot 2 │
//!                  └───────────────┘   └───────────────┘   └───────────────┘
//!   GET /stats, answered by any worker, reads every slot: every worker's pid and counts.
//! ```
//!
//! Who owns what. The master creates the listening socket and the shared mapping before the
//! first fork and keeps both (a respawned worker inherits them again); it creates no thread and
//! no poll, because fork copies only the calling thread. A worker inherits fd 3 (the same
//! socket, not a copy: one accept queue, and one O_NONBLOCK flag for all), the mapping (it
//! writes only its own slot), and the master's signal handlers, which it drops at once for its
//! own. Everything else, its epoll, connections and threads, it creates after the fork.
//!
//! Signals to the master: SIGTERM or SIGINT, graceful (workers stop accepting, finish what is in
//! flight and exit; the master exits 0 after them and SIGKILLs stragglers after
//! `--shutdown-timeout`); SIGQUIT, or a second SIGINT, fast (workers are killed at once);
//! SIGHUP, a rolling restart (each worker is replaced by a new one that starts before the old
//! one is told to stop, so someone is always accepting and the socket never closes). A worker
//! that exits with [`EXIT_FATAL`] (2, as in nginx) cannot start and is not respawned; any other
//! death is respawned, with a back-off for workers that die young.
//!
//! Trade-offs: isolation (a crash or a leak kills one worker; a rolling restart replaces code
//! paths without dropping the socket) for memory (a process each) and for sharing (no shared
//! cache or connection pool without shared memory or IPC). In event mode every worker's epoll
//! wakes for each new connection (the herd: `wasted_wakeups` in `/stats`); blocking accept(2)
//! wakes one sleeper, but a blocking worker serves one connection at a time, so keep-alive
//! clients need as many workers as connections.
//!
//! The code: this file holds the flags and start-up; `master.rs` the master's life (fork, reap,
//! respawn, rolling restart, stop) and its signals; `worker.rs` a worker's life and its two
//! modes; `shared.rs` the counters in shared memory.
//!
//! Run: `cargo run --release -p prefork -- --addr 127.0.0.1:8080 --workers 4 [--mode blocking]`
//! then `ps -o pid,ppid,comm -g $(pgrep -o prefork)` shows the master and `worker-N` processes.

mod master;
mod shared;
mod worker;

use std::io;
use std::sync::Arc;

use clap::{Parser, ValueEnum};
use runtime::{App, ServeConfig, ServerArgs};

use crate::master::Master;
use crate::worker::WorkerSetup;

const PATTERN: &str = "prefork";

/// A worker's exit code meaning "I cannot start, and would fail the same way again": the
/// master does not respawn it (nginx's workers exit 2 for this). Workers exit 2 when they
/// cannot set up their loop or signal handling; 1 on a later error; 101 (or SIGABRT in release
/// builds) on a panic.
const EXIT_FATAL: i32 = 2;

#[derive(Parser, Debug)]
#[command(name = PATTERN, about = "A master binds and supervises N forked worker processes (nginx, Apache prefork).")]
struct Args {
    #[command(flatten)]
    server: ServerArgs,

    /// How each worker process serves: `event` (nginx: one epoll loop, many connections) or
    /// `blocking` (Apache prefork: one connection at a time).
    #[arg(long, value_enum, default_value = "event")]
    mode: Mode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Event,
    Blocking,
}

fn main() -> io::Result<()> {
    let args: Args = runtime::cli::parse();
    let workers = args.server.workers();

    let listener = runtime::listener::bind(&args.server, false)?;
    let addr = listener.local_addr()?;
    if args.mode == Mode::Blocking {
        worker::accept_blocking_with_tick(&listener)?;
    }
    let stats = Arc::new(shared::stats(workers)?);
    let config = ServeConfig::new(PATTERN, &args.server);
    // The journal is opened (and recovered) here, once, before any fork: the workers inherit
    // it, its shared mapping and its directory lock. Its threads start in each worker.
    let app = App::open(PATTERN, stats.clone(), &args.server.app).unwrap_or_else(|e| {
        eprintln!("{PATTERN}: {e}");
        std::process::exit(1)
    });
    let setup = WorkerSetup::new(args.mode, config, app)?;

    let mut master = Master::new(listener, setup, stats, args.server.shutdown_timeout)?;
    master.start()?;
    runtime::announce(PATTERN, addr, workers);
    std::process::exit(master.supervise())
}
