//! # load-balanced: RAMCloud's dispatcher
//!
//! One dispatch thread does all the network I/O: it accepts, reads, parses and writes for every
//! connection, in one epoll loop. It runs no handler. Each complete request goes to a worker
//! thread: the one that went idle most recently, because that one is most likely still spinning
//! with a warm cache. When every worker is busy, requests wait in a FIFO, and a worker that
//! finishes takes the oldest before it goes idle. The worker runs the handler and hands the reply
//! back through the loop's completion queue and waker; the dispatch thread writes it, in request
//! order on each connection. RAMCloud's servers work this way (its `Dispatch` thread and
//! `WorkerManager`); Shinjuku's dispatcher hands requests to idle cores the same way.
//!
//! ```text
//!                ┌───────────────────── dispatch ─────────────────────┐
//!  clients ──TCP─▶ listen ─accept─▶ epoll ─▶ read ─▶ parse ─▶ hand off┼─▶ the most recently idle
//!                │                  ▲                                 │   worker (a LIFO stack), or
//!                │                  └─ write in order ◀─ completions ◀┼┐  the FIFO if all are busy
//!                └────────────────────────────────────────────────────┘│             │
//!                                                                      │             ▼
//!                       reply: LoopHandle::complete, then the waker ───┴─── worker-1 … worker-N:
//!                       (an eventfd) wakes the loop                         run the handler; idle:
//!                                                                           spin --spin-us, then park
//! ```
//!
//! Trade-offs: a slow request holds one worker, never a connection's event loop nor the other
//! workers, so light requests stay fast next to heavy ones, whichever connection they come on
//! (any idle worker serves any connection). The price is a hand-off per request (two threads
//! touch each one, and a sleeping worker costs a futex wake), and one dispatch thread whose I/O
//! caps throughput. A spinning worker takes a hand-off without a system call, but burns a core
//! while it spins: RAMCloud gives each one a core of its own. `--inline-cheap` answers the cheap
//! requests on the dispatch thread, as RAMCloud answers ping.
//!
//! Run: `cargo run --release -p load-balanced -- --addr 127.0.0.1:8080 [--workers 2] [--spin-us 50] [--inline-cheap]`

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Barrier, Mutex, MutexGuard, OnceLock};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use clap::Parser;
use proto::Request;
use runtime::{
    App, EventLoop, Handler, Origin, Reply, Routable, Route, ServeConfig, ServerArgs, Shutdown,
    Stats, Task, WorkerStats,
};

const PATTERN: &str = "load-balanced";

/// `/stats` slot 0 is the dispatch thread (it accepts, so its `accepted`, `open` and `requests`
/// are the server's); slot `i` is `worker-i`. Each adds these counters:
const EXTRA: &[&str] = &["executed", "busy_us", "woken", "queued"];
/// Requests this thread ran the handler for (on the dispatch thread: those answered inline).
const EXECUTED: usize = 0;
/// Time spent running handlers, in µs (workers only).
const BUSY_US: usize = 1;
/// Times this worker was woken from sleep by a hand-off.
const WOKEN: usize = 2;
/// Requests that waited in the FIFO because every worker was busy (dispatch only).
const QUEUED: usize = 3;

#[derive(Parser, Debug)]
#[command(name = PATTERN, about = "One dispatch thread does all network I/O; each request goes to the most recently idle worker (RAMCloud).")]
struct Args {
    #[command(flatten)]
    server: ServerArgs,

    /// Microseconds an idle worker spins waiting for work before it sleeps (0: sleep at once).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    spin_us: u64,

    /// Answer cheap requests (all but /work and /block) on the dispatch thread, as RAMCloud
    /// answers ping; only heavy ones go to the workers.
    #[arg(long)]
    inline_cheap: bool,
}

