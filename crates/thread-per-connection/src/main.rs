//! # thread-per-connection: Apache's worker MPM
//!
//! One `acceptor` thread accepts connections and hands each one to a thread from a bounded pool;
//! that thread serves the connection from its first byte to its close with plain blocking `read`
//! and `write` calls, and sleeps in the kernel whenever its client is quiet. The kernel's
//! scheduler does the multiplexing. Apache's worker MPM (a listener thread feeding a fixed set of
//! worker threads), classic Java servlet containers (Tomcat's blocking connector) and MySQL's one
//! thread per connection serve this way.
//!
//! ```text
//!                  ┌─ acceptor ──────────────────────────────────┐
//!   clients ──TCP──▶ epoll: listen socket, SIGTERM/SIGINT pipe,  │ accepts only while a pool
//!    (at the bound │        waker "a pool thread is free again"  │ thread is free, or one more
//!     they wait in └──────┬──────────────────────────────────────┘ may be started
//!     the backlog)        │ queue + condvar: push the socket, wake one idle thread
//!          ┌──────────────┼──────────────────┬─────── pool: --workers threads at start,
//!          ▼              ▼                  ▼        more on demand up to --max-threads
//!       conn-0         conn-1      ...    conn-N      each: read ▸ parse ▸ handler ▸ write,
//!       (blocked in    (running /work)    (idle: waits     until its connection closes, then
//!        read)                             for a socket)    back to the pool for the next one
//! ```
//!
//! At the bound: when all `--max-threads` threads are serving connections (or `--max-conns`
//! are open, if lower), the acceptor stops calling `accept`. New connections still complete
//! their handshake in the kernel and wait in the listen queue (`--backlog`; past that the
//! kernel drops SYNs and clients retry). The first thread to finish a connection rings the
//! acceptor's waker and accepting resumes: Apache's listener likewise waits for an idle worker
//! before it accepts.
//!
//! Trade-offs: the simplest code there is (a handler may block or burn CPU and stalls only its
//! own connection), fair time-slicing by the kernel, and no event loop to starve. It costs a
//! thread per open connection, idle keep-alive ones included (a stack, a kernel task, a context
//! switch for every request, visible as `voluntary_csw` in `/stats`), so the bound is on
//! connections, not on requests: `--max-threads` idle keep-alive clients lock everyone else out
//! until `--idle-timeout` closes them. That is why Apache's event MPM parks idle keep-alive
//! connections in an epoll set instead.
//!
//! `/stats`: a slot per pool thread would be 1024 slots, mostly empty. There are
//! min(--max-threads, 16): thread `conn-N` counts its connections and requests in slot N mod 16,
//! `threads` says how many threads count in a slot, and a slot's context switches are those of
//! its first thread (`conn-0` for slot 0, and so on). With few connections, each thread has a
//! slot of its own.
//!
//! Run: `cargo run --release -p thread-per-connection -- --addr 127.0.0.1:8080 [--max-threads 1024]`

use std::collections::VecDeque;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use runtime::blocking::{Context, OpenConns, ThreadPark, serve};
use runtime::listener::{AcceptBackoff, is_out_of_resources};
use runtime::shutdown::STOP_SIGNALS;
use runtime::{App, ServeConfig, ServerArgs, Stats};
use signal_hook_mio::v1_0::Signals;

const PATTERN: &str = "thread-per-connection";

/// At most this many `/stats` slots, however many threads there are.
const STATS_SLOTS: usize = 16;
/// The extra `/stats` counter: threads started that count in the slot.
const THREADS: usize = 0;

/// Each pool thread's stack. Rust's default is 2 MiB; the driver and the application need a few
/// KiB, and 1024 threads with 2 MiB each would reserve 2 GiB of address space for nothing. An
/// overflow hits the guard page and aborts with a message, it does not corrupt memory.
const THREAD_STACK: usize = 256 * 1024;

#[derive(Parser, Debug)]
#[command(name = PATTERN, about = "An acceptor hands each connection to a blocking thread from a bounded pool (Apache worker MPM).")]
struct Args {
    #[command(flatten)]
    server: ServerArgs,

    /// Pool threads at most, so connections served at once at most; past it, new connections
    /// wait in the accept queue. --workers threads start at once, the others when needed.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    max_threads: u32,
}

