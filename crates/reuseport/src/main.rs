//! # reuseport: a listening socket per worker, one port (nginx `reuseport`)
//!
//! N worker threads, each with a listening socket of its own, all bound to the same address and
//! port with SO_REUSEPORT. The kernel keeps one accept queue per socket and puts each new
//! connection in one of them, chosen by a hash of the connection's addresses and ports. Each
//! worker accepts only from its own queue and serves what it accepted: no shared socket, no herd,
//! no hand-off. nginx's `listen ... reuseport`, Envoy, HAProxy (`bind ... shards`) and Go
//! servers that scale out with SO_REUSEPORT work this way.
//!
//! ```text
//!                    clients ──TCP──▶ port P: the kernel hashes (src addr, src port,
//!                                     dst addr, dst port) to pick one socket
//!                 ┌───────────────┬───────────────┼───────────────┬───────────────┐
//!                 ▼               ▼               ▼               ▼
//!           listen socket   listen socket   listen socket   listen socket
//!            + its queue     + its queue     + its queue     + its queue
//!          ┌ worker-0 ────┐┌ worker-1 ────┐┌ worker-2 ────┐┌ worker-3 ────┐
//!          │ epoll: its   ││ epoll: its   ││ epoll: its   ││ epoll: its   │
//!          │ listener and ││ listener and ││ listener and ││ listener and │
//!          │ its conns    ││ its conns    ││ its conns    ││ its conns    │
//!          │ + SIGTERM    ││              ││              ││              │
//!          └──────────────┘└──────────────┘└──────────────┘└──────────────┘
//! ```
//!
//! Trade-offs: the cheapest way to spread connections (the kernel does it while handling the
//! SYN, and each queue has one reader). But the hash ignores load: a worker busy with a slow
//! request still gets its share of new connections, which wait in its queue while other workers
//! idle. And a queue belongs to its socket: connections waiting in it when the socket closes
//! (shutdown, a restart, a worker that exits) are reset, not moved to the other sockets (unless
//! the `net.ipv4.tcp_migrate_req` sysctl, Linux 5.14, is on).
//!
//! Run: `cargo run --release -p reuseport -- --addr 127.0.0.1:8080 --workers 4`

use std::io;
use std::sync::Arc;

use clap::Parser;
use runtime::threads::{join, spawn};
use runtime::{EventLoop, Inline, ServeConfig, ServerArgs, Shutdown, Stats};

const PATTERN: &str = "reuseport";

#[derive(Parser, Debug)]
#[command(name = PATTERN, about = "N worker threads, each with its own SO_REUSEPORT listening socket on one port (nginx reuseport).")]
struct Args {
    #[command(flatten)]
    server: ServerArgs,
}

fn main() -> io::Result<()> {
    let args: Args = runtime::cli::parse();
    let workers = args.server.workers();
    let stats = Arc::new(Stats::new(PATTERN, workers));
    let app = runtime::open_app(PATTERN, &args.server, stats.clone());
    let listeners = runtime::listener::bind_reuseport(&args.server, workers)?;
    let addr = listeners[0].local_addr()?;
    let shutdown = Shutdown::new();
    let mut config = ServeConfig::new(PATTERN, &args.server);
    // --max-conns is for the server; each worker takes an equal share, as nginx's
    // worker_connections is per worker. A full worker's share waits in its own queue.
    config.max_conns = (args.server.max_conns / workers).max(1);

    let mut threads = Vec::with_capacity(workers);
    for (i, listener) in listeners.into_iter().enumerate() {
        let mut event_loop =
            EventLoop::new(config.clone(), &app, stats.worker(i), shutdown.clone())?;
        event_loop.listen(listener)?;
        if i == 0 {
            event_loop.watch_signals()?;
        }
        let app = app.clone();
        threads.push(spawn(PATTERN, format!("worker-{i}"), move || {
            event_loop.run(&mut Inline(app))
        })?);
    }
    runtime::announce(PATTERN, addr, workers);

    // Worker 0 hears SIGTERM/SIGINT and wakes the rest; each closes its socket, drains, returns.
    threads.into_iter().try_for_each(join)
}
