//! The application every server runs, so that a difference in a benchmark belongs to the
//! pattern. Routing is cheap and always runs where the request was parsed; `/work` and
//! `/block` come back as a [`Task`] that the pattern decides where to run.
//!
//! | request            | reply                                                       |
//! |--------------------|-------------------------------------------------------------|
//! | `GET /`            | `Hello, World!` (the benchmark request; no allocation)      |
//! | `GET /work?us=N`   | N µs of CPU work (hashing), at most 1 s                     |
//! | `GET /block?ms=N`  | blocks the thread N ms, at most 10 s: a synchronous DB call |
//! | `POST /echo`       | the request body                                            |
//! | `GET /stats`       | per-worker counters as JSON                                 |

use std::sync::Arc;
use std::time::Duration;

use proto::{Request, Response};

use crate::Stats;

pub const MAX_WORK_US: u64 = 1_000_000;
pub const MAX_BLOCK_MS: u64 = 10_000;

const KNOWN_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// What routing decided.
pub enum Route {
    /// The reply, ready now.
    Ready(Response),
    /// Slow work: run it here (and stall whatever else this thread serves) or elsewhere.
    Heavy(Task),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// Burn this many microseconds of CPU.
    Work { us: u64 },
    /// Sleep this many milliseconds, holding the thread.
    Block { ms: u64 },
}

#[derive(Clone)]
pub struct App {
    stats: Arc<Stats>,
}

impl App {
    pub fn new(stats: Arc<Stats>) -> App {
        App { stats }
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    pub fn route(&self, req: &Request<'_>) -> Route {
        let get = matches!(req.method, "GET" | "HEAD");
        match (req.path(), get) {
            ("/", true) => Route::Ready(Response::text(200, "Hello, World!")),
            ("/work", true) => match number(req, "us", MAX_WORK_US) {
                Ok(us) => Route::Heavy(Task::Work { us }),
                Err(r) => Route::Ready(r),
            },
            ("/block", true) => match number(req, "ms", MAX_BLOCK_MS) {
                Ok(ms) => Route::Heavy(Task::Block { ms }),
                Err(r) => Route::Ready(r),
            },
            ("/stats", true) => Route::Ready(Response::owned(
                200,
                "application/json",
                self.stats.to_json().into_bytes(),
            )),
            ("/echo", _) if req.method == "POST" => Route::Ready(echo(req)),
            ("/" | "/work" | "/block" | "/stats", false) => Route::Ready(not_allowed("GET, HEAD")),
            ("/echo", _) => Route::Ready(not_allowed("POST")),
            _ if !KNOWN_METHODS.contains(&req.method) => {
                Route::Ready(Response::text(501, "Not Implemented\n"))
            }
            _ => Route::Ready(Response::text(404, "Not Found\n")),
        }
    }

    /// Routes, and runs a heavy task right here: for patterns where the request's thread is
    /// the one that should pay for it.
    pub fn handle_inline(&self, req: &Request<'_>) -> Response {
        match self.route(req) {
            Route::Ready(r) => r,
            Route::Heavy(task) => task.run(),
        }
    }
}

impl Task {
    pub fn run(self) -> Response {
        match self {
            Task::Work { us } => {
                let (rounds, digest) = burn_cpu(Duration::from_micros(us));
                let body = format!("worked {us} us: {rounds} hash rounds, digest {digest:016x}\n");
                Response::owned(200, "text/plain", body.into_bytes())
            }
            Task::Block { ms } => {
                std::thread::sleep(Duration::from_millis(ms));
                Response::owned(200, "text/plain", format!("blocked {ms} ms\n").into_bytes())
            }
        }
    }
}

/// Hashes until this thread has used `cpu` of CPU time (not wall time: a preempted worker still
/// does the full amount of work).
fn burn_cpu(cpu: Duration) -> (u64, u64) {
    let start = thread_cpu_time();
    let mut digest = 0x9e37_79b9_7f4a_7c15_u64;
    let mut rounds = 0u64;
    while thread_cpu_time() - start < cpu {
        for _ in 0..256 {
            // splitmix64: cheap, and the optimizer cannot skip it since the digest is printed.
            digest = digest.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = digest;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            digest ^= z ^ (z >> 31);
        }
        rounds += 256;
    }
    (rounds, digest)
}

fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Query parameter `name` as a whole number, capped at `max`.
fn number(req: &Request<'_>, name: &str, max: u64) -> Result<u64, Response> {
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

fn echo(req: &Request<'_>) -> Response {
    let content_type = req
        .header("content-type")
        .and_then(|v| std::str::from_utf8(v).ok())
        .map_or_else(|| "application/octet-stream".to_string(), str::to_string);
    Response::owned(200, content_type, req.body.to_vec())
}

fn not_allowed(allow: &'static str) -> Response {
    Response::text(405, "Method Not Allowed\n").with_header("Allow", allow)
}
