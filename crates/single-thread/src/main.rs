//! # single-thread: Node.js's event loop
//!
//! One thread does everything: it listens, accepts, reads, parses, runs the handler and writes
//! the reply, for every connection, in one epoll loop. Node.js, Redis (before 6) and nginx with
//! one worker serve this way.
//!
//! ```text
//!                  ┌──────────────── the one thread ────────────────┐
//!   clients ──TCP──▶ listen socket ─accept─▶ epoll ─▶ read ─▶ parse │
//!                  │                          ▲           handler   │
//!                  │                          └── write ◀─ reply ◀──┘
//!                  └────────────────────────────────────────────────┘
//!          --offload:  /work and /block ──▶ rayon pool (offload-N) ──reply──▶ waker ──▶ loop
//! ```
//!
//! Trade-offs: no locks, no context switches, nothing shared, and one core's worth of
//! throughput at most. A slow handler stalls every connection: `GET /work?us=200000` makes
//! every other client wait 200 ms, and that is the lesson. With `--offload`, slow requests run
//! on a thread pool and their replies come back through the loop's waker, as libuv's thread
//! pool does for Node's file system and DNS calls (`--workers` sets the pool size, like
//! `UV_THREADPOOL_SIZE`).
//!
//! Redis's BGSAVE is this pattern's own lesson, answered ahead of the application: with
//! `--dataset-mb N`, an in-memory data set with `POST /snapshot`, a child forked to write it
//! while this thread serves on, by copy-on-write (see `snapshot.rs`).
//!
//! Run: `cargo run --release -p single-thread -- --addr 127.0.0.1:8080 [--offload]`

mod snapshot;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use proto::Request;
use runtime::{
    App, EventLoop, Handler, LoopHandle, Origin, Reply, Route, ServeConfig, ServerArgs, Shutdown,
    Stats,
};

const PATTERN: &str = "single-thread";

#[derive(Parser, Debug)]
#[command(name = PATTERN, about = "One thread listens, accepts, reads, writes and runs every handler (Node.js).")]
struct Args {
    #[command(flatten)]
    server: ServerArgs,

    /// Run /work and /block on a pool of --workers threads instead of the loop thread.
    #[arg(long)]
    offload: bool,

    /// Demo aid: keep an in-memory data set of this many MiB, with `POST /snapshot` (fork a
    /// child that writes it to --snapshot-path while this process serves on).
    #[arg(long, value_name = "MB", value_parser = clap::value_parser!(u32).range(1..=16384))]
    dataset_mb: Option<u32>,

    /// Where `POST /snapshot` writes the data set [default: $TMPDIR/single-thread-PID.snapshot].
    #[arg(long, value_name = "PATH")]
    snapshot_path: Option<PathBuf>,

    /// The snapshot child pauses this long after each MiB it writes, like Redis's
    /// rdb-key-save-delay, so that the copying can be watched while it runs.
    #[arg(long, value_name = "DURATION", value_parser = runtime::cli::duration)]
    snapshot_delay: Option<Duration>,
}

fn main() -> std::io::Result<()> {
    let args: Args = runtime::cli::parse();
    let stats = Arc::new(Stats::new(PATTERN, 1));
    let app = runtime::open_app(PATTERN, &args.server, stats.clone());

    let listener = runtime::listener::bind(&args.server, false)?;
    let addr = listener.local_addr()?;
    let config = ServeConfig::new(PATTERN, &args.server);
    let mut event_loop = EventLoop::new(config, &app, stats.worker(0), Shutdown::new())?;
    event_loop.listen(listener)?;
    event_loop.watch_signals()?;

    let pool = match args.offload {
        true => Some(offload_pool(args.server.workers())?),
        false => None,
    };
    let dataset = match args.dataset_mb {
        Some(mb) => Some(snapshot::DataSet::new(
            mb as usize,
            args.snapshot_path.unwrap_or_else(|| {
                std::env::temp_dir().join(format!("{PATTERN}-{}.snapshot", std::process::id()))
            }),
            args.snapshot_delay.unwrap_or_default(),
        )?),
        None => None,
    };
    let mut handler = Node {
        app,
        pool,
        loop_handle: event_loop.handle(),
        dataset,
    };
    runtime::announce(PATTERN, addr, 1);
    event_loop.run(&mut handler)
}

/// Every request runs on the loop thread, unless it is slow and `--offload` is on.
struct Node {
    app: App,
    pool: Option<rayon::ThreadPool>,
    loop_handle: Arc<LoopHandle>,
    /// `--dataset-mb`: the data set behind `/dataset` and `/snapshot`.
    dataset: Option<snapshot::DataSet>,
}

impl Handler for Node {
    fn handle(&mut self, req: &Request<'_>, origin: Origin) -> Option<Reply> {
        if let Some(reply) = self.dataset.as_mut().and_then(|d| d.route(req)) {
            return Some(reply.into());
        }
        match self.app.route(req) {
            Route::Ready(reply) => Some(reply),
            // The lesson: every other connection waits while this runs.
            Route::Heavy(task) if self.pool.is_none() => Some(task.run().into()),
            Route::Heavy(task) => {
                let loop_handle = self.loop_handle.clone();
                self.pool
                    .as_ref()?
                    .spawn(move || loop_handle.complete(origin, task.run()));
                None
            }
        }
    }
}

fn offload_pool(threads: usize) -> std::io::Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("offload-{i}"))
        .build()
        .map_err(std::io::Error::other)
}