fn main() -> io::Result<()> {
    let args: Args = runtime::cli::parse();
    let workers = args.server.workers();
    let stats = Arc::new(Stats::new(PATTERN, workers + 1).with_extra(EXTRA));
    let app = runtime::open_app(PATTERN, &args.server, stats.clone());

    let listener = runtime::listener::bind(&args.server, false)?;
    let addr = listener.local_addr()?;
    let config = ServeConfig::new(PATTERN, &args.server);
    let mut event_loop = EventLoop::new(config, &app, stats.worker(0), Shutdown::new())?;
    event_loop.listen(listener)?;
    event_loop.watch_signals()?;

    let slots = (1..=workers).map(|i| stats.worker(i)).collect();
    let pool = Arc::new(Pool::new(slots));
    let spin = Duration::from_micros(args.spin_us);
    // Announce only once every thread runs (memcached waits for its workers the same way).
    let started = Arc::new(Barrier::new(workers + 2));
    for id in 0..workers {
        let (pool, app, replies) = (pool.clone(), app.clone(), event_loop.handle());
        let started = started.clone();
        let slot = stats.worker(id + 1);
        let mut busy_ns = 0;
        thread::Builder::new()
            .name(format!("worker-{}", id + 1))
            .spawn(move || {
                slot.bind_thread();
                started.wait();
                pool.work(id, spin, |job: Job| {
                    let began = Instant::now();
                    let reply = job.work.run(&app);
                    // Counted before the reply leaves, so a /stats sent after it includes it.
                    busy_ns += began.elapsed().as_nanos() as u64;
                    slot.add_extra(BUSY_US, busy_ns / 1000);
                    busy_ns %= 1000;
                    slot.add_extra(EXECUTED, 1);
                    replies.complete(job.origin, reply);
                })
            })?;
    }

    let mut dispatch = Dispatch {
        app,
        pool,
        inline_cheap: args.inline_cheap,
        stats: stats.worker(0),
    };
    let dispatch_started = started.clone();
    let dispatch = thread::Builder::new()
        .name("dispatch".into())
        .spawn(move || {
            dispatch_started.wait();
            event_loop.run(&mut dispatch)
        })?;
    started.wait();
    runtime::announce(PATTERN, addr, workers);
    // Returning ends the process, parked workers included: the loop returns only once every
    // reply in flight went out (or --shutdown-timeout passed).
    dispatch
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the dispatch thread panicked")))
}

/// The dispatch thread's handler: copy the request, hand it to a worker, reply later.
struct Dispatch {
    app: App,
    pool: Arc<Pool<Job>>,
    inline_cheap: bool,
    stats: &'static WorkerStats,
}

impl Handler for Dispatch {
    fn handle(&mut self, req: &Request<'_>, origin: Origin) -> Option<Reply> {
        if runtime::streams_body(req.method, req.path()) {
            // An upload's body arrives on this thread, after its head: routed here too (it
            // opens a file; the bytes then go to it as this loop reads them).
            self.stats.add_extra(EXECUTED, 1);
            return Some(self.app.handle_inline(req));
        }
        let work = if self.inline_cheap {
            match self.app.route(req) {
                Route::Ready(reply) => {
                    self.stats.add_extra(EXECUTED, 1);
                    return Some(reply);
                }
                Route::Heavy(task) => Work::Task(task),
            }
        } else {
            Work::Request(OwnedRequest::copy(req))
        };
        if self.pool.submit(Job { origin, work }).is_none() {
            self.stats.add_extra(QUEUED, 1);
        }
        None
    }
}

/// A request on its way to a worker, and where its reply goes.
struct Job {
    origin: Origin,
    work: Work,
}

enum Work {
    /// The whole request: the worker routes it and runs the handler.
    Request(OwnedRequest),
    /// With `--inline-cheap`: the dispatch thread routed it, and it is heavy.
    Task(Task),
}

impl Work {
    /// The reply, or what the dispatch thread should hold for it (a long poll, a stream).
    fn run(self, app: &App) -> Reply {
        match self {
            Work::Request(req) => app.handle_inline(&req),
            Work::Task(task) => task.run().into(),
        }
    }
}

// ---- the workers: RAMCloud's WorkerManager ----------------------------------------------------

/// A worker's state, the one word the dispatch thread and the worker use to pass work and to
/// decide who must wake whom (RAMCloud's `Worker::state`).
///
/// - `BUSY`: running a job, or between jobs; not on the idle stack. Set by the dispatcher as it
///   hands over a job. Also the initial state: a worker is not idle until its thread says so.
/// - `SPINNING`: on the idle stack, polling this word. Set by the worker.
/// - `SLEEPING`: on the idle stack, parked. Set by the worker.
///
/// The legal transitions, and nothing else:
/// - `BUSY → SPINNING`, by the worker: its job is done and the FIFO is empty. It stores the state
///   and pushes itself on the idle stack under the pool lock, so the dispatcher never finds it
///   there still `BUSY`.
/// - `SPINNING → BUSY`, by the dispatcher: it popped the worker and put a job in its slot.
/// - `SPINNING → SLEEPING`, by the worker, after `--spin-us` without work: a compare-exchange,
///   which fails if the dispatcher got there first (then the worker takes the job instead).
/// - `SLEEPING → BUSY`, by the dispatcher, which saw `SLEEPING` and so must unpark the worker.
///
/// Why no job or wake-up is lost: the dispatcher writes `BUSY` with a swap, the worker writes
/// `SLEEPING` with a compare-exchange from `SPINNING`, and both are read-modify-writes of one
/// atomic, so one comes first. Swap first: the compare-exchange fails and the worker sees
/// `BUSY` without sleeping. Compare-exchange first: the swap returns `SLEEPING` and the dispatcher
/// unparks. `unpark` before `park` is not lost either (the thread keeps a token), and the worker
/// parks in a loop that rechecks the state, so a spurious return from `park` is harmless.
const BUSY: u8 = 0;
const SPINNING: u8 = 1;
const SLEEPING: u8 = 2;

