//! The application every server runs, so that a difference in a benchmark belongs to the
//! pattern. It decides *what* to answer and *when*; it never touches a socket. Routing is cheap
//! and runs where the request was parsed; `/work` and `/block` come back as a [`Task`] that the
//! pattern decides where to run; a request that waits comes back as a [`Pending`] and a push
//! as a [`Stream`], which every driver holds the same way (see [`Reply`]).
//!
//! | request                         | reply                                                   |
//! |---------------------------------|---------------------------------------------------------|
//! | `GET /`                         | `Hello, World!` (the benchmark request; no allocation)  |
//! | `GET /work?us=N`                | N µs of CPU work (hashing), at most 1 s                 |
//! | `GET /block?ms=N`               | blocks the thread N ms, at most 10 s: a synchronous call|
//! | `POST /echo`                    | the request body                                        |
//! | `GET /split`                    | `Hello, World!` in two writes: the head, then the body  |
//! | `GET /stats`                    | per-worker counters, jobs and journal, as JSON          |
//! | `POST /jobs?work_us=N`          | 202 + `Location`: an async job (or `?sleep_ms=N`)       |
//! | `GET /jobs/ID[?wait=30s]`       | the job's state: short poll, or long poll until done    |
//! | `DELETE /jobs/ID`               | cancels a queued or running job                         |
//! | `POST /messages`                | 201 `{"seq": N}`: a chat message, appended to the log   |
//! | `GET /messages?after=N[&wait=]` | the messages after N: short poll, or long poll          |
//! | `GET /events[?type=message]`    | Server-Sent Events: every record from now (or after     |
//! |                                 | `Last-Event-ID`), as it is appended                     |
//! | `OPTIONS/POST /files/`          | tus 1.0.0 resumable uploads: create (201 + `Location`)  |
//! | `HEAD/PATCH/DELETE /files/ID`   | its offset; bytes at an offset, streamed to disk; delete|
//! | `GET /files/ID`                 | a finished upload's bytes                               |
//! | `POST /upload`                  | a plain streamed upload (not resumable): size, SHA-256  |
//!
//! Every job and message is a record in one [`journal`] that all the server's threads and
//! processes share; each process keeps a view of it (jobs' states, recent events) that catches
//! up whenever the journal moves, and a [`Hub`] that tells the drivers so.

mod args;
mod commit;
mod events;
mod hub;
mod idempotency;
mod jobs;
mod messages;
mod problem;
mod records;
mod reply;
pub mod stats;
mod task;
mod upload;
mod view;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use journal::Journal;
use proto::{Request, Response};

pub use args::{AppArgs, Commit};
pub use hub::{Hub, Subscription};
pub use jobs::JobRole;
pub use reply::{Pending, Reply, Stream};
pub use stats::{EXTRA_COUNTERS, Stats, WorkerStats};
pub use task::{MAX_BLOCK_MS, MAX_WORK_US, Task};
pub use upload::{BodySink, TUS_VERSION, streams_body};
pub use view::{Event, EventKind};

use problem::problem;
use reply::{StreamKind, Wait};
use view::View;

/// `GET /dashboard`: one self-contained page (no external file: it works offline) that watches
/// `/stats/stream` and `/events`.
const DASHBOARD: &str = include_str!("dashboard.html");

const KNOWN_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// Every request header routing reads: a copy of a request made to cross to another thread
/// needs only these.
pub const ROUTED_HEADERS: &[&str] = &[
    "content-type",
    "prefer",
    "last-event-id",
    "idempotency-key",
    "tus-resumable",
];

/// What routing decided.
pub enum Route {
    /// A reply (now, later, or streamed).
    Ready(Reply),
    /// Slow work: run it here (and stall whatever else this thread serves) or elsewhere.
    Heavy(Task),
}

/// What routing reads from a request. proto's [`Request`], borrowed from its connection's
/// buffer, answers it; so can a copy of a request made to cross to another thread (the
/// load-balanced pattern parses on one thread and handles on another).
pub trait Routable {
    fn method(&self) -> &str;
    /// The path, without the query.
    fn path(&self) -> &str;
    /// The query (after `?`), if any.
    fn query(&self) -> Option<&str>;
    /// The value of query parameter `name`, undecoded.
    fn query_param(&self, name: &str) -> Option<&str>;
    /// The first header named `name` (case-insensitive).
    fn header(&self, name: &str) -> Option<&[u8]>;
    fn body(&self) -> &[u8];
}

