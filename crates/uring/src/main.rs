//! # uring: completion-based I/O, one io_uring per worker (glommio, monoio, TigerBeetle)
//!
//! An epoll server asks the kernel *when* a socket is ready, then makes the read or write
//! itself: two system calls per keep-alive request (a `read` and a `write`) plus the
//! `epoll_wait`. A completion server hands the kernel the operations themselves and is told
//! when they are *done*. Each worker thread owns one io_uring: a submission queue (SQ) it
//! fills with operations and a completion queue (CQ) the kernel fills with results, both in
//! memory shared with the kernel. One `io_uring_enter` per loop turn submits everything the
//! turn queued (every connection's send) and waits for the next completions, so the system
//! calls per request fall with the load: the more requests a turn carries, the fewer calls
//! each pays. glommio, monoio and TigerBeetle are built this way; Seastar has it as a backend.
//!
//! ```text
//!        clients ──TCP──▶ port P (SO_REUSEPORT: the kernel hashes each connection to a socket)
//!             ┌──────────────────────────────┴───────────────────────────────┐
//!             ▼                                                              ▼
//!   ┌ worker-0 ── one io_uring ─────────────────────┐   ┌ worker-1 ── one io_uring ─────┐
//!   │  SQ ──▶ kernel ──▶ CQ                         │   │  (the same, with its own      │
//!   │  armed once, many completions each:           │   │   listener, buffers, eventfd) │
//!   │    multishot accept on its listener           │   └───────────────────────────────┘
//!   │    multishot recv per connection, into the    │
//!   │      provided-buffer ring (no buffer per idle │   app threads (journal watcher,
//!   │      connection)                              │   committer, jobs) ──hub──▶ eventfd
//!   │    read of its eventfd (the app's hub, and    │   write: one wake-up per ring
//!   │      shutdown)                                │
//!   │    read of the signalfd (worker-0 only)       │
//!   │  each turn: reap CQEs ─▶ proto::Conn ─▶ app   │
//!   │    ─▶ one Send SQE per connection with output │
//!   │    ─▶ io_uring_enter: submit all, wait        │
//!   └───────────────────────────────────────────────┘
//! ```
//!
//! Trade-offs: fewer system calls and no readiness round trip (the kernel receives as the data
//! arrives, into a buffer it picks), but the kernel now owns memory: a buffer handed to an
//! operation must stay put until its completion arrives, even when the connection it was for
//! has closed, and every multishot operation can end (out of buffers, an error) and must be
//! re-armed. Sends copy the encoded reply into a buffer the ring owns, since proto may move
//! its own output buffer while a send is in flight. The kernel side is newer and has been a
//! rich source of security bugs: containers and some distributions disable it
//! (`kernel.io_uring_disabled`, seccomp), and this server then stops with one line saying so.
//! Spreading connections over workers is SO_REUSEPORT's hash, with its blind spot: a busy
//! worker still gets its share.
//!
//! Run: `cargo run --release -p uring -- --addr 127.0.0.1:8080 --workers 2`

mod buf_ring;
mod worker;

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use clap::Parser;
use runtime::threads::{join, spawn};
use runtime::{ServeConfig, ServerArgs, Shutdown, Stats};

use worker::{RingConfig, Wake, Worker};

const PATTERN: &str = "uring";

#[derive(Parser, Debug)]
#[command(name = PATTERN, about = "N worker threads, each with its own io_uring and SO_REUSEPORT listener: completion-based I/O.")]
struct Args {
    #[command(flatten)]
    server: ServerArgs,

    /// Submission queue entries per ring (a power of two); the completion queue gets 4 times
    /// as many.
    #[arg(long, default_value_t = 1024, value_parser = power_of_two)]
    ring_entries: u32,

    /// Receive buffers per ring (a power of two, at most 32768): what all its connections'
    /// multishot receives take from. Too few and receives end with ENOBUFS (and are re-armed).
    #[arg(long, default_value_t = 512, value_parser = power_of_two)]
    recv_buffers: u32,

    /// Bytes per receive buffer, e.g. 4K.
    #[arg(long, default_value = "4K", value_parser = runtime::cli::size)]
    recv_buffer_size: usize,
}

fn main() -> io::Result<()> {
    let args: Args = runtime::cli::parse();
    if args.recv_buffers > 1 << 15 || !(512..=1 << 20).contains(&args.recv_buffer_size) {
        eprintln!("{PATTERN}: --recv-buffers at most 32768, --recv-buffer-size 512 to 1M");
        std::process::exit(2);
    }
    // Before any thread starts, so that every thread (the app's too) inherits the mask.
    let signals = block_stop_signals()?;
    if let Err(cause) = worker::probe(args.ring_entries) {
        eprintln!("{PATTERN}: {cause}");
        std::process::exit(1);
    }
    let workers = args.server.workers();
    let stats = Arc::new(Stats::new(PATTERN, workers).with_extra(&worker::COUNTERS));
    let app = runtime::open_app(PATTERN, &args.server, stats.clone());
    let listeners = runtime::listener::bind_reuseport(&args.server, workers)?;
    let addr = listeners[0].local_addr()?;
    let shutdown = Shutdown::new();
    let mut config = ServeConfig::new(PATTERN, &args.server);
    // --max-conns is for the server; each ring takes an equal share, as in reuseport.
    config.max_conns = (args.server.max_conns / workers).max(1);
    let ring = RingConfig {
        entries: args.ring_entries,
        recv_buffers: args.recv_buffers as u16,
        recv_buffer_size: args.recv_buffer_size,
    };
    // Every ring's eventfd: the app's hub rings a worker's own; worker 0, which reads the
    // signals, rings all of them at shutdown.
    let wakes: Arc<[Arc<Wake>]> = (0..workers)
        .map(|_| Wake::new().map(Arc::new))
        .collect::<io::Result<_>>()?;

    let mut signals = Some(signals);
    let mut threads = Vec::with_capacity(workers);
    for (i, listener) in listeners.into_iter().enumerate() {
        let setup = worker::Setup {
            config: config.clone(),
            ring,
            app: app.clone(),
            stats: stats.worker(i),
            shutdown: shutdown.clone(),
            wakes: wakes.clone(),
            me: i,
            listener,
            signals: signals.take(),
        };
        // The ring is made on the thread that uses it: IORING_SETUP_SINGLE_ISSUER.
        threads.push(spawn(PATTERN, format!("worker-{i}"), move || {
            Worker::new(setup)?.run()
        })?);
    }
    runtime::announce(PATTERN, addr, workers);
    threads.into_iter().try_for_each(join)
}

/// SIGTERM and SIGINT become data: blocked in this thread (and so in every thread started
/// after), and readable from the returned signalfd, which worker 0's ring reads like any other
/// file. No signal handler runs at all.
fn block_stop_signals() -> io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data that sigemptyset initialises; the calls get valid
    // pointers to it, and their results are checked.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in runtime::shutdown::STOP_SIGNALS {
            libc::sigaddset(&mut set, signal);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

fn power_of_two(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if n.is_power_of_two() => Ok(n),
        _ => Err(format!("expected a power of two, got {s:?}")),
    }
}
