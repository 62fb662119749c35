//! # work-stealing: tokio's multi-thread runtime, a task per connection
//!
//! Every connection is a task: a small state machine (an `async fn`) that the runtime polls
//! when its socket is ready. N worker threads each run tasks from their own queue; a worker
//! whose queue is empty steals half of another's, so the load spreads without anyone deciding
//! where a connection goes. The epoll set and the timers are polled by whichever worker has
//! nothing else to do, and a task woken by an event is queued on that worker. The code reads
//! like blocking code (`read(..).await`), but a task waiting for input holds no thread.
//! tokio (axum, hyper, Linkerd, Deno), Go's scheduler, Java's ForkJoinPool and Rayon all
//! balance work this way.
//!
//! ```text
//!          ┌─────────────────────── tokio runtime ───────────────────────────┐
//!          │  worker-0                              worker-1                 │
//!          │  ┌──────────────────┐    steal half    ┌──────────────────┐     │
//!          │  │ run queue        │◀────────────────▶│ run queue        │     │
//!          │  │ accept task      │                  │ conn task        │     │
//!          │  │ conn task  ...   │                  │ conn task  ...   │     │
//!          │  └────────▲─────────┘                  └────────▲─────────┘     │
//!          │           └──── woken tasks ── epoll + timers ──┘               │
//!          │                 (polled by whichever worker is idle)            │
//! clients ─TCP─▶ listen socket ──accept (a task)──▶ spawn(conn task)         │
//!          └─────────────────────────────────────────────────────────────────┘
//!   main thread: waits for SIGTERM/SIGINT, then for the tasks to finish
//!   --offload: /work, /block ──spawn_blocking──▶ offload-N threads ──reply──▶ awaiting task
//! ```
//!
//! Trade-offs: every core works and a busy worker's backlog is taken by an idle one, with no
//! dispatcher thread and no per-connection thread. The price is the machinery: task wake-ups,
//! shared queues and a timer wheel, and tasks that migrate between threads (so nothing
//! per-thread can be assumed, and state must be `Send`). Scheduling is cooperative: `/work` and
//! `/block` run inline on the worker and stall it. Tasks queued behind them wait until an idle
//! worker steals them (never the one in its LIFO slot), and if the stalled worker was the one
//! parked on the I/O driver, socket events wait until another worker wakes up, which tokio
//! does not promise to do (tokio#4730). With `--workers 1`, everything waits. `--offload` sends
//! them to tokio's blocking pool (`spawn_blocking`); the connection task awaits the reply
//! without holding a worker, so replies stay in order.
//!
//! Run: `cargo run --release -p work-stealing -- --addr 127.0.0.1:8080 --workers 2 [--offload]`

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clap::Parser;
use proto::{Conn, ReqId, Response};
use runtime::date::ReplyHeaders;
use runtime::held::{self, Upload};
use runtime::listener::{AcceptBackoff, is_out_of_resources};
use runtime::{App, BodySink, Pending, Reply, Route, ServeConfig, ServerArgs, Stats, Stream, Task};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::{Instant, sleep};

const PATTERN: &str = "work-stealing";

/// The extra counter in each worker's `/stats` slot: requests of a connection whose previous
/// request (or accept) ran on another worker (see [`drive`]).
const MIGRATED_IN: usize = 0;

#[derive(Parser, Debug)]
#[command(name = PATTERN, about = "A task per connection on tokio's multi-thread work-stealing runtime.")]
struct Args {
    #[command(flatten)]
    server: ServerArgs,

    /// Run /work and /block on tokio's blocking pool (spawn_blocking) instead of the worker.
    #[arg(long)]
    offload: bool,
}

/// What every connection task shares.
struct Service {
    app: App,
    config: ServeConfig,
    offload: bool,
    /// Notified whenever the app's hub calls: held requests and streams poll again.
    moved: Arc<Notify>,
    /// Notified once, when shutdown begins (`stopped_at` is set first).
    stop: Notify,
    stopped_at: std::sync::OnceLock<std::time::Instant>,
}