impl Routable for Request<'_> {
    fn method(&self) -> &str {
        self.method
    }
    fn path(&self) -> &str {
        Request::path(self)
    }
    fn query(&self) -> Option<&str> {
        Request::query(self)
    }
    fn query_param(&self, name: &str) -> Option<&str> {
        Request::query_param(self, name)
    }
    fn header(&self, name: &str) -> Option<&[u8]> {
        Request::header(self, name)
    }
    fn body(&self) -> &[u8] {
        self.body
    }
}

/// The application of one process: cheap to clone (all clones share one state).
#[derive(Clone)]
pub struct App {
    inner: Arc<Inner>,
}

struct Inner {
    pattern: &'static str,
    stats: Arc<Stats>,
    journal: Arc<Journal>,
    view: Mutex<View>,
    hub: Hub,
    commit: commit::Committer,
    jobs: jobs::Jobs,
    stopping: AtomicBool,
    /// `--sse-keep-alive`: a silent event stream sends a comment this often.
    sse_keep_alive: std::time::Duration,
    /// `--require-idempotency-key`, `--idempotency-ttl`.
    require_key: bool,
    key_ttl: std::time::Duration,
    uploads: upload::Uploads,
}

impl App {
    /// Opens the journal under `--data-dir` (recovering it, and printing one line about it) and
    /// builds the view of it. Starts no thread: a prefork master opens the app, forks, and each
    /// worker calls [`App::start`].
    pub fn open(pattern: &'static str, stats: Arc<Stats>, args: &AppArgs) -> io::Result<App> {
        let dir = args.data_dir(pattern);
        let config = journal::Config {
            dir: dir.clone(),
            segment_bytes: args.segment_mb << 20,
            retain_bytes: args.retain_mb << 20,
        };
        let (journal, recovery) = Journal::open(config).map_err(|e| match e {
            journal::OpenError::Locked { pid: Some(pid), .. } => io::Error::other(format!(
                "--data-dir {}: in use by another server (pid {pid}); give each server its own",
                dir.display()
            )),
            e => io::Error::other(format!("--data-dir {}: {e}", dir.display())),
        })?;
        eprintln!("{pattern}: {recovery}");
        let uploads = upload::Uploads::open(
            &dir,
            args.max_upload,
            args.upload_expiry,
            args.commit == Commit::Sync,
        )
        .map_err(|e| io::Error::other(format!("--data-dir {}: uploads: {e}", dir.display())))?;
        let journal = Arc::new(journal);
        let mut view = View::default();
        view.catch_up(&journal);
        Ok(App {
            inner: Arc::new(Inner {
                pattern,
                stats,
                commit: commit::Committer::new(args),
                jobs: jobs::Jobs::new(args),
                view: Mutex::new(view),
                journal,
                hub: Hub::default(),
                stopping: AtomicBool::new(false),
                sse_keep_alive: args.sse_keep_alive,
                require_key: args.require_idempotency_key,
                key_ttl: args.idempotency_ttl,
                uploads,
            }),
        })
    }

    /// Starts this process's threads: the journal watcher (it catches the view up after every
    /// append, by any process, and notifies the hub), the committer, and the job workers.
    /// Call it once per process, after any fork.
    pub fn start(&self) -> io::Result<()> {
        self.start_with(JobRole::Run)
    }

    /// [`App::start`], with the jobs this process accepts run as `role` says (a process per
    /// connection hands them to a background process, which runs [`JobRole::Run`]).
    pub fn start_with(&self, role: JobRole) -> io::Result<()> {
        let watcher = self.clone();
        std::thread::Builder::new()
            .name("journal-watch".into())
            .spawn(move || watcher.watch_journal())?;
        commit::start(self)?;
        jobs::start(self, role)
    }

    /// Shutdown: every held request answers with what it has now, and streams end.
    pub fn stop(&self) {
        if !self.inner.stopping.swap(true, Ordering::SeqCst) {
            self.inner.hub.notify();
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.inner.stats
    }

    /// Tells subscribers whenever the journal moved, a write became durable, or shutdown began.
    pub fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    pub fn journal(&self) -> &Journal {
        &self.inner.journal
    }

    /// The view, caught up with the journal (read-your-writes across processes: another
    /// process's append is seen as soon as it is published, whether or not the watcher has
    /// woken yet).
    fn view(&self) -> MutexGuard<'_, View> {
        let mut view = hub::lock(&self.inner.view);
        if self.inner.journal.head() > view.applied {
            view.catch_up(&self.inner.journal);
            self.inner.jobs.saw_queued(view.queued_records);
        }
        view
    }

    /// Brings this process's view of the journal up to the head: a process that forks children
    /// (a process per connection) does it before each fork, so that they inherit it.
    pub fn catch_up(&self) {
        drop(self.view());
    }

