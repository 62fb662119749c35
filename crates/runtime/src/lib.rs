//! What every server in the workspace shares besides the protocol: the command-line flags,
//! the listening socket, the application, per-worker stats, shutdown on SIGTERM, and the mio
//! event loop that every epoll pattern runs. A pattern crate adds only its pattern.

pub mod app;
pub mod blocking;
pub mod cli;
pub mod config;
pub mod date;
pub mod event_loop;
pub mod listener;
pub mod shutdown;
pub mod stats;
pub mod threads;

pub use app::{App, Routable, Route, Task};
pub use cli::ServerArgs;
pub use config::ServeConfig;
pub use event_loop::{EventLoop, Handler, Inline, LoopHandle, Origin};
pub use shutdown::Shutdown;
pub use stats::{Stats, WorkerStats};

/// The one line a server prints when it is ready: pattern, address, workers, pid.
/// Test harnesses and scripts read the address from it (`listening on http://ADDR `).
pub fn announce(pattern: &str, addr: std::net::SocketAddr, workers: usize) {
    eprintln!(
        "{pattern} listening on http://{addr} (workers: {workers}, pid: {})",
        std::process::id()
    );
}
