//! `--trace`: when each step of a request happened, for the anatomy of a request (accepted,
//! first byte, head parsed, whole request in, reply filed, reply fully written). Off unless
//! [`Config::trace`](crate::Config) is set; a connection then carries one boxed [`Tracer`] and
//! reads the clock at each step. Off, it costs a `None` per connection.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// One request's timeline, handed to the trace hook once its reply is fully written.
#[derive(Clone, Debug)]
pub struct Trace {
    /// Counts connections from 1 in this process.
    pub conn: u64,
    /// The request's place on its connection, from 0.
    pub request: u64,
    pub method: String,
    pub target: String,
    pub status: u16,
    /// When the connection was taken on (`Conn::new`).
    pub accepted: Instant,
    /// When the first byte of the request's head was read.
    pub first_byte: Instant,
    /// When the head was parsed.
    pub parsed: Instant,
    /// When the whole request was in (after its body), and handed to the application. For a
    /// streamed body, when the head was handed out.
    pub received: Instant,
    /// When the reply was filed (`Conn::respond`).
    pub handled: Option<Instant>,
    /// When the reply's last byte was taken by the socket.
    pub written: Instant,
    /// Bytes of the reply, head included.
    pub bytes_out: u64,
}

static CONNS: AtomicU64 = AtomicU64::new(0);

#[derive(Debug)]
pub(crate) struct Tracer {
    conn: u64,
    accepted: Instant,
    requests: u64,
    /// The head being read began at this time.
    head_began: Option<Instant>,
    /// The head being read was parsed at this time (its body may still be coming).
    head_parsed: Option<Instant>,
    /// One entry per reply owed, in order, as `Conn::slots`.
    owed: VecDeque<Trace>,
    /// Replies encoded: the output offset (in bytes ever encoded) where each ends.
    encoded: VecDeque<(u64, u64, Trace)>,
    /// Bytes the socket has taken, ever.
    written: u64,
    /// Where the streamed reply at the front began, in bytes ever encoded.
    pub stream_began: u64,
}

impl Tracer {
    pub fn new(now: Instant) -> Box<Tracer> {
        Box::new(Tracer {
            conn: CONNS.fetch_add(1, Ordering::Relaxed) + 1,
            accepted: now,
            requests: 0,
            head_began: None,
            head_parsed: None,
            owed: VecDeque::new(),
            encoded: VecDeque::new(),
            written: 0,
            stream_began: 0,
        })
    }

    /// Bytes of a new head arrived. (The clock is read here rather than taken from the
    /// caller: an event loop passes the time it woke, which may be well before.)
    pub fn head_begins(&mut self) {
        self.head_began.get_or_insert_with(Instant::now);
    }

    pub fn head_parsed(&mut self) {
        self.head_parsed = Some(Instant::now());
    }

    /// A request was handed out. `more` bytes behind it arrived at `last_fill` at the latest.
    pub fn handed_out(&mut self, method: &str, target: &str, more: bool, last_fill: Instant) {
        let now = Instant::now();
        let first_byte = self.head_began.take().unwrap_or(last_fill);
        let parsed = self.head_parsed.take().unwrap_or(now);
        self.push(method, target, first_byte, parsed, now);
        if more {
            self.head_began = Some(last_fill);
        }
    }

    /// proto's own error reply (no request was handed out for it).
    pub fn error(&mut self, status: u16) {
        let now = Instant::now();
        let first_byte = self.head_began.take().unwrap_or(now);
        self.push("", "", first_byte, now, now);
        if let Some(t) = self.owed.back_mut() {
            t.status = status;
            t.handled = Some(now);
        }
    }

    fn push(
        &mut self,
        method: &str,
        target: &str,
        first_byte: Instant,
        parsed: Instant,
        at: Instant,
    ) {
        self.owed.push_back(Trace {
            conn: self.conn,
            request: self.requests,
            method: method.to_string(),
            target: target.to_string(),
            status: 0,
            accepted: self.accepted,
            first_byte,
            parsed,
            received: at,
            handled: None,
            written: at,
            bytes_out: 0,
        });
        self.requests += 1;
    }

    /// The reply at `index` among those owed was filed with `status` (proto's own error may
    /// take the place of a later one: the first filing counts).
    pub fn responded(&mut self, index: usize, status: u16) {
        if let Some(t) = self.owed.get_mut(index)
            && t.handled.is_none()
        {
            t.status = status;
            t.handled = Some(Instant::now());
        }
    }

    /// The first reply owed is all encoded; it ends `unsent` bytes from now.
    pub fn encoded(&mut self, unsent: usize, began_at: u64) {
        if let Some(t) = self.owed.pop_front() {
            self.encoded
                .push_back((began_at, self.written + unsent as u64, t));
        }
    }

    /// Where the output stands now, in bytes ever encoded.
    pub fn output_at(&self, unsent: usize) -> u64 {
        self.written + unsent as u64
    }

    /// The replies still owed will never be written.
    pub fn drop_owed(&mut self) {
        self.owed.clear();
    }

    /// The socket took `n` more bytes: every reply now fully out goes to `emit`.
    pub fn written(&mut self, n: usize, emit: fn(&Trace)) {
        self.written += n as u64;
        let now = Instant::now();
        while let Some((began, end, _)) = self.encoded.front()
            && *end <= self.written
        {
            let bytes = end - began;
            let (_, _, mut t) = self.encoded.pop_front().expect("checked above");
            t.written = now;
            t.bytes_out = bytes;
            emit(&t);
        }
    }
}