    /// One thread per process: sleeps in FUTEX_WAIT on the journal's generation word, which
    /// any process's append bumps, then catches the view up and notifies the hub.
    fn watch_journal(&self) {
        let journal = &self.inner.journal;
        loop {
            let seen = journal.generation();
            drop(self.view());
            self.inner.hub.notify();
            journal.wait_for_change(seen, std::time::Duration::from_secs(3600));
        }
    }

    // ---- routing ---------------------------------------------------------------------------

    /// Every route but the cheapest is a function of its own, never inlined here: a stackful
    /// coroutine parked after `GET /` keeps resident every stack page this frame touched.
    pub fn route<R: Routable + ?Sized>(&self, req: &R) -> Route {
        let method = req.method();
        let get = matches!(method, "GET" | "HEAD");
        let path = req.path();
        let reply = match (path, get) {
            ("/", true) => Response::text(200, "Hello, World!").into(),
            ("/work", true) => match number(req, "us", MAX_WORK_US) {
                Ok(us) => return Route::Heavy(Task::Work { us }),
                Err(r) => r.into(),
            },
            ("/block", true) => match number(req, "ms", MAX_BLOCK_MS) {
                Ok(ms) => return Route::Heavy(Task::Block { ms }),
                Err(r) => r.into(),
            },
            ("/stats", true) => self.stats_reply().into(),
            ("/stats/stream", true) => self.stats_stream(req),
            ("/dashboard", true) => Response {
                content_type: "text/html; charset=utf-8".into(),
                ..Response::text(200, DASHBOARD)
            }
            .into(),
            ("/split", true) => self.split(),
            ("/echo", _) if method == "POST" => echo(req).into(),
            ("/jobs", _) if method == "POST" => self.post_job(req),
            ("/messages", true) => self.get_messages(req),
            ("/events", true) => self.get_events(req),
            ("/messages", _) if method == "POST" => self.post_message(req),
            ("/files" | "/upload", _) => self.files(req),
            (p, _) if p.starts_with("/files/") => self.files(req),
            (p, _) if p.starts_with("/jobs/") => match method {
                "GET" | "HEAD" => self.get_job(req, &p["/jobs/".len()..]),
                "DELETE" => self.delete_job(&p["/jobs/".len()..]),
                _ => not_allowed("GET, HEAD, DELETE").into(),
            },
            (
                "/" | "/work" | "/block" | "/stats" | "/split" | "/events" | "/stats/stream"
                | "/dashboard",
                false,
            ) => not_allowed("GET, HEAD").into(),
            ("/echo" | "/jobs", _) => not_allowed("POST").into(),
            ("/messages", _) => not_allowed("GET, HEAD, POST").into(),
            _ if !KNOWN_METHODS.contains(&method) => {
                Response::text(501, "Not Implemented\n").into()
            }
            _ => Response::text(404, "Not Found\n").into(),
        };
        Route::Ready(reply)
    }

    /// Routes, and runs a heavy task right here: for patterns where the request's thread is
    /// the one that should pay for it.
    pub fn handle_inline<R: Routable + ?Sized>(&self, req: &R) -> Reply {
        match self.route(req) {
            Route::Ready(reply) => reply,
            Route::Heavy(task) => Reply::Now(task.run()),
        }
    }

    #[inline(never)]
    fn stats_reply(&self) -> Response {
        Response::owned(200, "application/json", self.stats_json().into_bytes())
    }

    /// `GET /stats/stream[?interval=1s]`: `/stats` as Server-Sent Events, one `event: stats`
    /// every interval (100 ms to 60 s), for the dashboard.
    #[inline(never)]
    fn stats_stream<R: Routable + ?Sized>(&self, req: &R) -> Reply {
        let interval = match req.query_param("interval").map(flags::duration) {
            None => std::time::Duration::from_secs(1),
            Some(Ok(d)) if (100..=60_000).contains(&d.as_millis()) => d,
            Some(_) => {
                return problem(400, "interval: expected a duration from 100ms to 60s").into();
            }
        };
        let head = Response::stream(200, "text/event-stream")
            .with_header("Cache-Control", "no-store")
            .with_header("X-Accel-Buffering", "no");
        let stream = Stream {
            app: self.clone(),
            kind: StreamKind::Stats {
                interval,
                started: false,
            },
            next: Some(Instant::now()),
        };
        Reply::Stream(head, stream)
    }