/// The workers and what waits for them. Generic over the job so the hand-off can be tested alone.
struct Pool<J> {
    workers: Box<[Worker<J>]>,
    waiting: Mutex<Waiting<J>>,
}

struct Waiting<J> {
    /// Idle workers; the most recently idle is last (a LIFO stack).
    idle: Vec<usize>,
    /// Jobs that arrived while every worker was busy, oldest first. Non-empty only while `idle`
    /// is empty: a worker takes from it before going idle.
    queue: VecDeque<J>,
}

struct Worker<J> {
    state: AtomicU8,
    /// The job handed over: filled by the dispatcher before it sets `BUSY`, emptied by the worker
    /// once it sees `BUSY`. Never contended: the state says whose turn it is.
    handed: Mutex<Option<J>>,
    /// Set by the worker before it first goes idle, so it is there for the dispatcher to unpark.
    thread: OnceLock<Thread>,
    stats: &'static WorkerStats,
}

impl<J> Pool<J> {
    fn new(slots: Vec<&'static WorkerStats>) -> Pool<J> {
        let idle = Vec::with_capacity(slots.len());
        let workers = slots.into_iter().map(|stats| Worker {
            // Not idle until its thread runs and pushes itself on the stack.
            state: AtomicU8::new(BUSY),
            handed: Mutex::new(None),
            thread: OnceLock::new(),
            stats,
        });
        Pool {
            waiting: Mutex::new(Waiting {
                idle,
                queue: VecDeque::new(),
            }),
            workers: workers.collect(),
        }
    }

    /// Dispatcher: gives `job` to the most recently idle worker and returns its index, or queues
    /// the job (`None`) if every worker is busy.
    fn submit(&self, job: J) -> Option<usize> {
        let mut waiting = lock(&self.waiting);
        let Some(id) = waiting.idle.pop() else {
            waiting.queue.push_back(job);
            return None;
        };
        drop(waiting);
        let worker = &self.workers[id];
        *lock(&worker.handed) = Some(job);
        if worker.state.swap(BUSY, Ordering::AcqRel) == SLEEPING {
            // It gave up spinning: a futex wake, the hand-off's expensive case.
            if let Some(thread) = worker.thread.get() {
                thread.unpark();
            }
        }
        Some(id)
    }

    /// Worker `id`'s life: run each job it is handed, and before going idle, each queued job.
    fn work(&self, id: usize, spin: Duration, mut run: impl FnMut(J)) -> ! {
        let me = &self.workers[id];
        let _ = me.thread.set(thread::current());
        loop {
            let job = match self.next_queued_or_idle(id) {
                Some(job) => job,
                None => match me.wait_for_hand_off(spin) {
                    Some(job) => job,
                    // Cannot happen (BUSY means the slot is filled); going idle again is safe.
                    None => continue,
                },
            };
            run(job);
        }
    }

    /// Worker `id` is done: the oldest queued job, or else onto the idle stack (`BUSY → SPINNING`).
    fn next_queued_or_idle(&self, id: usize) -> Option<J> {
        let mut waiting = lock(&self.waiting);
        if let Some(job) = waiting.queue.pop_front() {
            return Some(job);
        }
        self.workers[id].state.store(SPINNING, Ordering::Release);
        waiting.idle.push(id);
        None
    }
}