fn main() -> io::Result<()> {
    let args: Args = runtime::cli::parse();
    let workers = args.server.workers();
    let stats = Arc::new(Stats::new(PATTERN, workers).with_extra(&["migrated_in"]));
    let app = runtime::open_app(PATTERN, &args.server, stats.clone());
    let moved = Arc::new(Notify::new());
    let notify = moved.clone();
    let _subscription = app.hub().subscribe(move || notify.notify_waiters());
    let service = Arc::new(Service {
        app,
        config: ServeConfig::new(PATTERN, &args.server),
        offload: args.offload,
        moved,
        stop: Notify::new(),
        stopped_at: std::sync::OnceLock::new(),
    });

    let listener = runtime::listener::bind(&args.server, false)?;
    let addr = listener.local_addr()?;
    let rt = build_runtime(workers, stats)?;
    // `Some(when)` once shutdown began; connections time their shutdown grace from it.
    let (stop, stopping) = watch::channel(None);
    rt.block_on(async {
        // Registered before the start-up line, so that a signal sent right after it counts.
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let listener = TcpListener::from_std(listener)?;
        tokio::spawn(accept_loop(listener, service.clone(), stopping));
        runtime::announce(PATTERN, addr, workers);
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        io::Result::Ok(())
    })?;

    // Stop accepting and reading new requests; replies in flight still go out, and held
    // requests answer with what they have.
    let since = std::time::Instant::now();
    let _ = service.stopped_at.set(since);
    service.stop.notify_waiters();
    stop.send_replace(Some(since));
    service.app.stop();
    // Each task holds a receiver, so none left means all are done. Waited for on this thread's
    // clock: tokio's timers fire only when a worker is free to drive them, and every worker
    // may be busy with an inline /block.
    let deadline = std::time::Instant::now() + args.server.shutdown_timeout;
    while stop.receiver_count() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    // Whatever is still running past --shutdown-timeout is abandoned.
    rt.shutdown_background();
    Ok(())
}

/// `--workers` threads named `worker-N`, each bound to its `/stats` slot. tokio starts its
/// workers first, through the same thread factory as its blocking pool, so the first N names
/// are the workers' and later threads belong to the blocking pool (`--offload`).
fn build_runtime(workers: usize, stats: Arc<Stats>) -> io::Result<tokio::runtime::Runtime> {
    let spawned = AtomicUsize::new(0);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name_fn(move || match spawned.fetch_add(1, Ordering::Relaxed) {
            i if i < workers => format!("worker-{i}"),
            i => format!("offload-{}", i - workers),
        })
        .on_thread_start(move || {
            let name = std::thread::current().name().map(str::to_owned);
            if let Some(i) = name.and_then(|n| n.strip_prefix("worker-")?.parse().ok())
                && i < workers
            {
                WORKER.set(Some(i));
                stats.worker(i).bind_thread();
            }
        })
        .enable_all()
        .build()
}

// ---- accepting -------------------------------------------------------------------------

/// One task accepts and spawns a task per connection. It is a task like the others: it runs
/// on whichever worker picked it up, and can be stolen too.
async fn accept_loop(listener: TcpListener, service: Arc<Service>, mut stopping: Stopping) {
    let permits = Arc::new(Semaphore::new(
        service.config.max_conns.min(Semaphore::MAX_PERMITS),
    ));
    let mut backoff = AcceptBackoff::default();
    let stats = service.app.stats().clone();
    loop {
        // At --max-conns, wait here for a connection to close; new ones wait in the kernel's
        // accept queue meanwhile.
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return, // closed: never, the semaphore is ours
            },
            _ = stopped(&mut stopping) => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped(&mut stopping) => return,
        };
        match accepted {
            Ok((stream, _)) => {
                backoff.succeeded();
                // Counted where it was accepted; `serve` closes it in the same slot.
                let slot = this_worker();
                stats.worker(slot).connection_opened();
                let fut = serve(stream, service.clone(), slot, stopping.clone(), permit);
                tokio::spawn(fut);
            }
            Err(e) if is_out_of_resources(&e) => {
                // The connection stays queued and the socket readable: retrying now would spin.
                let pause = backoff.failed();
                eprintln!("{PATTERN}: accept: {e}; pausing accepts for {pause:?}");
                tokio::select! {
                    () = sleep(pause) => {}
                    _ = stopped(&mut stopping) => return,
                }
            }
            // The peer gave up while queued (ECONNABORTED) and the like: take the next one.
            Err(_) => {}
        }
    }
}

