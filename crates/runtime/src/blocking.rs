//! The blocking connection driver: one thread (or coroutine) serves one connection with plain
//! `read` and `write` calls. Thread-per-connection, coroutine-per-connection and prefork's
//! blocking mode all run this, over the same sans-IO [`proto::Conn`] as the event loop, and so
//! with the same timeouts: each blocking `read` waits at most until the connection's next
//! deadline (`poll_timeout`), and a read that times out hands the time to `handle_timeout`.
//! The socket's send timeout bounds each `write`, so a peer that stops reading is closed
//! instead of holding a thread forever.
//!
//! A held request (a long poll, a reply waiting for a commit) or a stream holds its thread:
//! the thread parks ([`Park`]) until the app's hub calls or the request's deadline passes.
//! That is this pattern's cost of waiting clients: a thread (or a coroutine's stack) each.
//!
//! Shutdown: [`OpenConns::stop_reading`] shuts down the reading side of every tracked socket
//! that waits between requests, so a thread parked in `read` wakes with EOF, writes what it
//! owes, and returns. A connection in the middle of a request is left to finish it, and one
//! that has sent nothing yet keeps the shutdown grace to send its first request (it looks for
//! the shutdown at least once a second rather than lose that request to a woken `read`).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown as Direction;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use app::{App, Pending, Reply, Stream, WorkerStats};
use proto::{Conn, ReqId, Request};

use crate::ServeConfig;
use crate::date::ReplyHeaders;
use crate::held::{self, Upload};

/// How often a connection that has sent nothing yet looks whether shutdown began.
const FRESH_CHECK: Duration = Duration::from_secs(1);

/// What the driver needs of a socket: std's `TcpStream`, or a coroutine library's.
pub trait BlockingStream: Read + Write + AsRawFd {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    fn shutdown(&self, how: Direction) -> io::Result<()>;
}

impl BlockingStream for std::net::TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, timeout)
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        std::net::TcpStream::set_write_timeout(self, timeout)
    }

    fn shutdown(&self, how: Direction) -> io::Result<()> {
        std::net::TcpStream::shutdown(self, how)
    }
}

/// How a blocked thread (or coroutine) waits for the app: std's thread parking, or a
/// coroutine library's, which must not block its carrier thread.
pub trait Park {
    /// Sleeps until unparked or `timeout` passes (`None`: no timeout). An unpark that came
    /// before the park makes it return at once.
    fn park(&self, timeout: Option<Duration>);
    /// A callback that unparks this waiter from any thread (the hub calls it).
    fn unparker(&self) -> Box<dyn Fn() + Send + Sync>;
}

/// std's thread parking.
pub struct ThreadPark(std::thread::Thread);

impl ThreadPark {
    pub fn current() -> ThreadPark {
        ThreadPark(std::thread::current())
    }
}

impl Park for ThreadPark {
    fn park(&self, timeout: Option<Duration>) {
        match timeout {
            Some(t) => std::thread::park_timeout(t),
            None => std::thread::park(),
        }
    }

    fn unparker(&self) -> Box<dyn Fn() + Send + Sync> {
        let thread = self.0.clone();
        Box::new(move || thread.unpark())
    }
}

/// What serving a connection needs besides the socket.
pub struct Context<'a, P: Park> {
    pub config: &'a ServeConfig,
    pub app: &'a App,
    pub stats: &'a WorkerStats,
    pub open: &'a OpenConns,
    pub park: &'a P,
}