impl<J> Worker<J> {
    /// Spins for `spin`, then sleeps, until the dispatcher sets `BUSY`; then takes the job.
    fn wait_for_hand_off(&self, spin: Duration) -> Option<J> {
        let spin_until = Instant::now() + spin;
        while self.state.load(Ordering::Acquire) != BUSY {
            if Instant::now() < spin_until {
                std::hint::spin_loop();
                continue;
            }
            let tired = self.state.compare_exchange(
                SPINNING,
                SLEEPING,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            if tired.is_ok() {
                while self.state.load(Ordering::Acquire) == SLEEPING {
                    thread::park();
                }
                self.stats.add_extra(WOKEN, 1);
            }
        }
        lock(&self.handed).take()
    }
}

// ---- helpers ----------------------------------------------------------------------------------

/// A request copied out of its connection's buffer so that it can cross to a worker: what
/// [`App`] reads, in one allocation for method, path and query, plus the body and the headers
/// routing reads ([`runtime::ROUTED_HEADERS`]) when there are any.
struct OwnedRequest {
    /// Method, path and query, back to back.
    text: String,
    method_end: usize,
    path_end: usize,
    /// The target had a `?` (an empty query is still a query: it changes the fingerprint).
    has_query: bool,
    /// (index in ROUTED_HEADERS, value)
    headers: Vec<(usize, Box<[u8]>)>,
    body: Vec<u8>,
}

impl OwnedRequest {
    fn copy(req: &Request<'_>) -> OwnedRequest {
        let (method, path, query) = (req.method, req.path(), req.query().unwrap_or(""));
        let mut text = String::with_capacity(method.len() + path.len() + query.len());
        text.push_str(method);
        text.push_str(path);
        text.push_str(query);
        OwnedRequest {
            text,
            method_end: method.len(),
            path_end: method.len() + path.len(),
            has_query: req.query().is_some(),
            headers: runtime::ROUTED_HEADERS
                .iter()
                .enumerate()
                .filter_map(|(i, name)| Some((i, Box::from(req.header(name)?))))
                .collect(),
            body: req.body.to_vec(),
        }
    }
}

impl Routable for OwnedRequest {
    fn method(&self) -> &str {
        &self.text[..self.method_end]
    }
    fn path(&self) -> &str {
        &self.text[self.method_end..self.path_end]
    }
    fn query(&self) -> Option<&str> {
        self.has_query.then(|| &self.text[self.path_end..])
    }
    /// As `proto::Request::query_param` (no query and an empty one answer alike).
    fn query_param(&self, name: &str) -> Option<&str> {
        proto::query_param(&self.text[self.path_end..], name)
    }
    fn header(&self, name: &str) -> Option<&[u8]> {
        let i = runtime::ROUTED_HEADERS
            .iter()
            .position(|h| h.eq_ignore_ascii_case(name))?;
        let found = self.headers.iter().find(|(h, _)| *h == i);
        found.map(|(_, v)| &**v)
    }
    fn body(&self) -> &[u8] {
        &self.body
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    //! The hand-off alone, without sockets: the test thread plays the dispatcher.

    use std::sync::atomic::{AtomicBool, AtomicU64};

    use super::*;

    /// Starts `n` workers that call `run(worker, job)` for each job.
    fn start(
        n: usize,
        spin: Duration,
        run: impl Fn(usize, u64) + Send + Sync + 'static,
    ) -> (Arc<Pool<u64>>, Arc<Stats>) {
        let stats = Arc::new(Stats::new("test", n).with_extra(EXTRA));
        let pool = Arc::new(Pool::new(stats.workers().iter().collect()));
        let run = Arc::new(run);
        for id in 0..n {
            let (pool, run) = (pool.clone(), run.clone());
            thread::Builder::new()
                .name(format!("worker-{}", id + 1))
                .spawn(move || pool.work(id, spin, |job| run(id, job)))
                .expect("spawn a worker");
        }
        (pool, stats)
    }

    /// Waits up to 10 s for `done`; a lost job or wake-up shows up here as a failure, not a hang.
    #[track_caller]
    fn wait_until(what: impl Fn() -> String, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(
                Instant::now() < deadline,
                "still waiting after 10 s: {}",
                what()
            );
            thread::yield_now();
        }
    }

    fn idle<J>(pool: &Pool<J>) -> usize {
        lock(&pool.waiting).idle.len()
    }

    fn states<J>(pool: &Pool<J>) -> Vec<u8> {
        let states = pool.workers.iter().map(|w| w.state.load(Ordering::Relaxed));
        states.collect()
    }

    fn total(stats: &Stats, counter: usize) -> u64 {
        let slots = stats.workers().iter();
        slots
            .map(|w| w.extra[counter].load(Ordering::Relaxed))
            .sum()
    }