    /// The `/stats` document: every worker's counters (of every process), the hub, the jobs
    /// and the journal.
    pub fn stats_json(&self) -> String {
        let (queued, running) = self.view().job_counts();
        let j = self.inner.journal.stats();
        let more = format!(
            "\"hub\":{{\"subscribers\":{},\"notifications\":{}}},\
             \"jobs\":{{\"queued\":{queued},\"running\":{running}}},\
             \"journal\":{{\"head\":{},\"durable\":{},\"first_seq\":{},\"appends\":{},\
             \"fdatasyncs\":{},\"synced_records\":{},\"fdatasyncs_per_record\":{:.3},\
             \"segments_rolled\":{},\"segments_deleted\":{}}}",
            self.inner.hub.subscribers(),
            self.inner.hub.notifications(),
            j.head,
            j.durable,
            j.first_seq,
            j.appends,
            j.fdatasyncs,
            j.synced_records,
            // Group commit: one fdatasync makes every record written before it durable.
            j.fdatasyncs as f64 / j.synced_records.max(1) as f64,
            j.segments_rolled,
            j.segments_deleted
        );
        self.inner.stats.to_json(&more)
    }

    /// `GET /split`: the head leaves in one write, the body in the next (for Nagle's
    /// algorithm: a second small write waits for the first one's ACK unless TCP_NODELAY).
    #[inline(never)]
    fn split(&self) -> Reply {
        let stream = Stream {
            app: self.clone(),
            kind: StreamKind::Split {
                body: Some(b"Hello, World!"),
            },
            next: Some(Instant::now()),
        };
        Reply::Stream(Response::stream(200, "text/plain"), stream)
    }

    /// This process, as the owner of what it takes on (jobs, first requests of keys).
    fn owner(&self) -> records::Owner {
        self.inner.jobs.me()
    }

    /// Appends a record in `tx`. When it opened a new segment, the live state (unfinished jobs,
    /// unexpired idempotency keys) is appended again after it, so that retention can delete old
    /// segments safely.
    fn append(&self, tx: &mut journal::Tx<'_>, kind: u8, payload: &[u8]) -> io::Result<u64> {
        let appended = tx.append(kind, payload)?;
        if appended.rolled {
            self.carry_jobs_forward(tx)?;
            self.carry_keys_forward(tx)?;
        }
        Ok(appended.seq)
    }

    // ---- held requests ---------------------------------------------------------------------

    /// A reply that is due once `seq` is durable: at once with `--commit async`, after the
    /// group commit that covers it with `--commit sync`.
    fn after_commit(&self, seq: u64, reply: Response) -> Reply {
        if !self.inner.commit.waits() || self.inner.journal.durable() >= seq {
            return Reply::Now(reply);
        }
        self.inner.commit.want(seq);
        Reply::Later(Pending {
            app: self.clone(),
            wait: Wait::Durable {
                seq,
                reply: Some(reply),
            },
            until: None,
        })
    }

    fn poll_wait(&self, wait: &mut Wait, expired: bool) -> Option<Response> {
        match wait {
            Wait::Durable { seq, reply } => {
                if self.inner.journal.durable() >= *seq {
                    return reply.take();
                }
                if self.is_stopping() {
                    // Not acknowledged: the write may or may not survive a crash.
                    return Some(problem(
                        503,
                        "the server is stopping before this write was made durable; retry",
                    ));
                }
                None
            }
            Wait::Messages { after, limit } => self.poll_messages(*after, *limit, expired),
            Wait::Job {
                id,
                durable,
                accepted,
                key,
            } => {
                let reply = self.poll_job(*id, *durable, *accepted, expired)?;
                if let Some(key) = key.take() {
                    self.record_final(key, &reply);
                }
                Some(reply)
            }
        }
    }
}

/// Query parameter `name` as a whole number, capped at `max`.
fn number<R: Routable + ?Sized>(req: &R, name: &str, max: u64) -> Result<u64, Response> {
    match req.query_param(name).map(str::parse::<u64>) {
        Some(Ok(n)) => Ok(n.min(max)),
        _ => {
            let msg = format!(
                "expected {}?{name}=N (a whole number, at most {max})\n",
                req.path()
            );
            Err(Response::owned(400, "text/plain", msg.into_bytes()))
        }
    }
}

fn echo<R: Routable + ?Sized>(req: &R) -> Response {
    let content_type = req
        .header("content-type")
        .and_then(|v| std::str::from_utf8(v).ok())
        .map_or_else(|| "application/octet-stream".to_string(), str::to_string);
    Response::owned(200, content_type, req.body().to_vec())
}

pub(crate) fn not_allowed(allow: &'static str) -> Response {
    Response::text(405, "Method Not Allowed\n").with_header("Allow", allow)
}

#[cfg(test)]
mod tests;