/// Serves one connection until it closes, answering each request with `handle` on this thread.
/// Counts the connection and its requests in `cx.stats`, and tracks it in `cx.open` meanwhile.
/// (A pattern whose threads each own a stats slot calls `stats.bind_thread()` once per thread.)
pub fn serve<S: BlockingStream, P: Park>(
    stream: S,
    cx: &Context<'_, P>,
    handle: impl FnMut(&Request<'_>) -> Reply,
) {
    cx.stats.connection_opened();
    let mut stream = stream;
    let tracked = cx.open.track(&stream);
    drive(&mut stream, cx, &tracked, handle);
    // Untrack before the socket closes, so that shutdown never touches a reused descriptor.
    drop(tracked);
    drop(stream);
    cx.stats.connection_closed();
}

fn drive<S: BlockingStream, P: Park>(
    stream: &mut S,
    cx: &Context<'_, P>,
    tracked: &Tracked<'_>,
    mut handle: impl FnMut(&Request<'_>) -> Reply,
) {
    let (config, stats) = (cx.config, cx.stats);
    let mut http = Conn::new(config.conn.clone(), Instant::now());
    let mut headers = ReplyHeaders::new(config.server_name);
    let mut timeout_set = None;
    let mut upload: Option<Box<Upload>> = None;
    // A write that makes no progress for this long fails, and the connection closes.
    if stream
        .set_write_timeout(Some(config.timeouts().send))
        .is_err()
    {
        return;
    }
    loop {
        if let Some(since) = tracked.open.stopping_since() {
            http.stop_reading(since);
        }
        held::feed(&mut upload, &mut http);
        while let Some(req) = http.next_request() {
            stats.request();
            let id = req.id;
            match handle(&req) {
                Reply::Now(reply) => http.respond(id, reply),
                Reply::Later(pending) => http.respond(id, wait(cx, pending)),
                Reply::Body(sink) => upload = Upload::start(&mut http, id, sink),
                Reply::Stream(head, body) => {
                    http.respond(id, head);
                    if !stream_out(stream, cx, &mut http, &mut headers, id, body) {
                        return;
                    }
                }
            }
        }
        // Every reply is ready (handlers ran inline): one write for the whole batch.
        let out = http.output(headers.refresh(), Instant::now());
        if !out.is_empty() {
            let n = out.len();
            if stream.write_all(out).is_err() {
                return;
            }
            http.written(n, Instant::now());
        }
        if http.is_finished() {
            // Half-close, then drain what the peer still sends until it closes or the linger
            // time passes, so that a reset cannot destroy the last reply (lingering close).
            if !http.should_linger() || stream.shutdown(Direction::Write).is_err() {
                return;
            }
            http.begin_linger(Instant::now());
        }
        let phase = if http.requests_read() == 0 && !http.has_partial_request() {
            Phase::Fresh
        } else if http.has_partial_request() || http.owed() > 0 {
            Phase::Busy
        } else {
            Phase::Idle
        };
        if let Some(since) = tracked.set_phase(phase) {
            http.stop_reading(since);
            if http.is_finished() {
                continue;
            }
        }
        let now = Instant::now();
        let mut timeout = http
            .poll_timeout()
            .map(|deadline| deadline.saturating_duration_since(now));
        if phase == Phase::Fresh && tracked.open.stopping_since().is_none() {
            timeout = Some(timeout.map_or(FRESH_CHECK, |t| t.min(FRESH_CHECK)));
        }
        // SO_RCVTIMEO of zero means "no timeout": a deadline already here waits a millisecond.
        let timeout = timeout.map(|t| quantize(t).max(Duration::from_millis(1)));
        if timeout_set != Some(timeout) {
            if stream.set_read_timeout(timeout).is_err() {
                return;
            }
            timeout_set = Some(timeout);
        }
        match read_into(stream, &mut http) {
            Ok(0) => http.read_eof(),
            Ok(_) => {}
            // The read timed out: proto decides what that means (408, an idle close, nothing).
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                http.handle_timeout(Instant::now());
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// The most a read between requests takes in: a whole head from most clients (wrk's is 40
/// bytes, a browser's 400-800); a bigger one is read on into the pooled buffer.
const WAITING_READ: usize = 1024;

/// Reads what the peer sends next into the connection. Between requests the connection gives
/// its buffers back to the thread's pool and waits in a small buffer on this stack, whose pages
/// its thread (or coroutine) has resident anyway; what comes is copied into a pooled buffer.
/// So a connection waiting for its next request holds no buffer of the pool (it held 4 KiB).
fn read_into(stream: &mut impl Read, http: &mut Conn) -> io::Result<usize> {
    http.release_buffers();
    if http.holds_input() {
        let n = stream.read(http.read_buf())?;
        if n > 0 {
            http.filled(n, Instant::now());
        }
        return Ok(n);
    }
    let mut first = [0; WAITING_READ];
    let n = stream.read(&mut first)?;
    http.fill_from(&first[..n], Instant::now());
    Ok(n)
}

/// Parks this thread until the held request has its reply (the hub calls on every change).
fn wait<P: Park>(cx: &Context<'_, P>, mut pending: Pending) -> proto::Response {
    let _subscription = cx.app.hub().subscribe(cx.park.unparker());
    cx.stats.hold();
    let reply = loop {
        let now = Instant::now();
        if let Some(reply) = pending.poll(now) {
            break reply;
        }
        cx.park.park(pending.deadline().map(|d| until(d, now)));
    };
    cx.stats.release();
    reply
}

/// Writes a streamed reply as it is produced: the head and what is buffered first, then each
/// piece the stream gives, parked in between. Returns false if the connection failed.
fn stream_out<S: BlockingStream, P: Park>(
    stream: &mut S,
    cx: &Context<'_, P>,
    http: &mut Conn,
    headers: &mut ReplyHeaders,
    id: ReqId,
    mut body: Stream,
) -> bool {
    let _subscription = cx.app.hub().subscribe(cx.park.unparker());
    cx.stats.hold();
    let mut chunk = Vec::new();
    let ok = loop {
        let out = http.output(headers.refresh(), Instant::now());
        if !out.is_empty() {
            let n = out.len();
            if stream.write_all(out).is_err() {
                break false;
            }
            http.written(n, Instant::now());
        }
        if !http.owes(id) {
            break true;
        }
        let now = Instant::now();
        chunk.clear();
        let open = body.poll(now, &mut chunk, http.stream_budget());
        if !chunk.is_empty() {
            http.push_chunk(id, &chunk);
        }
        if !open {
            http.end_stream(id);
            continue;
        }
        if chunk.is_empty() {
            cx.park.park(body.deadline().map(|d| until(d, now)));
        }
    };
    cx.stats.release();
    ok
}

/// A read timeout rounded up to a quarter second. The time left to a deadline shrinks with
/// every read, and setting it exactly would cost a setsockopt per request; rounded, a
/// keep-alive connection sets it once (its idle timeout), and a deadline is met at most
/// 250 ms late (proto then decides what the timeout means).
fn quantize(t: Duration) -> Duration {
    const STEP_MS: u128 = 250;
    let ms = t.as_millis().div_ceil(STEP_MS) * STEP_MS;
    Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
}

/// How long to park for a deadline: at least a millisecond, since a timer may fire a little
/// early (may's does) and a wait of nearly nothing may never fire at all.
fn until(deadline: Instant, now: Instant) -> Duration {
    deadline
        .saturating_duration_since(now)
        .max(Duration::from_millis(1))
}

/// Where a served connection stands, for shutdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Accepted, nothing received yet: shutdown leaves it its grace.
    Fresh,
    /// Inside a request: shutdown lets it finish.
    Busy,
    /// Between requests: shutdown wakes its `read` (shutting down the reading side).
    Idle,
}

/// The sockets being served, so that shutdown can wake the threads blocked reading them.
#[derive(Default)]
pub struct OpenConns {
    /// Each socket, and its [`Phase`] (see [`Tracked::set_phase`]).
    fds: Mutex<HashMap<RawFd, Arc<AtomicU8>>>,
    stopping: AtomicBool,
    since: OnceLock<Instant>,
}

impl OpenConns {
    /// Tracks `socket` until the returned guard drops; drop the guard before closing the socket.
    pub fn track(&self, socket: &impl AsRawFd) -> Tracked<'_> {
        let fd = socket.as_raw_fd();
        let phase = Arc::new(AtomicU8::new(Phase::Fresh as u8));
        self.fds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fd, phase.clone());
        Tracked {
            open: self,
            fd,
            phase,
        }
    }

    /// Shutdown: every tracked connection stops reading new requests; replies owed still go out,
    /// a request partly received is still read and answered, and a connection that has sent
    /// nothing yet may still send its first request within the shutdown grace.
    pub fn stop_reading(&self) {
        let _ = self.since.set(Instant::now());
        self.stopping.store(true, Ordering::SeqCst);
        for (&fd, phase) in self.fds.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if phase.load(Ordering::SeqCst) == Phase::Idle as u8 {
                // SAFETY: a tracked fd stays open until its guard is dropped, which needs this
                // lock, so the fd cannot be closed (or reused) while we hold it.
                unsafe { libc::shutdown(fd, libc::SHUT_RD) };
            }
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// When shutdown began, if it has.
    pub fn stopping_since(&self) -> Option<Instant> {
        self.is_stopping().then(|| self.since.get().copied())?
    }

    pub fn len(&self) -> usize {
        self.fds.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// How many tracked connections stand at `phase`.
    pub fn count(&self, phase: Phase) -> usize {
        let fds = self.fds.lock().unwrap_or_else(|e| e.into_inner());
        fds.values()
            .filter(|p| p.load(Ordering::Relaxed) == phase as u8)
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Removes a socket from [`OpenConns`] when dropped.
pub struct Tracked<'a> {
    open: &'a OpenConns,
    fd: RawFd,
    phase: Arc<AtomicU8>,
}

impl Tracked<'_> {
    /// Records where the connection stands, and returns when shutdown began, if it has. Both
    /// sides store, then load (SeqCst), so either [`OpenConns::stop_reading`] sees this
    /// connection idle and wakes it, or the connection sees the shutdown before it reads again.
    pub fn set_phase(&self, phase: Phase) -> Option<Instant> {
        if self.phase.load(Ordering::Relaxed) != phase as u8 {
            self.phase.store(phase as u8, Ordering::SeqCst);
        }
        self.open.stopping_since()
    }
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        self.open
            .fds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.fd);
    }
}