// ---- one connection --------------------------------------------------------------------

/// One connection's task, from accept to close. It holds its `--max-conns` permit and a
/// shutdown receiver (the main thread counts them to know when every task is done) until it
/// returns.
fn serve(
    stream: TcpStream,
    service: Arc<Service>,
    accepted_on: usize,
    stopping: Stopping,
    permit: OwnedSemaphorePermit,
) -> impl Future<Output = ()> {
    // One async fn for the whole life (not a wrapper around `drive`), so that the task stores
    // its arguments once.
    drive(stream, service, accepted_on, (stopping, permit))
}

/// Counts the connection closed when its task ends, however it ends.
struct Closed<'a>(&'a Arc<Service>, usize);

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        self.0.app.stats().worker(self.1).connection_closed();
    }
}

/// A request that cannot be answered at once: heavy work, a held request, or a stream.
enum Awaited {
    Heavy(Task),
    Later(Pending),
    Stream(Stream),
    /// An upload: its body is fed to the app as the connection reads it.
    Body(Box<BodySink>),
}

/// The async twin of `runtime::blocking`'s driver: serve what is buffered, write the replies,
/// close if done, else wait for input, racing it against the connection's next deadline (proto
/// decides which) and shutdown. Each `.await` may resume on another worker.
///
/// An idle keep-alive connection is this task, parked: it holds no buffer (it waits for
/// readability, then borrows one from the pool), and the task is kept small, since every idle
/// connection pays for its largest await: requests are routed in a plain function, and what
/// must be awaited at length (heavy work, a long poll, a stream) is boxed while it runs.
async fn drive(
    mut stream: TcpStream,
    service: Arc<Service>,
    accepted_on: usize,
    _held_until_done: (Stopping, OwnedSemaphorePermit),
) {
    let closed = Closed(&service, accepted_on);
    let (stream, service): (&mut TcpStream, &Service) = (&mut stream, closed.0);
    let config = &service.config;
    let mut http = Conn::new(config.conn.clone(), std::time::Instant::now());
    let mut last_worker = accepted_on;
    // One timer for the connection's life, moved as its deadline changes: moving a deadline
    // later is an atomic store in tokio, not a trip to the timer wheel.
    let deadline = sleep(Duration::from_secs(86_400));
    tokio::pin!(deadline);
    let mut stop_seen = false;
    let mut upload: Option<Box<Upload>> = None;
    loop {
        if let Some(&since) = service.stopped_at.get() {
            http.stop_reading(since);
            stop_seen = true;
        }
        held::feed(&mut upload, &mut http);
        while let Some((id, awaited)) = route_buffered(&mut http, service, &mut last_worker) {
            match *awaited {
                Awaited::Heavy(task) => {
                    let reply = Box::pin(run_heavy(task, service.offload)).await;
                    http.respond(id, reply);
                }
                Awaited::Later(pending) => {
                    let reply = Box::pin(wait(service, pending)).await;
                    http.respond(id, reply);
                }
                Awaited::Stream(body) => {
                    let out = Out {
                        stream,
                        http: &mut http,
                        deadline: deadline.as_mut(),
                    };
                    if !Box::pin(stream_out(out, service, id, body)).await {
                        return;
                    }
                }
                Awaited::Body(sink) => upload = Upload::start(&mut http, id, sink),
            }
        }
        // Every reply is ready (heavy ones were awaited): write them, as the peer takes them.
        let flushed = {
            let mut out = Out {
                stream,
                http: &mut http,
                deadline: deadline.as_mut(),
            };
            out.flush().await
        };
        if !flushed {
            return;
        }
        if http.is_finished() {
            // Half-close, then drain what the peer still sends until it closes or the linger
            // time passes, so that a reset cannot destroy the last reply (lingering close).
            if !http.should_linger() || stream.shutdown().await.is_err() {
                return;
            }
            http.begin_linger(std::time::Instant::now());
        }
        http.release_buffers();
        set_deadline(deadline.as_mut(), &http);
        // Registered before the flag is looked at, so a shutdown right after still wakes us.
        let stop = service.stop.notified();
        tokio::pin!(stop);
        stop.as_mut().enable();
        if service.stopped_at.get().is_some() && !stop_seen {
            continue;
        }
        // Readiness first: a ready socket needs neither the timer nor the shutdown polled.
        tokio::select! {
            biased;
            ready = stream.readable() => {
                if ready.is_err() {
                    return;
                }
                match read_ready(stream, &mut http) {
                    // The peer is done sending; what it asked for is still answered.
                    Some(Ok(0)) => http.read_eof(),
                    Some(Ok(n)) => http.filled(n, std::time::Instant::now()),
                    Some(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                    // Reset by the peer, or worse: nobody is left to answer.
                    Some(Err(_)) => return,
                    // The readiness was stale: wait again.
                    None => {}
                }
            }
            // A 408 for a request cut short, an idle close, the end of a linger: proto decides.
            () = &mut deadline => http.handle_timeout(std::time::Instant::now()),
            // Shutdown: the loop's top stops the reading.
            () = stop => {}
        }
    }
}

/// Routes the requests buffered on the connection, answering those that are ready now, until
/// one must be awaited (boxed: only such requests pay for the allocation).
fn route_buffered(
    http: &mut Conn,
    service: &Service,
    last_worker: &mut usize,
) -> Option<(ReqId, Box<Awaited>)> {
    let stats = service.app.stats();
    while let Some(req) = http.next_request() {
        // Counted on the worker serving it, which may not be the one that served the last.
        let here = this_worker();
        stats.worker(here).request();
        if here != *last_worker {
            stats.worker(here).add_extra(MIGRATED_IN, 1);
            *last_worker = here;
        }
        let id = req.id;
        let awaited = match service.app.route(&req) {
            Route::Ready(Reply::Now(reply)) => {
                http.respond(id, reply);
                continue;
            }
            Route::Ready(Reply::Later(pending)) => Awaited::Later(pending),
            Route::Ready(Reply::Stream(head, body)) => {
                http.respond(id, head);
                Awaited::Stream(body)
            }
            Route::Ready(Reply::Body(sink)) => Awaited::Body(sink),
            Route::Heavy(task) => Awaited::Heavy(task),
        };
        return Some((id, Box::new(awaited)));
    }
    None
}

/// A connection's output side: its socket, protocol state and timer.
struct Out<'a> {
    stream: &'a mut TcpStream,
    http: &'a mut Conn,
    deadline: std::pin::Pin<&'a mut tokio::time::Sleep>,
}

