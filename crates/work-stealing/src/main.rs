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
use proto::{Conn, Response};
use runtime::date::ReplyHeaders;
use runtime::listener::{AcceptBackoff, is_out_of_resources};
use runtime::{App, LoopConfig, Route, ServerArgs, Stats, Task};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::{Instant, sleep};

const PATTERN: &str = "work-stealing";

/// How long a closing connection may keep draining what its peer still sends.
const LINGER: Duration = Duration::from_secs(2);

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
    config: LoopConfig,
    offload: bool,
}

fn main() -> io::Result<()> {
    let args: Args = runtime::cli::parse();
    let workers = args.server.workers();
    let stats = Arc::new(Stats::new(PATTERN, workers).with_extra(&["migrated_in"]));
    let service = Arc::new(Service {
        app: App::new(stats.clone()),
        config: LoopConfig::new(PATTERN, &args.server),
        offload: args.offload,
    });

    let listener = runtime::listener::bind(&args.server, false)?;
    let addr = listener.local_addr()?;
    let rt = build_runtime(workers, stats)?;
    let (stop, stopping) = watch::channel(false);
    rt.block_on(async {
        // Registered before the start-up line, so that a signal sent right after it counts.
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let listener = TcpListener::from_std(listener)?;
        tokio::spawn(accept_loop(listener, service, stopping));
        runtime::announce(PATTERN, addr, workers);
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        io::Result::Ok(())
    })?;

    // Stop accepting and reading new requests; replies in flight still go out.
    stop.send_replace(true);
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
async fn accept_loop(
    listener: TcpListener,
    service: Arc<Service>,
    mut stopping: watch::Receiver<bool>,
) {
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
            () = stopped(&mut stopping) => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stopped(&mut stopping) => return,
        };
        match accepted {
            Ok((stream, _)) => {
                backoff.succeeded();
                // Counted where it was accepted; `serve` closes it in the same slot.
                let slot = this_worker();
                stats.worker(slot).connection_opened();
                tokio::spawn(serve(
                    stream,
                    service.clone(),
                    slot,
                    stopping.clone(),
                    permit,
                ));
            }
            Err(e) if is_out_of_resources(&e) => {
                // The connection stays queued and the socket readable: retrying now would spin.
                let pause = backoff.failed();
                eprintln!("{PATTERN}: accept: {e}; pausing accepts for {pause:?}");
                tokio::select! {
                    () = sleep(pause) => {}
                    () = stopped(&mut stopping) => return,
                }
            }
            // The peer gave up while queued (ECONNABORTED) and the like: take the next one.
            Err(_) => {}
        }
    }
}

// ---- one connection --------------------------------------------------------------------

/// One connection's task, from accept to close. It holds its `--max-conns` permit and a
/// shutdown receiver until it returns.
async fn serve(
    mut stream: TcpStream,
    service: Arc<Service>,
    accepted_on: usize,
    mut stopping: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    drive(&mut stream, &service, accepted_on, &mut stopping).await;
    drop(stream);
    service.app.stats().worker(accepted_on).connection_closed();
}

/// The async twin of `runtime::blocking`'s driver: serve what is buffered, write the replies
/// in one write, close if done, else read more, racing the read against the connection's
/// deadline and shutdown. Each `.await` may resume on another worker.
async fn drive(
    stream: &mut TcpStream,
    service: &Service,
    accepted_on: usize,
    stopping: &mut watch::Receiver<bool>,
) {
    let config = &service.config;
    let stats = service.app.stats();
    let mut http = Conn::new(config.limits);
    let mut headers = ReplyHeaders::new(config.server_name);
    let mut head_started: Option<Instant> = None;
    let mut last_worker = accepted_on;
    // One timer for the connection's life, moved as its deadline changes: pushing a deadline
    // later is an atomic store in tokio, not a trip to the timer wheel.
    let deadline = sleep(config.idle_timeout);
    tokio::pin!(deadline);
    loop {
        while let Some(req) = http.next_request() {
            // Counted on the worker serving it, which may not be the one that served the last.
            let here = this_worker();
            stats.worker(here).request();
            if here != last_worker {
                stats.worker(here).add_extra(MIGRATED_IN, 1);
                last_worker = here;
            }
            head_started = None;
            let id = req.id;
            let reply = match service.app.route(&req) {
                Route::Ready(reply) => reply,
                Route::Heavy(task) => run_heavy(task, service.offload).await,
            };
            http.respond(id, reply);
        }
        // Every reply is ready (heavy ones were awaited): one write for the whole batch.
        let out = http.output(headers.refresh());
        if !out.is_empty() {
            let n = out.len();
            // A peer that stops reading our output is closed after --idle-timeout.
            deadline
                .as_mut()
                .reset(Instant::now() + config.idle_timeout);
            let wrote = tokio::select! {
                biased;
                written = stream.write_all(out) => written.is_ok(),
                () = &mut deadline => false,
            };
            if !wrote {
                return;
            }
            http.written(n);
        }
        if http.is_finished() {
            if http.should_linger() {
                linger(stream).await;
            }
            return;
        }
        if *stopping.borrow() {
            http.stop_reading();
            continue;
        }
        // The header timeout runs from a head's first byte; a body only has to keep flowing.
        let until = if http.has_partial_request() && !http.reading_body() {
            *head_started.get_or_insert_with(Instant::now) + config.header_timeout
        } else {
            Instant::now() + config.idle_timeout
        };
        deadline.as_mut().reset(until);
        // Read first: a ready socket needs neither the timer nor the shutdown flag polled.
        tokio::select! {
            biased;
            read = stream.read(http.read_buf()) => match read {
                // The peer is done sending; what it asked for is still answered.
                Ok(0) => http.read_eof(),
                Ok(n) => http.filled(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Reset by the peer, or worse: nobody is left to answer.
                Err(_) => return,
            },
            // 408 for a request cut short, a quiet close for an idle connection.
            () = &mut deadline => http.timed_out(),
            () = stopped(stopping) => http.stop_reading(),
        }
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

/// Half-closes, then reads and discards until the peer closes or `LINGER` passes, so that a
/// reset cannot destroy the last reply (nginx's lingering close).
async fn linger(stream: &mut TcpStream) {
    if stream.shutdown().await.is_err() {
        return;
    }
    // On the heap: an array here would be part of every connection task's state.
    let mut scratch = vec![0u8; 4096];
    let drain = async {
        while let Ok(n) = stream.read(&mut scratch).await
            && n > 0
        {}
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

// ---- helpers ---------------------------------------------------------------------------

thread_local! {
    /// This thread's worker index, set in `on_thread_start`; `None` off the workers.
    static WORKER: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// The `/stats` slot of the worker running the caller. Tasks only run on workers, so the
/// fallback to slot 0 is never taken.
fn this_worker() -> usize {
    WORKER.get().unwrap_or(0)
}

/// Resolves once shutdown has begun (or the sender is gone, which means the same).
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|&stop| stop).await;
}
