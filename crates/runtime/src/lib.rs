//! What every server in the workspace shares besides the protocol: the command-line flags,
//! the listening socket, the application, per-worker stats, shutdown on SIGTERM, a forking
//! master's signals (prefork, process-per-connection), and the mio event loop that every epoll
//! pattern runs. A pattern crate adds only its pattern.

pub mod blocking;
pub mod cli;
pub mod config;
pub mod date;
pub mod event_loop;
pub mod held;
pub mod listener;
pub mod master_signals;
pub mod shutdown;
pub mod threads;
pub mod trace;

pub use app::{
    App, AppArgs, BodySink, JobRole, Pending, ROUTED_HEADERS, Reply, Routable, Route, Stats,
    Stream, Task, WorkerStats, streams_body,
};
pub use cli::ServerArgs;
pub use config::ServeConfig;
pub use event_loop::{EventLoop, Handler, Inline, LoopHandle, Origin};
pub use shutdown::Shutdown;

/// Opens the app (its journal under `--data-dir`) and starts its threads, for a server of one
/// process; a server that cannot open its data directory stops here with one line saying why.
pub fn open_app(pattern: &'static str, args: &ServerArgs, stats: std::sync::Arc<Stats>) -> App {
    let app = App::open(pattern, stats, &args.app).and_then(|app| app.start().map(|()| app));
    app.unwrap_or_else(|e| {
        eprintln!("{pattern}: {e}");
        std::process::exit(1)
    })
}

/// The one line a server prints when it is ready: pattern, address, workers, pid.
/// Test harnesses and scripts read the address from it (`listening on http://ADDR `).
pub fn announce(pattern: &str, addr: std::net::SocketAddr, workers: usize) {
    eprintln!(
        "{pattern} listening on http://{addr} (workers: {workers}, pid: {})",
        std::process::id()
    );
}