impl Out<'_> {
    /// Writes what is ready, as the peer takes it; false if the connection failed.
    async fn flush(&mut self) -> bool {
        loop {
            let now = std::time::Instant::now();
            let pending =
                HEADERS.with_borrow_mut(|h| !self.http.output(h.refresh(), now).is_empty());
            if !pending {
                return true;
            }
            set_deadline(self.deadline.as_mut(), self.http);
            let out = self.http.unsent_output();
            tokio::select! {
                biased;
                written = self.stream.write(out) => match written {
                    Ok(n) => self.http.written(n, std::time::Instant::now()),
                    Err(_) => return false,
                },
                // A peer that takes nothing for --send-timeout is closed.
                () = &mut self.deadline => self.http.handle_timeout(std::time::Instant::now()),
            }
        }
    }
}

/// Holds the task (not a worker) until the held request has its reply: woken when the app's
/// hub calls, or at the request's deadline.
async fn wait(service: &Service, mut pending: Pending) -> Response {
    let slot = this_worker();
    service.app.stats().worker(slot).hold();
    let reply = loop {
        // Registered before looking, so a change right after the look still wakes us.
        let moved = service.moved.notified();
        tokio::pin!(moved);
        moved.as_mut().enable();
        if let Some(reply) = pending.poll(std::time::Instant::now()) {
            break reply;
        }
        match pending.deadline() {
            Some(at) => {
                tokio::select! {
                    () = moved => {}
                    () = tokio::time::sleep_until(Instant::from_std(at)) => {}
                }
            }
            None => moved.await,
        }
    };
    service.app.stats().worker(slot).release();
    reply
}