fn main() -> io::Result<()> {
    let args: Args = runtime::cli::parse();
    // Each thread holds one connection, so --max-conns bounds the threads too.
    let max_threads = (args.max_threads as usize).min(args.server.max_conns);
    let slots = max_threads.min(STATS_SLOTS);
    let stats = Arc::new(Stats::new(PATTERN, slots).with_extra(&["threads"]));

    let listener = runtime::listener::bind(&args.server, false)?;
    let addr = listener.local_addr()?;
    let acceptor = Acceptor::new(listener)?;
    let pool = Arc::new(Pool {
        app: runtime::open_app(PATTERN, &args.server, stats.clone()),
        config: ServeConfig::new(PATTERN, &args.server),
        stats,
        open: OpenConns::default(),
        max_threads,
        acceptor_waker: acceptor.waker.clone(),
        state: Mutex::new(PoolState::default()),
        work: Condvar::new(),
        exited: Condvar::new(),
    });
    for _ in 0..args.server.workers().min(max_threads) {
        pool.start_thread(&mut pool.lock())?;
    }

    runtime::announce(PATTERN, addr, max_threads);
    let accepting = pool.clone();
    thread::Builder::new()
        .name("acceptor".into())
        .spawn(move || acceptor.run(&accepting))?
        .join()
        .map_err(|_| io::Error::other("the acceptor thread panicked"))??;

    // SIGTERM/SIGINT: the listener is closed. Finish what is in flight, then exit 0.
    pool.shut_down();
    Ok(())
}

// ---- the acceptor ------------------------------------------------------------------------------

const LISTENER: Token = Token(0);
const SIGNALS: Token = Token(1);
const WAKER: Token = Token(2);

/// Waits in a small epoll set rather than in a blocking `accept(2)`: a blocking accept neither
/// returns on SIGTERM (signal-hook's handler restarts it, and the signal may land on any
/// thread) nor can it wait for "a pool thread is free" at the same time.
struct Acceptor {
    poll: Poll,
    listener: TcpListener,
    signals: Signals,
    waker: Arc<Waker>,
    backoff: AcceptBackoff,
}

impl Acceptor {
    fn new(listener: TcpListener) -> io::Result<Acceptor> {
        let poll = Poll::new()?;
        let registry = poll.registry();
        // The std listener (non-blocking) registered by its descriptor: it accepts std streams,
        // which the blocking driver wants. Edge-triggered, as everything in mio.
        registry.register(
            &mut SourceFd(&listener.as_raw_fd()),
            LISTENER,
            Interest::READABLE,
        )?;
        let mut signals = Signals::new(STOP_SIGNALS)?;
        registry.register(&mut signals, SIGNALS, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(registry, WAKER)?);
        Ok(Acceptor {
            poll,
            listener,
            signals,
            waker,
            backoff: AcceptBackoff::default(),
        })
    }

    /// Accepts until SIGTERM or SIGINT; returning drops (closes) the listener.
    fn run(mut self, pool: &Arc<Pool>) -> io::Result<()> {
        let mut events = Events::with_capacity(8);
        let mut paused_until: Option<Instant> = None;
        loop {
            let timeout = paused_until.map(|until| until.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout)
                && e.kind() != io::ErrorKind::Interrupted
            {
                return Err(e);
            }
            if events.iter().any(|e| e.token() == SIGNALS) {
                let _ = self.signals.pending().count();
                return Ok(());
            }
            if let Some(until) = paused_until {
                if Instant::now() < until {
                    continue;
                }
                paused_until = None;
            }
            // A new connection, a pool thread freed up, or the pause ended: accept what waits.
            if let Some(pause) = self.accept_while_threads_free(pool) {
                paused_until = Some(Instant::now() + pause);
            }
        }
    }

    /// Accepts while a pool thread is free for the connection. Returns how long to pause
    /// accepting if the process ran out of descriptors, memory or threads.
    fn accept_while_threads_free(&mut self, pool: &Arc<Pool>) -> Option<Duration> {
        loop {
            match pool.free_thread() {
                Ok(true) => {}
                // At the bound: connections wait in the backlog until a thread rings the waker.
                Ok(false) => return None,
                Err(e) => return Some(self.pause(&e, "cannot start a thread")),
            }
            match self.listener.accept() {
                // Linux does not pass O_NONBLOCK on from the listener: the stream blocks.
                Ok((stream, _)) => {
                    self.backoff.succeeded();
                    pool.hand_over(stream);
                }
                // The accept queue is empty; the next connection is a new edge.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                // EMFILE and the like: the connection stays queued, so retrying now would spin.
                Err(e) if is_out_of_resources(&e) => return Some(self.pause(&e, "accept")),
                // The peer gave up while queued (ECONNABORTED) and the like: try the next one.
                Err(_) => {}
            }
        }
    }

