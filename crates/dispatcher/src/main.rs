//! # dispatcher: memcached's acceptor and worker loops
//!
//! One thread listens and accepts; it does nothing else. Each connection it accepts goes to one
//! of N worker threads, and stays there for its whole life: that worker's event loop reads,
//! parses, runs the handler and writes. The hand-off is a queue per worker plus a wake-up
//! (an eventfd, memcached's notify pipe). memcached's `thread.c` works this way (its listener
//! picks a worker round-robin, pushes a queue item and writes to the worker's pipe), and so do
//! Netty's boss and worker event-loop groups.
//!
//! ```text
//!                    ┌─ acceptor ─────────────────────────────────────────────┐
//!   clients ──TCP──▶ │ listen socket ─accept─▶ pick a worker ─▶ hand_over      │
//!                    │  + SIGTERM/SIGINT       (round-robin or                 │
//!                    │                          least-connections)             │
//!                    └────────┬────────────────┬────────────────┬─────────────┘
//!                    queue + eventfd    queue + eventfd    queue + eventfd
//!                             ▼                ▼                ▼
//!                    ┌─ worker-0 ─────┐ ┌─ worker-1 ─────┐ ┌─ worker-N-1 ───┐
//!                    │ epoll: its own │ │ epoll: its own │ │ epoll: its own │
//!                    │ connections:   │ │ connections    │ │ connections    │
//!                    │ read, handle,  │ │                │ │                │
//!                    │ write          │ │                │ │                │
//!                    └────────────────┘ └────────────────┘ └────────────────┘
//! ```
//!
//! Trade-offs: one accept queue and one thread deciding where every connection goes, so the
//! spread is exactly what the policy says (round-robin gives each worker every Nth connection;
//! `--policy least-connections` sends it to the worker with the fewest open). The price is a
//! hand-off per connection (a lock, and a wake-up when the worker sleeps) and one thread that
//! caps the accept rate. A connection never moves once placed: a worker stuck in a slow request
//! stalls its connections while others idle, and round-robin keeps giving it new ones.
//!
//! Run: `cargo run --release -p dispatcher -- --addr 127.0.0.1:8080 --workers 4 [--policy least-connections]`

use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clap::Parser;
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use runtime::listener::{AcceptBackoff, is_out_of_resources};
use runtime::threads::{join, spawn};
use runtime::{
    EventLoop, Inline, LoopHandle, ServeConfig, ServerArgs, Shutdown, Stats, WorkerStats,
};
use signal_hook_mio::v1_0::Signals;

const PATTERN: &str = "dispatcher";

#[derive(Parser, Debug)]
#[command(name = PATTERN, about = "One acceptor thread hands each connection to one of N event-loop workers (memcached).")]
struct Args {
    #[command(flatten)]
    server: ServerArgs,