/// Writes a streamed reply as it is produced; false if the connection failed.
async fn stream_out(mut out: Out<'_>, service: &Service, id: ReqId, mut body: Stream) -> bool {
    let slot = this_worker();
    service.app.stats().worker(slot).hold();
    let mut chunk = Vec::new();
    let ok = loop {
        if !out.flush().await {
            break false;
        }
        if !out.http.owes(id) {
            break true;
        }
        let moved = service.moved.notified();
        tokio::pin!(moved);
        moved.as_mut().enable();
        chunk.clear();
        let budget = out.http.stream_budget();
        let open = body.poll(std::time::Instant::now(), &mut chunk, budget);
        if !chunk.is_empty() {
            out.http.push_chunk(id, &chunk);
        }
        if !open {
            out.http.end_stream(id);
            continue;
        }
        if chunk.is_empty() {
            let until = body.deadline().map_or_else(
                || Instant::now() + Duration::from_secs(86_400),
                Instant::from_std,
            );
            tokio::select! {
                () = moved => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
    };
    service.app.stats().worker(slot).release();
    ok
}

/// Reads what the socket has into the connection's buffer, once the socket said it is
/// readable. Through `poll_read`, not `try_read`: after a short read tokio clears the
/// readiness (the socket is drained), which spares the next read that would only return
/// WouldBlock (one read per request, as the event loop does). Polled once, with no waker: if
/// the readiness was stale, `None`, and the caller waits for readability again.
fn read_ready(stream: &mut TcpStream, http: &mut Conn) -> Option<io::Result<usize>> {
    use tokio::io::AsyncRead;
    let mut buf = tokio::io::ReadBuf::new(http.read_buf());
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::Pin::new(stream).poll_read(&mut cx, &mut buf) {
        std::task::Poll::Ready(Ok(())) => Some(Ok(buf.filled().len())),
        std::task::Poll::Ready(Err(e)) => Some(Err(e)),
        std::task::Poll::Pending => None,
    }
}

/// Moves the connection's timer to its next deadline (far away if it has none).
fn set_deadline(timer: std::pin::Pin<&mut tokio::time::Sleep>, http: &Conn) {
    let when = http.poll_timeout().map_or_else(
        || Instant::now() + Duration::from_secs(86_400),
        Instant::from_std,
    );
    if timer.deadline() != when {
        timer.reset(when);
    }
}

/// `/work` or `/block`: inline on this worker (stalling it and the tasks queued behind it), or
/// on the blocking pool while this task waits without holding a worker.
async fn run_heavy(task: Task, offload: bool) -> Response {
    if !offload {
        return task.run();
    }
    match tokio::task::spawn_blocking(move || task.run()).await {
        Ok(reply) => reply,
        // The task panicked (the release build aborts instead).
        Err(_) => Response::error(500),
    }
}

// ---- helpers ---------------------------------------------------------------------------

thread_local! {
    /// The headers every reply carries, one copy per worker thread rather than one per
    /// connection (`Date` is re-formatted at most once a second).
    static HEADERS: std::cell::RefCell<ReplyHeaders> =
        std::cell::RefCell::new(ReplyHeaders::new(PATTERN));

    /// This thread's worker index, set in `on_thread_start`; `None` off the workers.
    static WORKER: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The `/stats` slot of the worker running the caller. Tasks only run on workers, so the
/// fallback to slot 0 is never taken.
fn this_worker() -> usize {
    WORKER.get().unwrap_or(0)
}

/// Resolves once shutdown has begun (or the sender is gone, which means the same).
async fn stopped(stopping: &mut Stopping) {
    let _ = stopping.wait_for(Option::is_some).await;
}

/// The shutdown signal every task watches: `Some(when)` once it began.
type Stopping = watch::Receiver<Option<std::time::Instant>>;