    fn pause(&mut self, e: &io::Error, what: &str) -> Duration {
        let pause = self.backoff.failed();
        eprintln!("{PATTERN}: {what}: {e}; pausing accepts for {pause:?}");
        pause
    }
}

// ---- the pool ----------------------------------------------------------------------------------

/// The threads, and the queue through which the acceptor hands them connections.
struct Pool {
    app: App,
    config: ServeConfig,
    stats: Arc<Stats>,
    /// Every connection being served, so shutdown can wake the threads blocked reading them.
    open: OpenConns,
    max_threads: usize,
    acceptor_waker: Arc<Waker>,
    state: Mutex<PoolState>,
    /// Signalled when a connection is queued, and at shutdown.
    work: Condvar,
    /// Signalled when a thread exits (shutdown waits for them all).
    exited: Condvar,
}

#[derive(Default)]
struct PoolState {
    /// Accepted connections no thread has picked up yet (each has a free thread reserved).
    queue: VecDeque<TcpStream>,
    /// Threads alive, and threads started so far (names them `conn-N`).
    threads: usize,
    started: usize,
    /// Threads without a connection, less the connections queued for them.
    free: usize,
    /// The acceptor found no free thread and waits for the waker.
    acceptor_waits: bool,
    stopping: bool,
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a thread is free for one more connection, starting one if the bound allows.
    /// If not, the acceptor will be woken when a thread frees up.
    fn free_thread(self: &Arc<Self>) -> io::Result<bool> {
        let mut state = self.lock();
        if state.free == 0 && state.threads < self.max_threads {
            self.start_thread(&mut state)?;
        }
        state.acceptor_waits = state.free == 0;
        Ok(state.free > 0)
    }

    /// Queues a connection for the free thread that [`Pool::free_thread`] found.
    fn hand_over(&self, stream: TcpStream) {
        let mut state = self.lock();
        state.free -= 1;
        state.queue.push_back(stream);
        drop(state);
        self.work.notify_one();
    }

    fn start_thread(self: &Arc<Self>, state: &mut PoolState) -> io::Result<()> {
        let (id, pool) = (state.started, self.clone());
        thread::Builder::new()
            .name(format!("conn-{id}"))
            .stack_size(THREAD_STACK)
            .spawn(move || pool.serve_connections(id))?;
        state.started += 1;
        state.threads += 1;
        state.free += 1;
        Ok(())
    }

    /// A pool thread: serves one connection after another until shutdown.
    fn serve_connections(&self, id: usize) {
        let slots = self.stats.workers().len();
        let stats = self.stats.worker(id % slots);
        if id < slots {
            stats.bind_thread();
        }
        stats.add_extra(THREADS, 1);
        let park = ThreadPark::current();

        let mut state = self.lock();
        loop {
            if let Some(stream) = state.queue.pop_front() {
                drop(state);
                let cx = Context {
                    config: &self.config,
                    app: &self.app,
                    stats,
                    open: &self.open,
                    park: &park,
                };
                serve(stream, &cx, |req| self.app.handle_inline(req));
                state = self.lock();
                state.free += 1;
                if std::mem::take(&mut state.acceptor_waits) {
                    // The acceptor stopped at the bound: one more connection may come in.
                    let _ = self.acceptor_waker.wake();
                }
            } else if state.stopping {
                break;
            } else {
                state = self.work.wait(state).unwrap_or_else(|e| e.into_inner());
            }
        }
        state.threads -= 1;
        state.free -= 1;
        drop(state);
        self.exited.notify_all();
    }

    /// Idle threads exit; busy ones stop reading new requests, send the replies they owe and
    /// exit. Returns when all are gone, or after `--shutdown-timeout`.
    fn shut_down(&self) {
        self.lock().stopping = true;
        self.work.notify_all();
        self.open.stop_reading();
        // Threads held by long polls and streams answer with what they have now.
        self.app.stop();
        let deadline = Instant::now() + self.config.shutdown_timeout;
        let mut state = self.lock();
        while state.threads > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                eprintln!(
                    "{PATTERN}: {} connections still open after the shutdown timeout",
                    self.open.len()
                );
                break;
            }
            state = self
                .exited
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}
