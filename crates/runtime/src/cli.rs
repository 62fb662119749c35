//! The flags every server takes. A pattern crate flattens [`ServerArgs`] into its own clap
//! struct and adds the flags of its pattern.

use std::net::SocketAddr;
use std::time::Duration;

pub use flags::{duration, duration_or_zero, parse, positive, size};

#[derive(clap::Args, Debug, Clone)]
pub struct ServerArgs {
    /// Address to listen on (port 0 picks a free port; the start-up line says which).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,

    /// Worker threads or processes [default: number of cores].
    #[arg(long, value_parser = positive)]
    pub workers: Option<usize>,

    /// Length of the kernel's accept queue for the listening socket (listen(2) backlog).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=65535))]
    pub backlog: u32,

    /// Disable Nagle's algorithm on accepted connections (TCP_NODELAY) [default].
    #[arg(long, overrides_with = "no_nodelay")]
    pub nodelay: bool,

    /// Leave Nagle's algorithm on: small writes may wait up to an RTT or a delayed ACK.
    #[arg(long)]
    pub no_nodelay: bool,

    /// Socket receive buffer (SO_RCVBUF) in bytes, e.g. 64K [default: the kernel's autotuning].
    #[arg(long, value_parser = size)]
    pub rcvbuf: Option<usize>,

    /// Socket send buffer (SO_SNDBUF) in bytes, e.g. 64K [default: the kernel's autotuning].
    #[arg(long, value_parser = size)]
    pub sndbuf: Option<usize>,

    /// Open connections at most; past it, new ones wait in the accept queue.
    #[arg(long, default_value_t = 10_000, value_parser = positive)]
    pub max_conns: usize,

    /// Close a connection whose request head has not fully arrived in this time (408).
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub header_timeout: Duration,

    /// Close a keep-alive connection idle this long.
    #[arg(long, default_value = "60s", value_parser = duration)]
    pub idle_timeout: Duration,

    /// A request body must make progress at least this often (408).
    #[arg(long, default_value = "60s", value_parser = duration)]
    pub body_timeout: Duration,

    /// Close a connection whose peer takes none of our output for this long.
    #[arg(long, default_value = "60s", value_parser = duration)]
    pub send_timeout: Duration,

    /// On SIGTERM/SIGINT, a connection that has sent nothing yet may still send its first
    /// request this long (the kernel accepted it on the server's behalf).
    #[arg(long, default_value = "1s", value_parser = duration)]
    pub shutdown_grace: Duration,

    /// On SIGTERM/SIGINT, wait this long for in-flight requests before exiting anyway.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub shutdown_timeout: Duration,

    /// Write each request's timeline to stderr once its reply is out, one JSON line each:
    /// accepted, first byte read, head parsed, whole request in, reply filed, reply written.
    #[arg(long)]
    pub trace: bool,

    /// Largest request head (request line and headers) in bytes; larger gets 431.
    #[arg(long, default_value = "16K", value_parser = size)]
    pub max_head: usize,

    /// Longest request target in bytes; longer gets 414.
    #[arg(long, default_value = "8K", value_parser = size)]
    pub max_target: usize,

    /// Largest request body in bytes; larger gets 413.
    #[arg(long, default_value = "8M", value_parser = size)]
    pub max_body: usize,

    /// A streamed reply (Server-Sent Events) whose unsent bytes pass this is cut off: a
    /// subscriber that reads too slowly is disconnected (it resumes with Last-Event-ID).
    #[arg(long, default_value = "1M", value_parser = size)]
    pub stream_backlog: usize,

    #[command(flatten)]
    pub app: app::AppArgs,
}

impl ServerArgs {
    pub fn nodelay(&self) -> bool {
        !self.no_nodelay
    }

    /// `--workers`, or the number of cores.
    pub fn workers(&self) -> usize {
        self.workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    pub fn timeouts(&self) -> proto::Timeouts {
        proto::Timeouts {
            header: self.header_timeout,
            body: self.body_timeout,
            idle: self.idle_timeout,
            send: self.send_timeout,
            shutdown_grace: self.shutdown_grace,
            ..proto::Timeouts::default()
        }
    }

    pub fn limits(&self) -> proto::Limits {
        proto::Limits {
            max_head: self.max_head,
            max_target: self.max_target,
            max_body: self.max_body,
            max_stream_backlog: self.stream_backlog,
            max_upload: self.app.max_upload,
            ..proto::Limits::default()
        }
    }
}
