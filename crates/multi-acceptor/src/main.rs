//! # multi-acceptor: nginx's workers accepting on one shared socket
//!
//! One listening socket, N worker threads. Every worker has its own epoll with that socket in
//! it, accepts for itself, and serves what it accepted: there is no acceptor thread and no
//! hand-off. nginx ran this way before `reuseport` (its worker processes inherit the master's
//! listening socket and each adds it to its own epoll), and so do most prefork servers.
//!
//! ```text
//!                        clients ──TCP──▶ one listen socket, one accept queue
//!                 ┌──────────────┬──────────────┼──────────────┬──────────────┐
//!             try_clone()    try_clone()    try_clone()    try_clone()
//!                 ▼              ▼              ▼              ▼
//!          ┌ worker-0 ────┐┌ worker-1 ────┐┌ worker-2 ────┐┌ worker-3 ────┐
//!          │ epoll:       ││ epoll:       ││ epoll:       ││ epoll:       │
//!          │  listener    ││  listener    ││  listener    ││  listener    │
//!          │  its conns   ││  its conns   ││  its conns   ││  its conns   │
//!          │  SIGTERM     ││              ││              ││              │
//!          └──────────────┘└──────────────┘└──────────────┘└──────────────┘
//!   default:      a new connection wakes every idle worker (the thundering herd); one wins
//!   --exclusive:  EPOLLEXCLUSIVE, level-triggered: the kernel wakes one waiting worker
//! ```
//!
//! Trade-offs: the worker that accepts a connection serves it, so there is no queue, lock or
//! wake-up between accept and read. But every idle worker sleeps on the same socket, so each new
//! connection wakes them all, and all but one find nothing (the thundering herd). Most of those
//! wake-ups end inside the kernel (epoll checks readiness again before it returns, and finds the
//! queue empty), so `wasted_wakeups` in `/stats` sees only the few that reached `accept()`; the
//! herd shows in each worker's `voluntary_csw`. With `--exclusive` the kernel wakes one waiter per
//! connection, but mostly the same one (the first in the socket's wait queue), so an idle server
//! piles connections on one worker: nginx's `accept_mutex` and then `reuseport` came from this.
//!
//! Run: `cargo run --release -p multi-acceptor -- --addr 127.0.0.1:8080 --workers 4 [--exclusive]`

use std::io;
use std::sync::Arc;

use clap::Parser;
use runtime::threads::{join, spawn};
use runtime::{EventLoop, Inline, ServeConfig, ServerArgs, Shutdown, Stats};

const PATTERN: &str = "multi-acceptor";

#[derive(Parser, Debug)]
#[command(name = PATTERN, about = "N worker threads accept on one shared listening socket (nginx before reuseport).")]
struct Args {
    #[command(flatten)]
    server: ServerArgs,

    /// Register the listener with EPOLLEXCLUSIVE: a new connection wakes one worker, not all.
    #[arg(long)]
    exclusive: bool,
}

fn main() -> io::Result<()> {
    let args: Args = runtime::cli::parse();
    let workers = args.server.workers();
    let stats = Arc::new(Stats::new(PATTERN, workers));
    let app = runtime::open_app(PATTERN, &args.server, stats.clone());
    let listener = runtime::listener::bind(&args.server, false)?;
    let addr = listener.local_addr()?;
    let shutdown = Shutdown::new();
    let mut config = ServeConfig::new(PATTERN, &args.server);
    // --max-conns is for the server; each worker takes an equal share, as nginx's
    // worker_connections is per worker. A full worker leaves new connections to the others.
    config.max_conns = (args.server.max_conns / workers).max(1);

    let mut threads = Vec::with_capacity(workers);
    for i in 0..workers {
        let mut event_loop =
            EventLoop::new(config.clone(), &app, stats.worker(i), shutdown.clone())?;
        // The same socket through a descriptor of the worker's own: a mio source belongs to one
        // poll. The socket closes when the last worker drops its descriptor.
        let shared = listener.try_clone()?;
        if args.exclusive {
            event_loop.listen_exclusive(shared)?;
        } else {
            event_loop.listen(shared)?;
        }
        if i == 0 {
            event_loop.watch_signals()?;
        }
        let app = app.clone();
        threads.push(spawn(PATTERN, format!("worker-{i}"), move || {
            event_loop.run(&mut Inline(app))
        })?);
    }
    // Only the workers' descriptors are left, so shutting down closes the socket.
    drop(listener);
    runtime::announce(PATTERN, addr, workers);

    // Worker 0 hears SIGTERM/SIGINT and wakes the rest; each returns once drained.
    threads.into_iter().try_for_each(join)
}
