//! The blocking connection driver: one thread (or coroutine) serves one connection with plain
//! `read` and `write` calls. Thread-per-connection, coroutine-per-connection and prefork's
//! blocking mode all run this, over the same sans-IO [`proto::Conn`] as the event loop.
//!
//! Timeouts are read timeouts: the remaining header time while a request is arriving, the idle
//! time between requests; and a write timeout of the idle time, so that a peer that stops
//! reading its replies is closed (as the event loop closes it) instead of holding a thread
//! forever. Shutdown: [`OpenConns::stop_reading`] shuts down the reading side of every tracked
//! socket that waits for a new request, so a thread parked in `read` wakes with EOF, writes what
//! it owes, and returns; a connection in the middle of receiving a request (a large body, say)
//! is left to finish it, and stops after its reply.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown as Direction;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::{Conn, Request, Response};

use crate::date::ReplyHeaders;
use crate::event_loop::LoopConfig;
use crate::stats::WorkerStats;

/// How long a closing connection may keep draining what its peer still sends.
const LINGER: Duration = Duration::from_secs(2);

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

/// Serves one connection until it closes, answering each request with `handle` on this thread.
/// Counts the connection and its requests in `stats`, and tracks it in `open` meanwhile.
/// (A pattern whose threads each own a stats slot calls `stats.bind_thread()` once per thread.)
pub fn serve<S: BlockingStream>(
    stream: S,
    config: &LoopConfig,
    stats: &WorkerStats,
    open: &OpenConns,
    handle: impl FnMut(&Request<'_>) -> Response,
) {
    stats.connection_opened();
    let mut stream = stream;
    let tracked = open.track(&stream);
    drive(&mut stream, config, stats, &tracked, handle);
    // Untrack before the socket closes, so that shutdown never touches a reused descriptor.
    drop(tracked);
    drop(stream);
    stats.connection_closed();
}

fn drive<S: BlockingStream>(
    stream: &mut S,
    config: &LoopConfig,
    stats: &WorkerStats,
    tracked: &Tracked<'_>,
    mut handle: impl FnMut(&Request<'_>) -> Response,
) {
    let mut http = Conn::new(config.limits);
    let mut headers = ReplyHeaders::new(config.server_name);
    let mut head_started: Option<Instant> = None;
    let mut timeout_set = None;
    // A write that makes no progress for this long fails, and the connection closes.
    if stream.set_write_timeout(Some(config.idle_timeout)).is_err() {
        return;
    }
    loop {
        while let Some(req) = http.next_request() {
            stats.request();
            head_started = None;
            let id = req.id;
            let reply = handle(&req);
            http.respond(id, reply);
        }
        // Every reply is ready (handlers ran inline): one write for the whole batch.
        let out = http.output(headers.refresh());
        if !out.is_empty() {
            let n = out.len();
            if stream.write_all(out).is_err() {
                return;
            }
            http.written(n);
        }
        if http.is_finished() {
            if http.should_linger() {
                linger(stream);
            }
            return;
        }
        // Shutdown stops a connection between requests; one inside a request finishes it first.
        let idle = !http.has_partial_request();
        if tracked.set_idle(idle) && idle {
            http.stop_reading();
            continue;
        }
        // As in the event loop: the header timeout runs from a head's first byte; a body may take
        // longer, as long as each read makes progress within the idle timeout.
        let timeout = if !idle && !http.reading_body() {
            let started = *head_started.get_or_insert_with(Instant::now);
            config
                .header_timeout
                .saturating_sub(started.elapsed())
                .max(Duration::from_millis(1))
        } else {
            config.idle_timeout
        };
        if timeout_set != Some(timeout) {
            if stream.set_read_timeout(Some(timeout)).is_err() {
                return;
            }
            timeout_set = Some(timeout);
        }
        match stream.read(http.read_buf()) {
            Ok(0) => http.read_eof(),
            Ok(n) => http.filled(n),
            // The read timed out: 408 for a request cut short, a quiet close for an idle one.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                http.timed_out();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Half-closes, then reads and discards until the peer closes or `LINGER` passes, so that a
/// reset cannot destroy the last reply (nginx's lingering close).
fn linger<S: BlockingStream>(stream: &mut S) {
    if stream.shutdown(Direction::Write).is_err() || stream.set_read_timeout(Some(LINGER)).is_err()
    {
        return;
    }
    let deadline = Instant::now() + LINGER;
    let mut scratch = [0u8; 4096];
    while Instant::now() < deadline {
        match stream.read(&mut scratch) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// The sockets being served, so that shutdown can wake the threads blocked reading them.
#[derive(Default)]
pub struct OpenConns {
    /// Each socket, and whether it waits for a new request (see [`Tracked::set_idle`]).
    fds: Mutex<HashMap<RawFd, Arc<AtomicBool>>>,
    stopping: AtomicBool,
}

impl OpenConns {
    /// Tracks `socket` until the returned guard drops; drop the guard before closing the socket.
    pub fn track(&self, socket: &impl AsRawFd) -> Tracked<'_> {
        let fd = socket.as_raw_fd();
        let idle = Arc::new(AtomicBool::new(true));
        self.fds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fd, idle.clone());
        if self.is_stopping() {
            // SAFETY: `fd` is the caller's open socket, borrowed for this call.
            unsafe { libc::shutdown(fd, libc::SHUT_RD) };
        }
        Tracked {
            open: self,
            fd,
            idle,
        }
    }

    /// Shutdown: every tracked connection stops reading new requests; replies owed still go out,
    /// and a request partly received is still read and answered.
    pub fn stop_reading(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for (&fd, idle) in self.fds.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            // A connection inside a request is not idle: it sees `stopping` once it is.
            if idle.load(Ordering::SeqCst) {
                // SAFETY: a tracked fd stays open until its guard is dropped, which needs this
                // lock, so the fd cannot be closed (or reused) while we hold it.
                unsafe { libc::shutdown(fd, libc::SHUT_RD) };
            }
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub fn len(&self) -> usize {
        self.fds.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Removes a socket from [`OpenConns`] when dropped.
pub struct Tracked<'a> {
    open: &'a OpenConns,
    fd: RawFd,
    idle: Arc<AtomicBool>,
}

impl Tracked<'_> {
    /// Marks the connection as waiting for a new request (`true`) or inside one (`false`), and
    /// returns whether shutdown has begun. Both sides store, then load (SeqCst), so either
    /// [`OpenConns::stop_reading`] sees this connection idle and wakes it, or the connection
    /// sees the shutdown before it reads again.
    pub fn set_idle(&self, idle: bool) -> bool {
        if self.idle.load(Ordering::Relaxed) != idle {
            self.idle.store(idle, Ordering::SeqCst);
        }
        self.open.is_stopping()
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
