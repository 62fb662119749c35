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

/// What routing reads from a request. proto's [`Request`], borrowed from its connection's
/// buffer, answers it; so can a copy of a request made to cross to another thread (the
/// load-balanced pattern parses on one thread and handles on another).
pub trait Routable {
    fn method(&self) -> &str;
    /// The path, without the query.
    fn path(&self) -> &str;
    /// The value of query parameter `name`, undecoded.
    fn query_param(&self, name: &str) -> Option<&str>;
    /// The `Content-Type` header's value, if any (`POST /echo` sends it back).
    fn content_type(&self) -> Option<&[u8]>;
    fn body(&self) -> &[u8];
}

impl Routable for Request<'_> {
    fn method(&self) -> &str {
        self.method
    }
    fn path(&self) -> &str {
        Request::path(self)
    }
    fn query_param(&self, name: &str) -> Option<&str> {
        Request::query_param(self, name)
    }
    fn content_type(&self) -> Option<&[u8]> {
        self.header("content-type")
    }
    fn body(&self) -> &[u8] {
        self.body
    }
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
        self.route_any(req)
    }

    /// [`App::route`] for any request that can answer what routing asks, such as a copy of a
    /// request sent to another thread to be handled there.
    pub fn route_any<R: Routable + ?Sized>(&self, req: &R) -> Route {
        let method = req.method();
        let get = matches!(method, "GET" | "HEAD");
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
            ("/echo", _) if method == "POST" => Route::Ready(echo(req)),
            ("/" | "/work" | "/block" | "/stats", false) => Route::Ready(not_allowed("GET, HEAD")),
            ("/echo", _) => Route::Ready(not_allowed("POST")),
            _ if !KNOWN_METHODS.contains(&method) => {
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
        .content_type()
        .and_then(|v| std::str::from_utf8(v).ok())
        .map_or_else(|| "application/octet-stream".to_string(), str::to_string);
    Response::owned(200, content_type, req.body().to_vec())
}

fn not_allowed(allow: &'static str) -> Response {
    Response::text(405, "Method Not Allowed\n").with_header("Allow", allow)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{Body, Conn};

    /// A request copied out of its connection, as a pattern that handles requests on another
    /// thread would make one.
    struct Copied {
        method: String,
        target: String,
        content_type: Option<Vec<u8>>,
        body: Vec<u8>,
    }

    impl Routable for Copied {
        fn method(&self) -> &str {
            &self.method
        }
        fn path(&self) -> &str {
            self.target.split('?').next().unwrap_or_default()
        }
        fn query_param(&self, name: &str) -> Option<&str> {
            let (_, query) = self.target.split_once('?')?;
            proto::query_param(query, name)
        }
        fn content_type(&self) -> Option<&[u8]> {
            self.content_type.as_deref()
        }
        fn body(&self) -> &[u8] {
            &self.body
        }
    }

    /// Status, content type, extra headers, body, or the heavy task.
    fn summary(route: Route) -> String {
        match route {
            Route::Heavy(task) => format!("{task:?}"),
            Route::Ready(r) => {
                let body = match &r.body {
                    Body::Static(b) => b.to_vec(),
                    Body::Owned(b) => b.clone(),
                    Body::Stream => b"<stream>".to_vec(),
                };
                format!(
                    "{} {} {:?} {}",
                    r.status,
                    r.content_type,
                    r.headers,
                    String::from_utf8_lossy(&body)
                )
            }
        }
    }

    #[test]
    fn a_copied_request_routes_like_the_parsed_one() {
        let app = App::new(Arc::new(Stats::new("test", 1)));
        let cases: [&[u8]; 10] = [
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /work?us=5 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /work?us=abc HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /block?x=1&ms=99999 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: a/b\r\nContent-Length: 3\r\n\r\nabc",
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi",
            b"DELETE / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"FOO /nope HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n",
        ];
        for input in cases {
            let now = std::time::Instant::now();
            let mut conn = Conn::new(Arc::new(proto::Config::default()), now);
            conn.read_buf()[..input.len()].copy_from_slice(input);
            conn.filled(input.len(), now);
            let req = conn.next_request().expect("a complete request");
            let copied = Copied {
                method: req.method.to_string(),
                target: req.target.to_string(),
                content_type: req.header("content-type").map(<[u8]>::to_vec),
                body: req.body.to_vec(),
            };
            assert_eq!(
                summary(app.route(&req)),
                summary(app.route_any(&copied)),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }
}