    /// With no spinning, every worker goes to sleep the moment it goes idle, so each burst of
    /// hand-offs races the workers' compare-exchange to SLEEPING. Every job must run exactly
    /// once, and nothing may wait forever.
    #[test]
    fn hand_off_under_stress_with_spin_0_loses_nothing() {
        const ROUNDS: u64 = 100_000;
        let done = Arc::new(AtomicU64::new(0));
        let sum = Arc::new(AtomicU64::new(0));
        let (d, s) = (done.clone(), sum.clone());
        let (pool, stats) = start(4, Duration::ZERO, move |_, job| {
            s.fetch_add(job, Ordering::Relaxed);
            d.fetch_add(1, Ordering::Release);
        });
        let (mut submitted, mut expected_sum) = (0, 0);
        for round in 0..ROUNDS {
            // Bursts of 1 to 6: some find an idle worker, some queue behind busy ones.
            for _ in 0..1 + round % 6 {
                submitted += 1;
                expected_sum += submitted;
                pool.submit(submitted);
            }
            wait_until(
                || {
                    format!(
                        "round {round}: {} of {submitted} jobs done; idle {}, states {:?}",
                        done.load(Ordering::Relaxed),
                        idle(&pool),
                        states(&pool)
                    )
                },
                || done.load(Ordering::Acquire) == submitted,
            );
        }
        assert_eq!(sum.load(Ordering::Relaxed), expected_sum);
        assert_eq!(total(&stats, EXECUTED), 0, "the pool itself counts no jobs");
        assert!(
            total(&stats, WOKEN) > ROUNDS / 10,
            "with --spin-us 0, workers should have slept and been woken often: {}",
            total(&stats, WOKEN)
        );
    }

    /// Sequential jobs all go to the same worker, the one that went idle last (LIFO): with
    /// round-robin or FIFO they would spread over the three.
    #[test]
    fn the_most_recently_idle_worker_gets_the_next_job() {
        let done = Arc::new(AtomicU64::new(0));
        let ran_on = Arc::new(Mutex::new(Vec::new()));
        let (d, r) = (done.clone(), ran_on.clone());
        let (pool, _stats) = start(3, Duration::ZERO, move |worker, _| {
            lock(&r).push(worker);
            d.fetch_add(1, Ordering::Release);
        });
        wait_until(|| format!("idle {}", idle(&pool)), || idle(&pool) == 3);
        let last_idle = *lock(&pool.waiting).idle.last().expect("three idle workers");
        for n in 1..=50 {
            assert_eq!(pool.submit(n), Some(last_idle), "job {n}");
            wait_until(
                || format!("job {n}: idle {}", idle(&pool)),
                || done.load(Ordering::Acquire) == n && idle(&pool) == 3,
            );
        }
        assert!(lock(&ran_on).iter().all(|&w| w == last_idle));
    }

    /// When every worker is busy, jobs wait and run in arrival order.
    #[test]
    fn jobs_queued_behind_a_busy_worker_run_in_order() {
        let release = Arc::new(AtomicBool::new(false));
        let order = Arc::new(Mutex::new(Vec::new()));
        let (rel, o) = (release.clone(), order.clone());
        let (pool, _stats) = start(1, Duration::ZERO, move |_, job| {
            while job == 0 && !rel.load(Ordering::Acquire) {
                thread::yield_now();
            }
            lock(&o).push(job);
        });
        wait_until(|| format!("idle {}", idle(&pool)), || idle(&pool) == 1);
        assert_eq!(pool.submit(0), Some(0));
        for job in 1..=100 {
            assert_eq!(pool.submit(job), None, "job {job} should wait in the queue");
        }
        release.store(true, Ordering::Release);
        wait_until(
            || format!("{} of 101 ran", lock(&order).len()),
            || lock(&order).len() == 101,
        );
        assert_eq!(*lock(&order), (0..=100).collect::<Vec<u64>>());
    }

    /// A worker that went to sleep is woken by the hand-off and counts it; one handed work
    /// while it spins never sleeps.
    #[test]
    fn only_a_sleeping_worker_needs_waking() {
        let done = Arc::new(AtomicU64::new(0));
        let d = done.clone();
        let (sleepy, sleepy_stats) = start(1, Duration::ZERO, move |_, _| {
            d.fetch_add(1, Ordering::Release);
        });
        wait_until(
            || format!("state {:?}", states(&sleepy)),
            || states(&sleepy) == [SLEEPING],
        );
        sleepy.submit(1);
        wait_until(|| "the job".into(), || done.load(Ordering::Acquire) == 1);
        assert_eq!(total(&sleepy_stats, WOKEN), 1);

        let d = done.clone();
        // Spins far longer than the test takes.
        let (spinner, spinner_stats) = start(1, Duration::from_secs(2), move |_, _| {
            d.fetch_add(1, Ordering::Release);
        });
        wait_until(
            || format!("idle {}", idle(&spinner)),
            || idle(&spinner) == 1,
        );
        assert_eq!(states(&spinner), [SPINNING]);
        spinner.submit(2);
        wait_until(|| "the job".into(), || done.load(Ordering::Acquire) == 2);
        assert_eq!(total(&spinner_stats, WOKEN), 0);
    }
}