    /// How the acceptor picks the worker for a new connection.
    #[arg(long, value_enum, default_value_t = Policy::RoundRobin)]
    policy: Policy,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Policy {
    /// Every Nth connection to each worker, in turn (memcached).
    RoundRobin,
    /// To the worker with the fewest open connections (ties go round-robin).
    LeastConnections,
}

fn main() -> io::Result<()> {
    let args: Args = runtime::cli::parse();
    let workers = args.server.workers();
    let stats = Arc::new(Stats::new(PATTERN, workers));
    let app = runtime::open_app(PATTERN, &args.server, stats.clone());
    let listener = runtime::listener::bind(&args.server, false)?;
    let addr = listener.local_addr()?;
    let shutdown = Shutdown::new();

    // Each worker is an event loop with no listener: connections arrive through its handle.
    let config = ServeConfig::new(PATTERN, &args.server);
    let started = Arc::new(Barrier::new(workers + 1));
    let mut handles = Vec::with_capacity(workers);
    let mut threads = Vec::with_capacity(workers);
    for i in 0..workers {
        let event_loop = EventLoop::new(config.clone(), &app, stats.worker(i), shutdown.clone())?;
        handles.push(event_loop.handle());
        let (app, started) = (app.clone(), started.clone());
        threads.push(spawn(PATTERN, format!("worker-{i}"), move || {
            started.wait();
            event_loop.run(&mut Inline(app))
        })?);
    }
    // Like memcached's wait_for_thread_registration: accept nothing until every worker runs.
    started.wait();

    let acceptor = Acceptor::new(
        listener,
        handles,
        stats.workers(),
        args.policy,
        args.server.max_conns,
        shutdown,
    )?;
    let acceptor = spawn(PATTERN, "acceptor".into(), move || acceptor.run())?;
    runtime::announce(PATTERN, addr, workers);

    // The acceptor returns on SIGTERM/SIGINT, after waking every worker to drain.
    join(acceptor)?;
    threads.into_iter().try_for_each(join)
}

// ---- the acceptor ------------------------------------------------------------------------

const LISTENER: Token = Token(0);
const SIGNALS: Token = Token(1);

/// How often a full acceptor looks again whether connections have closed (memcached's
/// `maxconns_handler` re-checks on a 10 ms timer too: workers do not report their closes).
const FULL_RECHECK: Duration = Duration::from_millis(10);

enum Accepting {
    Yes,
    /// `--max-conns` are open: new connections wait in the kernel's accept queue.
    Full,
    /// Out of file descriptors or memory: try again at `until`.
    Paused {
        until: Instant,
    },
}

/// The acceptor thread: its own small poll with the listener and the stop signals.
struct Acceptor {
    poll: Poll,
    listener: TcpListener,
    signals: Signals,
    accepting: Accepting,
    backoff: AcceptBackoff,
    /// The workers' mailboxes and counters, by index.
    workers: Vec<Arc<LoopHandle>>,
    slots: &'static [WorkerStats],
    /// Connections handed to each worker so far. The worker counts one as `accepted` only once
    /// it has taken it from its queue, so `handed - accepted` are still on the way.
    handed: Vec<u64>,
    policy: Policy,
    /// Where the round-robin stands (least-connections starts its scan here, so ties rotate).
    next: usize,
    max_conns: usize,
    shutdown: Arc<Shutdown>,
}

impl Acceptor {
    fn new(
        listener: std::net::TcpListener,
        workers: Vec<Arc<LoopHandle>>,
        slots: &'static [WorkerStats],
        policy: Policy,
        max_conns: usize,
        shutdown: Arc<Shutdown>,
    ) -> io::Result<Acceptor> {
        let poll = Poll::new()?;
        let mut listener = TcpListener::from_std(listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let mut signals = Signals::new(runtime::shutdown::STOP_SIGNALS)?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        Ok(Acceptor {
            poll,
            listener,
            signals,
            accepting: Accepting::Yes,
            backoff: AcceptBackoff::default(),
            handed: vec![0; workers.len()],
            workers,
            slots,
            policy,
            next: 0,
            max_conns,
            shutdown,
        })
    }

    /// Accepts and hands out connections until SIGTERM or SIGINT.
    fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(8);
        loop {
            let timeout = match self.accepting {
                Accepting::Yes => None,
                Accepting::Full => Some(FULL_RECHECK),
                Accepting::Paused { until } => {
                    Some(until.saturating_duration_since(Instant::now()))
                }
            };
            if let Err(e) = self.poll.poll(&mut events, timeout)
                && e.kind() != io::ErrorKind::Interrupted
            {
                return Err(e);
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_all(),
                    SIGNALS if self.signals.pending().next().is_some() => {
                        // Returning closes the listener: new connections are refused. The
                        // workers finish what they have, then their threads end.
                        self.shutdown.trigger();
                        return Ok(());
                    }
                    _ => {}
                }
            }
            let resume = match self.accepting {
                Accepting::Yes => false,
                Accepting::Full => self.open() < self.max_conns,
                Accepting::Paused { until } => Instant::now() >= until,
            };
            if resume {
                self.poll
                    .registry()
                    .register(&mut self.listener, LISTENER, Interest::READABLE)?;
                self.accepting = Accepting::Yes;
                // Edge-triggered: connections queued while paused bring no new edge.
                self.accept_all();
            }
        }
    }

    /// Accepts until the queue is empty (edge-triggered), or a limit says wait.
    fn accept_all(&mut self) {
        while matches!(self.accepting, Accepting::Yes) {
            if self.open() >= self.max_conns {
                self.stop_accepting(Accepting::Full);
                return;
            }
            match self.listener.accept() {
                Ok((stream, _)) => {
                    self.backoff.succeeded();
                    let worker = self.pick();
                    self.handed[worker] += 1;
                    self.workers[worker].hand_over(stream.into());
                }
                // The queue is empty.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if is_out_of_resources(&e) => {
                    // The connection stays queued and the listener readable: retrying now
                    // would spin.
                    let pause = self.backoff.failed();
                    eprintln!("{PATTERN}: accept: {e}; pausing accepts for {pause:?}");
                    let until = Instant::now() + pause;
                    self.stop_accepting(Accepting::Paused { until });
                    return;
                }
                // The peer gave up while queued (ECONNABORTED) and the like: try the next one.
                Err(_) => continue,
            }
        }
    }

    /// Leaves the listener out of the poll until `run` resumes, so that connections arriving
    /// meanwhile wait in the kernel's queue without waking this thread.
    fn stop_accepting(&mut self, why: Accepting) {
        self.accepting = why;
        if let Err(e) = self.poll.registry().deregister(&mut self.listener) {
            eprintln!("{PATTERN}: deregistering the listener: {e}");
        }
    }

    // ---- the policy ----------------------------------------------------------------------

    /// The worker for the next connection.
    fn pick(&mut self) -> usize {
        let n = self.workers.len();
        let chosen = match self.policy {
            Policy::RoundRobin => self.next,
            // The fewest open; scanning from `next` makes ties rotate like round-robin.
            Policy::LeastConnections => (0..n)
                .map(|k| (self.next + k) % n)
                .min_by_key(|&i| self.load(i))
                .unwrap_or(0),
        };
        self.next = (chosen + 1) % n;
        chosen
    }

    /// Connections worker `i` holds or is about to: open ones plus those still in its queue.
    fn load(&self, i: usize) -> u64 {
        // `accepted` first: a connection the worker takes between the two reads is then
        // counted twice (briefly too high), never missed.
        let accepted = self.slots[i].accepted.load(Relaxed);
        let open = self.slots[i].open.load(Relaxed);
        open + self.handed[i].saturating_sub(accepted)
    }

    /// Open connections over all workers, for `--max-conns`.
    fn open(&self) -> usize {
        (0..self.workers.len()).map(|i| self.load(i)).sum::<u64>() as usize
    }
}

// ---- helpers -----------------------------------------------------------------------------
