//! One HTTP/1.1 connection as a state machine: the caller moves bytes between it and a socket,
//! and tells it the time; the connection decides what the bytes mean and when it has waited too
//! long (quinn-proto's `poll_timeout`/`handle_timeout`), so every driver applies one policy.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use crate::chunked::Decoder;
use crate::head::{self, Framing, Head, HeaderPos, Version};
use crate::pool;
use crate::response::{self, CommonHeaders, ReplyMeta, Response};
use crate::trace::Tracer;
use crate::{Config, Request};

/// Never offer the socket less room than this to read into.
const MIN_READ: usize = 2048;
/// An emptied output buffer larger than this is compacted or given back to the allocator.
const SHRINK_ABOVE: usize = 64 * 1024;
/// Stop reading and parsing while this much output waits for the peer (backpressure).
pub const OUTPUT_HIGH_WATER: usize = 256 * 1024;

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Names one request on its connection, so that its reply can be filed later, in any order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReqId(u64);

/// Where the reader stands.
#[derive(Debug)]
enum Reading {
    /// Waiting for (the rest of) a request head.
    Head,
    /// The head is parsed; its body is not all here yet.
    Body(Head, BodyProgress),
    /// A request whose body is streamed has been handed out; its body arrives in pieces
    /// through [`Conn::body_chunk`] and [`Conn::consume_body`].
    Streaming(Streamed),
    /// No more requests on this connection: after `Connection: close`, an error, or EOF.
    Stopped,
}

/// A streamed body in progress. Its undelivered bytes are `input[start..]` (Content-Length),
/// or `input[start..decoder.write]`, decoded in place (chunked).
#[derive(Debug)]
struct Streamed {
    /// The request it belongs to.
    id: u64,
    framing: StreamFraming,
    /// Read the next request afterwards.
    keep_alive: bool,
    expect_continue: bool,
    /// The request was answered before its whole body came: what still arrives is dropped.
    discard: bool,
}

#[derive(Debug)]
enum StreamFraming {
    Length {
        left: u64,
    },
    Chunked {
        decoder: Decoder,
        total: u64,
        done: bool,
    },
}

/// What a streamed body has for the caller now.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyChunk<'a> {
    /// The next piece: pass it on, then [`Conn::consume_body`] as much as was taken.
    Data(&'a [u8]),
    /// Nothing buffered: read more from the socket.
    Wait,
    /// The body is complete (or there is no streamed body).
    Done,
    /// The body will never be complete: the peer closed, or its framing is bad (the
    /// connection then answers the request 400 itself and closes).
    Broken,
}

/// Unconsumed streamed body bytes past which reading waits for the caller to take some.
const STREAM_BUFFER: usize = 64 * 1024;

#[derive(Debug)]
enum BodyProgress {
    Length,
    Chunked(Decoder),
}

/// A reply slot, in request order.
#[derive(Debug)]
pub(crate) struct Slot {
    meta: ReplyMeta,
    state: SlotState,
    /// Chunks of a streamed reply that arrived before the slot reached the front, already framed.
    early: Vec<u8>,
    ended: bool,
    /// A sized stream's bytes still owed ([`Body::Sized`](crate::Body)).
    sized_left: u64,
}

#[derive(Debug)]
enum SlotState {
    /// The handler has not answered yet.
    Waiting,
    /// Answered; written when every earlier reply has been.
    Ready(Response),
    /// At the front, head written: chunks go straight to the output.
    Streaming,
}

/// One connection's protocol state: its input buffer, the replies it owes in order, the bytes
/// waiting to be written, and the clock readings its timeouts run from.
#[derive(Debug)]
pub struct Conn {
    config: Arc<Config>,
    /// Lent by the thread's pool while bytes are in flight; empty (no allocation) while idle.
    input: Vec<u8>,
    /// Unconsumed input is `input[start..end]`; the rest of `input` is room to read into.
    start: usize,
    end: usize,
    reading: Reading,
    /// Where the headers of the last parsed head are; lent with `input`.
    positions: Vec<HeaderPos>,
    /// Replies owed, in request order; lent by the pool while any are owed.
    slots: VecDeque<Slot>,
    /// The id of `slots[0]`; ids count up from there.
    first_id: u64,
    /// Encoded output; lent by the pool while any waits to be written.
    out: Vec<u8>,
    out_pos: usize,
    /// A reply that ends the connection has been written (or the stream is over): write nothing more.
    out_closed: bool,
    continue_sent: bool,
    eof: bool,
    /// The last reply is an error about the request: the peer may still be sending its body.
    failed: bool,
    /// Bytes of a partial head already looked at: a head can only end at a newline, so it is
    /// parsed again only when new bytes bring one (no quadratic work for a trickled head).
    head_scanned: u32,
    /// Shutdown asked for no further requests: the one partly received is still finished.
    stopping: bool,
    /// Closed at once, nothing more to write: the peer stopped reading for too long.
    aborted: bool,
    /// The lingering close is over (the peer closed, or the time ran out).
    linger_done: bool,
    /// Body bytes of replies filed but not yet encoded (waiting behind an earlier reply, or
    /// for the socket to take more): they count toward backpressure as much as `out` does.
    queued: usize,
    clock: Clock,
    /// `--trace`: each request's timeline (see [`crate::Trace`]); `None` when off.
    tracer: Option<Box<Tracer>>,
}

/// The readings the timeouts run from. Which deadline applies depends on what the connection
/// is doing; [`Conn::poll_timeout`] picks it.
#[derive(Debug)]
struct Clock {
    /// Idle: since the last reply went out (or the accept). A head partly received: since its
    /// first byte (not its last: a client trickling a header line every second is still cut
    /// off, which is what stops slowloris). A body: since it last made progress.
    read_since: Instant,
    /// When the last read brought bytes.
    last_fill: Instant,
    /// Output waiting for the peer: since the socket last took some.
    send_since: Option<Instant>,
    /// At shutdown, until when a connection that has sent nothing yet may send its request.
    grace_until: Option<Instant>,
    /// Lingering close: until when input is drained and dropped; `Some` once lingering began.
    linger_until: Option<Instant>,
}

impl Conn {
    /// A connection accepted at `now`. It holds no buffer until bytes arrive.
    pub fn new(config: Arc<Config>, now: Instant) -> Conn {
        let tracer = config.trace.map(|_| Tracer::new(now));
        Conn {
            config,
            input: Vec::new(),
            start: 0,
            end: 0,
            reading: Reading::Head,
            positions: Vec::new(),
            slots: VecDeque::new(),
            first_id: 0,
            out: Vec::new(),
            out_pos: 0,
            out_closed: false,
            continue_sent: false,
            eof: false,
            failed: false,
            head_scanned: 0,
            stopping: false,
            aborted: false,
            linger_done: false,
            queued: 0,
            tracer,
            clock: Clock {
                read_since: now,
                last_fill: now,
                send_since: None,
                grace_until: None,
                linger_until: None,
            },
        }
    }

    // ---- input -------------------------------------------------------------------------

    /// Room to read into; report how much was read with [`Conn::filled`].
    pub fn read_buf(&mut self) -> &mut [u8] {
        if self.input.is_empty() {
            (self.input, self.positions) = pool::take_input();
            self.start = 0;
            self.end = 0;
        } else if self.start == self.end {
            self.shift_offsets(self.start);
            self.start = 0;
            self.end = 0;
        }
        if matches!(self.reading, Reading::Streaming(_)) && self.input.len() < STREAM_BUFFER {
            // A body streaming through: read it in large pieces, not the pool's small ones.
            self.input.resize(STREAM_BUFFER, 0);
        }
        if self.input.len() - self.end < MIN_READ {
            if self.start > 0 {
                self.input.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.shift_offsets(self.start);
                self.start = 0;
            }
            if self.input.len() - self.end < MIN_READ {
                let len = (self.input.len() * 2).max(self.end + MIN_READ);
                self.input.resize(len, 0);
            }
        }
        &mut self.input[self.end..]
    }

    /// Whether the connection holds an input buffer: not once it is idle and has called
    /// [`Conn::release_buffers`]. A driver that blocks in `read` then waits in a small buffer of
    /// its own, so that a waiting connection holds none from the pool, and hands over what came
    /// with [`Conn::fill_from`].
    pub fn holds_input(&self) -> bool {
        !self.input.is_empty()
    }

    /// `bytes` were read at `now` into a buffer of the driver's own (the blocking driver's between
    /// requests, a ring's provided buffer): copied in, as if read into [`Conn::read_buf`].
    pub fn fill_from(&mut self, bytes: &[u8], now: Instant) {
        let mut rest = bytes;
        while !rest.is_empty() {
            let buf = self.read_buf();
            let n = buf.len().min(rest.len());
            buf[..n].copy_from_slice(&rest[..n]);
            self.filled(n, now);
            rest = &rest[n..];
        }
    }

    /// `n` bytes were read at `now` into the buffer [`Conn::read_buf`] gave.
    pub fn filled(&mut self, n: usize, now: Instant) {
        if self.clock.linger_until.is_some() {
            // Lingering: what the peer still sends is read only to be dropped.
            self.start = self.end;
            return;
        }
        let head_was_partial = self.has_partial_request();
        self.end += n;
        debug_assert!(self.end <= self.input.len());
        if n == 0 {
            return;
        }
        self.clock.last_fill = now;
        match self.reading {
            Reading::Body(..) | Reading::Streaming(_) => self.clock.read_since = now,
            // A head's clock starts at its first byte; blank lines before it are no activity.
            Reading::Head if !head_was_partial && self.has_partial_request() => {
                self.clock.read_since = now;
                if let Some(t) = &mut self.tracer {
                    t.head_begins();
                }
            }
            _ => {}
        }
    }

    /// The peer will send nothing more. Replies already owed are still written.
    pub fn read_eof(&mut self) {
        self.eof = true;
        // A streamed body in progress learns of it from `body_chunk` (Broken, after what
        // was buffered), so that its consumer can tell an end from a cut.
        if !matches!(self.reading, Reading::Streaming(_)) {
            self.reading = Reading::Stopped;
        }
        if self.clock.linger_until.is_some() {
            self.linger_done = true;
        }
    }

    /// Offsets inside a body in progress are relative to `start` except the decoder's.
    fn shift_offsets(&mut self, by: usize) {
        match &mut self.reading {
            Reading::Body(_, BodyProgress::Chunked(d))
            | Reading::Streaming(Streamed {
                framing: StreamFraming::Chunked { decoder: d, .. },
                ..
            }) => {
                d.read -= by;
                d.write -= by;
            }
            _ => {}
        }
    }

    // ---- requests ------------------------------------------------------------------------

    /// The next complete request, if one is buffered and the connection may take it now.
    /// A malformed request queues its error reply and stops the reading.
    pub fn next_request(&mut self) -> Option<Request<'_>> {
        if let Reading::Streaming(s) = &self.reading
            && s.discard
        {
            self.drop_streamed_body();
        }
        if self.slots.len() >= self.config.limits.max_pipeline
            || self.backlog() >= OUTPUT_HIGH_WATER
        {
            return None;
        }
        match self.advance_reader() {
            Ok(true) => {}
            Ok(false) => return None,
            Err(status) => {
                self.fail(status);
                return None;
            }
        }
        let Reading::Body(head, progress) = std::mem::replace(&mut self.reading, Reading::Head)
        else {
            unreachable!("advance_reader returned a complete request");
        };
        let base = self.start;
        if head.streamed {
            return Some(self.hand_out_streamed(head, progress));
        }
        let (body, consumed) = match progress {
            BodyProgress::Length => {
                let Framing::Length(n) = head.framing else {
                    unreachable!()
                };
                ((base + head.len, base + head.len + n), head.len + n)
            }
            BodyProgress::Chunked(d) => ((base + head.len, d.write), d.read - base),
        };
        self.start += consumed;
        self.continue_sent = false;
        // A pipelined head already begun behind this request started when its bytes came.
        self.clock.read_since = self.clock.last_fill;
        let keep_alive = head.keep_alive && !self.stopping;
        if !keep_alive {
            self.reading = Reading::Stopped;
        }
        let more_buffered = self.start < self.end;
        let id = ReqId(self.open_slot(base, &head, keep_alive, more_buffered));
        Some(Request {
            id,
            method: slice_str(&self.input[base..], head.method),
            target: slice_str(&self.input[base..], head.target),
            version: head.version,
            keep_alive,
            head: &self.input[base..base + head.len],
            headers: &self.positions,
            body: &self.input[body.0..body.1],
            streamed: false,
        })
    }

    /// Hands out a request whose body is streamed, as soon as its head is in: its body follows
    /// through [`Conn::body_chunk`].
    fn hand_out_streamed(&mut self, head: Head, progress: BodyProgress) -> Request<'_> {
        let base = self.start;
        self.start += head.len;
        self.continue_sent = false;
        let keep_alive = head.keep_alive && !self.stopping;
        let framing = match (progress, head.framing) {
            (BodyProgress::Length, Framing::Length(n)) => StreamFraming::Length { left: n as u64 },
            (BodyProgress::Chunked(decoder), _) => StreamFraming::Chunked {
                decoder,
                total: 0,
                done: false,
            },
            (BodyProgress::Length, Framing::Chunked) => unreachable!("framing and progress agree"),
        };
        let id = self.open_slot(base, &head, keep_alive, false);
        self.reading = Reading::Streaming(Streamed {
            id,
            framing,
            keep_alive,
            expect_continue: head.expect_continue,
            discard: false,
        });
        Request {
            id: ReqId(id),
            method: slice_str(&self.input[base..], head.method),
            target: slice_str(&self.input[base..], head.target),
            version: head.version,
            keep_alive,
            head: &self.input[base..base + head.len],
            headers: &self.positions,
            body: &[],
            streamed: true,
        }
    }

    // ---- streamed bodies ----------------------------------------------------------------

    /// The next piece of the streamed body being received: what is buffered now, borrowed
    /// from the input buffer (no copy). Take what you can, then [`Conn::consume_body`] that
    /// much; until then, reading waits once about 64 KiB are buffered (backpressure: a slow
    /// consumer slows the peer, it does not grow memory).
    pub fn body_chunk(&mut self) -> BodyChunk<'_> {
        let Reading::Streaming(s) = &mut self.reading else {
            // After a framing error or a timeout the body did not end: it broke.
            return if self.failed {
                BodyChunk::Broken
            } else {
                BodyChunk::Done
            };
        };
        let (start, end) = (self.start, self.end);
        let available = match &mut s.framing {
            StreamFraming::Length { left } => (*left as usize).min(end - start),
            StreamFraming::Chunked {
                decoder,
                total,
                done,
            } => {
                if !*done {
                    // Only the total decoded so far is bounded (by max_upload, below).
                    let decoded = decoder.decode(
                        &mut self.input[..end],
                        decoder.write,
                        usize::MAX,
                        self.config.limits.max_head,
                    );
                    match decoded {
                        Ok(finished) => *done = finished,
                        Err(status) => {
                            let id = s.id;
                            self.stream_failed(id, status);
                            return BodyChunk::Broken;
                        }
                    }
                }
                let available = decoder.write - start;
                if *total + available as u64 > self.config.limits.max_upload {
                    let id = s.id;
                    self.stream_failed(id, 413);
                    return BodyChunk::Broken;
                }
                available
            }
        };
        if available > 0 {
            return BodyChunk::Data(&self.input[start..start + available]);
        }
        let complete = match &s.framing {
            StreamFraming::Length { left } => *left == 0,
            StreamFraming::Chunked { done, .. } => *done,
        };
        if complete {
            self.end_streamed_body();
            BodyChunk::Done
        } else if self.eof {
            self.reading = Reading::Stopped;
            BodyChunk::Broken
        } else {
            BodyChunk::Wait
        }
    }

    /// The caller took `n` bytes of the last [`Conn::body_chunk`].
    pub fn consume_body(&mut self, n: usize) {
        let Reading::Streaming(s) = &mut self.reading else {
            return;
        };
        self.start += n;
        match &mut s.framing {
            StreamFraming::Length { left } => *left -= n as u64,
            StreamFraming::Chunked { total, .. } => *total += n as u64,
        }
    }

    /// A streamed body is still being received (its request is owed its body's end).
    pub fn body_pending(&self) -> bool {
        matches!(&self.reading, Reading::Streaming(s) if !s.discard)
    }

    /// The streamed body is all in and taken: read the next request (or stop).
    fn end_streamed_body(&mut self) {
        let Reading::Streaming(s) = &self.reading else {
            return;
        };
        if let StreamFraming::Chunked { decoder, .. } = &s.framing {
            // The trailers are read too; what follows is the next request.
            self.start = decoder.read;
        }
        self.reading = if s.keep_alive {
            Reading::Head
        } else {
            Reading::Stopped
        };
        self.clock.read_since = self.clock.last_fill;
    }

    /// A request answered before its streamed body was all in: drop what has arrived.
    fn drop_streamed_body(&mut self) {
        loop {
            let n = match self.body_chunk() {
                BodyChunk::Data(d) => d.len(),
                _ => return,
            };
            self.consume_body(n);
        }
    }

    /// A streamed body's framing is bad (or too long): the request is answered `status` (in
    /// place of the application's reply), and the connection closes after it.
    fn stream_failed(&mut self, id: u64, status: u16) {
        self.failed = true;
        self.reading = Reading::Stopped;
        self.start = self.end;
        if let Some(i) = self.index(ReqId(id))
            && let Some(t) = &mut self.tracer
        {
            t.responded(i, status);
        }
        if let Some(slot) = self.index(ReqId(id)).map(|i| &mut self.slots[i])
            && matches!(slot.state, SlotState::Waiting)
        {
            let reply = Response::error(status);
            self.queued += reply.body.len();
            slot.meta.keep_alive = false;
            slot.state = SlotState::Ready(reply);
        }
    }

    /// Files the reply slot of the request whose head starts at `base` and tells the tracer
    /// (`more_buffered`: bytes behind it are already in); returns the request's id.
    fn open_slot(
        &mut self,
        base: usize,
        head: &Head,
        keep_alive: bool,
        more_buffered: bool,
    ) -> u64 {
        let method = slice_str(&self.input[base..], head.method);
        let meta = ReplyMeta {
            head_only: method == "HEAD",
            keep_alive,
            http10: head.version == Version::Http10,
            sized: false,
        };
        if let Some(t) = &mut self.tracer {
            let target = slice_str(&self.input[base..], head.target);
            t.handed_out(method, target, more_buffered, self.clock.last_fill);
        }
        self.push_slot(Slot {
            meta,
            state: SlotState::Waiting,
            early: Vec::new(),
            ended: false,
            sized_left: 0,
        });
        self.first_id + self.slots.len() as u64 - 1
    }

    fn push_slot(&mut self, slot: Slot) {
        if self.slots.capacity() == 0 {
            self.slots = pool::take_queue();
        }
        self.slots.push_back(slot);
    }

    /// Moves the reader forward over what is buffered. `Ok(true)`: a whole request is ready.
    fn advance_reader(&mut self) -> Result<bool, u16> {
        loop {
            match &mut self.reading {
                Reading::Stopped | Reading::Streaming(_) => return Ok(false),
                Reading::Head => {
                    // RFC 9112 2.2: ignore empty lines before a request line.
                    while self.start < self.end && matches!(self.input[self.start], b'\r' | b'\n') {
                        if self.input[self.start] == b'\r'
                            && self.input[..self.end].get(self.start + 1) != Some(&b'\n')
                        {
                            if self.start + 1 == self.end {
                                return Ok(false);
                            }
                            return Err(400);
                        }
                        self.start += 1;
                    }
                    if self.start == self.end {
                        return Ok(false);
                    }
                    let data = &self.input[self.start..self.end];
                    let fresh = &data[(self.head_scanned as usize).min(data.len())..];
                    let limits = &self.config.limits;
                    let over_limit = data.len() > limits.max_head
                        || (data.len() > limits.max_target + 64
                            && memchr::memchr(b'\n', data).is_none());
                    if memchr::memchr(b'\n', fresh).is_none() && !over_limit {
                        // A partial head is at most max_head (a few KiB): it fits.
                        self.head_scanned = data.len() as u32;
                        return Ok(false);
                    }
                    let Some(mut head) = head::parse(data, limits, &mut self.positions)? else {
                        self.head_scanned = data.len() as u32;
                        return Ok(false);
                    };
                    self.head_scanned = 0;
                    let method = slice_str(data, head.method);
                    let path = crate::target_path(slice_str(data, head.target));
                    head.streamed = head.framing != Framing::Length(0)
                        && (self.config.stream_body)(method, path);
                    let max = match head.streamed {
                        true => limits.max_upload,
                        false => limits.max_body as u64,
                    };
                    if let Framing::Length(n) = head.framing
                        && n as u64 > max
                    {
                        return Err(413);
                    }
                    let progress = match head.framing {
                        Framing::Length(_) => BodyProgress::Length,
                        Framing::Chunked => {
                            BodyProgress::Chunked(Decoder::new(self.start + head.len))
                        }
                    };
                    let streamed = head.streamed;
                    if let Some(t) = &mut self.tracer {
                        t.head_parsed();
                    }
                    self.reading = Reading::Body(head, progress);
                    if streamed {
                        // Handed out now; the body follows in pieces.
                        return Ok(true);
                    }
                }
                Reading::Body(head, BodyProgress::Length) => {
                    let Framing::Length(n) = head.framing else {
                        unreachable!()
                    };
                    return Ok(self.end - self.start >= head.len + n);
                }
                Reading::Body(head, BodyProgress::Chunked(decoder)) => {
                    let body_start = self.start + head.len;
                    let limits = &self.config.limits;
                    return decoder.decode(
                        &mut self.input[..self.end],
                        body_start,
                        limits.max_body,
                        limits.max_head,
                    );
                }
            }
        }
    }

    /// Queues the reply for a request the reader cannot accept, and reads nothing more.
    fn fail(&mut self, status: u16) {
        self.failed = true;
        self.reading = Reading::Stopped;
        self.start = self.end;
        let meta = ReplyMeta {
            head_only: false,
            keep_alive: false,
            http10: false,
            sized: false,
        };
        let reply = Response::error(status);
        self.queued += reply.body.len();
        self.push_slot(Slot {
            meta,
            state: SlotState::Ready(reply),
            early: Vec::new(),
            ended: false,
            sized_left: 0,
        });
        if let Some(t) = &mut self.tracer {
            t.error(status);
        }
    }

    // ---- replies -------------------------------------------------------------------------

    /// Files the reply to request `id`. Replies leave in request order, whatever order they
    /// are filed in. A reply for a request this connection no longer owes is dropped.
    pub fn respond(&mut self, id: ReqId, response: Response) {
        if let Reading::Streaming(s) = &mut self.reading
            && s.id == id.0
        {
            // Answered before its body was all in: the rest is read and dropped.
            s.discard = true;
        }
        if let Some(i) = self.index(id)
            && let Some(t) = &mut self.tracer
            && matches!(self.slots[i].state, SlotState::Waiting)
        {
            t.responded(i, response.status);
        }
        if let Some(slot) = self.index(id).and_then(|i| self.slots.get_mut(i))
            && matches!(slot.state, SlotState::Waiting)
        {
            self.queued += response.body.len();
            if response.is_stream() && !response::has_body_framing(response.status) {
                // 1xx, 204, 304: no chunked coding, and the chunks are dropped.
                slot.meta.head_only = true;
            }
            if let response::Body::Sized(len) = response.body {
                slot.meta.sized = true;
                slot.sized_left = len;
            }
            slot.state = SlotState::Ready(response);
        }
    }

    /// One piece of the streamed body of request `id`, whose head was filed with
    /// [`Response::stream`]. A stream whose unsent bytes would pass
    /// [`Limits::max_stream_backlog`](crate::Limits) is cut off instead: the connection is
    /// finished at once (a subscriber that reads too slowly may not grow memory without bound).
    pub fn push_chunk(&mut self, id: ReqId, data: &[u8]) {
        if self.backlog() + data.len() > self.config.limits.max_stream_backlog
            && self.index(id).is_some()
        {
            self.abort();
            return;
        }
        let at_front = id.0 == self.first_id;
        let out_closed = self.out_closed;
        let Some(i) = self.index(id) else {
            return;
        };
        let slot = &mut self.slots[i];
        if slot.ended {
            return;
        }
        let data = if slot.meta.sized {
            // Never more than the head promised.
            let n = (data.len() as u64).min(slot.sized_left) as usize;
            slot.sized_left -= n as u64;
            &data[..n]
        } else {
            data
        };
        match slot.state {
            SlotState::Streaming if at_front && !out_closed => {
                let meta = slot.meta;
                if self.out.capacity() == 0 {
                    self.out = pool::take_output();
                }
                response::encode_chunk(&mut self.out, data, meta);
            }
            SlotState::Ready(ref r) if r.is_stream() => {
                let meta = slot.meta;
                let before = slot.early.len();
                response::encode_chunk(&mut slot.early, data, meta);
                self.queued += slot.early.len() - before;
            }
            _ => {}
        }
    }

    /// The streamed body of request `id` is complete.
    pub fn end_stream(&mut self, id: ReqId) {
        let Some(i) = self.index(id) else { return };
        let slot = &mut self.slots[i];
        slot.ended = true;
        if slot.sized_left > 0 {
            // Ended short of its Content-Length: only a close tells the peer.
            slot.meta.keep_alive = false;
        }
        if matches!(slot.state, SlotState::Streaming) {
            let meta = slot.meta;
            self.slots.pop_front();
            self.first_id += 1;
            if !self.out_closed {
                if self.out.capacity() == 0 {
                    self.out = pool::take_output();
                }
                response::encode_stream_end(&mut self.out, meta);
                if let Some(t) = &mut self.tracer {
                    let began = t.stream_began;
                    t.encoded(self.out.len() - self.out_pos, began);
                }
                if (meta.http10 && !meta.sized) || !meta.keep_alive {
                    self.close_output();
                }
            }
        }
    }

    /// Where request `id`'s slot is, if the connection still owes its reply.
    fn index(&self, id: ReqId) -> Option<usize> {
        let index = usize::try_from(id.0.checked_sub(self.first_id)?).ok()?;
        (index < self.slots.len()).then_some(index)
    }

    // ---- output --------------------------------------------------------------------------

    /// Encodes every reply that is ready in order, and returns all the bytes waiting to be
    /// written. Report what the socket took with [`Conn::written`].
    pub fn output(&mut self, common: &CommonHeaders, now: Instant) -> &[u8] {
        self.encode_ready(common);
        if self.unsent() > 0 && self.clock.send_since.is_none() {
            self.clock.send_since = Some(now);
        }
        &self.out[self.out_pos..]
    }

    fn encode_ready(&mut self, common: &CommonHeaders) {
        while !self.out_closed {
            let Some(slot) = self.slots.front_mut() else {
                break;
            };
            let SlotState::Ready(_) = slot.state else {
                break;
            };
            let SlotState::Ready(r) = std::mem::replace(&mut slot.state, SlotState::Streaming)
            else {
                unreachable!()
            };
            if self.out.capacity() == 0 {
                self.out = pool::take_output();
            }
            if self.out_pos > SHRINK_ABOVE {
                self.out.drain(..self.out_pos);
                self.out_pos = 0;
            }
            self.queued -= r.body.len() + if r.is_stream() { slot.early.len() } else { 0 };
            let began = (self.out.len() - self.out_pos, self.tracer.as_ref());
            let began = began.1.map_or(0, |t| t.output_at(began.0));
            let keep_open = response::encode(&mut self.out, &r, slot.meta, common);
            if r.is_stream() {
                self.out.extend_from_slice(&slot.early);
                slot.early = Vec::new();
                if !slot.ended {
                    if !keep_open {
                        // The head said `Connection: close`: end_stream closes, and nothing
                        // more is read meanwhile.
                        slot.meta.keep_alive = false;
                        self.reading = Reading::Stopped;
                    }
                    // Stay at the front: later replies wait until this stream ends.
                    if let Some(t) = &mut self.tracer {
                        t.stream_began = began;
                    }
                    break;
                }
                response::encode_stream_end(&mut self.out, slot.meta);
            }
            self.slots.pop_front();
            self.first_id += 1;
            if let Some(t) = &mut self.tracer {
                t.encoded(self.out.len() - self.out_pos, began);
            }
            if !keep_open {
                self.close_output();
            }
        }
        // 100 Continue may go out only after every earlier reply, and only once per request
        // (for a streamed body: while its request is the one owed, and still wants it).
        let expects = match &self.reading {
            Reading::Body(head, _) => head.expect_continue && self.slots.is_empty(),
            Reading::Streaming(s) => {
                s.expect_continue && !s.discard && self.slots.len() == 1 && self.first_id == s.id
            }
            _ => false,
        };
        if expects && !self.continue_sent && !self.out_closed {
            if self.out.capacity() == 0 {
                self.out = pool::take_output();
            }
            self.out.extend_from_slice(CONTINUE);
            self.continue_sent = true;
        }
    }

    /// Closes at once, dropping what was not sent: nothing more can reach the peer in time.
    fn abort(&mut self) {
        self.aborted = true;
        self.close_output();
        self.out_pos = 0;
        pool::give_output(std::mem::take(&mut self.out));
        self.clock.send_since = None;
    }

    /// After a reply that closes the connection, nothing else is read or written.
    fn close_output(&mut self) {
        self.out_closed = true;
        self.reading = Reading::Stopped;
        self.slots.clear();
        self.queued = 0;
        if let Some(t) = &mut self.tracer {
            t.drop_owed();
        }
    }

    /// The socket took `n` bytes of [`Conn::output`] at `now`.
    pub fn written(&mut self, n: usize, now: Instant) {
        if let (Some(t), Some(emit)) = (&mut self.tracer, self.config.trace) {
            t.written(n, emit);
        }
        self.out_pos += n;
        debug_assert!(self.out_pos <= self.out.len());
        if n > 0 {
            self.clock.send_since = Some(now);
        }
        if self.out_pos == self.out.len() {
            self.out_pos = 0;
            pool::give_output(std::mem::take(&mut self.out));
            self.clock.send_since = None;
            if self.slots.is_empty() && !self.has_partial_request() {
                // Everything owed went out: the connection is idle from now.
                self.clock.read_since = now;
            }
        }
    }

    /// Gives the buffers this connection is not using back to the thread's pool: call it when
    /// the connection goes back to waiting, so that an idle connection holds none.
    pub fn release_buffers(&mut self) {
        let reading_head = matches!(self.reading, Reading::Head | Reading::Stopped);
        if self.start == self.end && reading_head && !self.input.is_empty() {
            pool::give_input(
                std::mem::take(&mut self.input),
                std::mem::take(&mut self.positions),
            );
            self.start = 0;
            self.end = 0;
            self.head_scanned = 0;
        }
        if self.slots.is_empty() && self.slots.capacity() > 0 {
            pool::give_queue(std::mem::take(&mut self.slots));
        }
        if self.unsent() == 0 && self.out.capacity() > 0 {
            self.out_pos = 0;
            pool::give_output(std::mem::take(&mut self.out));
        }
    }

    // ---- time ----------------------------------------------------------------------------

    /// When this connection next needs [`Conn::handle_timeout`], or `None` if no deadline of
    /// the protocol applies (a handler is still working on the request: the application
    /// bounds that). The policy, the same for every driver:
    /// - a head must arrive whole within `header` of its first byte (408);
    /// - a body must make progress at least every `body` (408);
    /// - an idle keep-alive connection is closed after `idle`;
    /// - a peer that takes none of our output for `send` is closed;
    /// - at shutdown, a connection that has sent nothing yet gets `shutdown_grace` to send
    ///   its first request (the kernel accepted it on our behalf);
    /// - a lingering close drains the peer's input for at most `linger`.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let t = &self.config.timeouts;
        let c = &self.clock;
        if let Some(until) = c.linger_until {
            return (!self.linger_done).then_some(until);
        }
        if self.is_finished() {
            return None;
        }
        let send = c
            .send_since
            .filter(|_| self.unsent() > 0)
            .map(|s| s + t.send);
        let read = match self.reading {
            Reading::Stopped => None,
            Reading::Body(..) | Reading::Streaming(_) => Some(c.read_since + t.body),
            Reading::Head if self.has_partial_request() => Some(c.read_since + t.header),
            Reading::Head if self.slots.is_empty() && self.unsent() == 0 => {
                let idle = c.read_since + t.idle;
                Some(c.grace_until.map_or(idle, |g| g.min(idle)))
            }
            // Waiting for a handler; the next head has not begun.
            Reading::Head => None,
        };
        match (send, read) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Applies whichever deadline of [`Conn::poll_timeout`] has passed by `now`: a request cut
    /// short gets 408 and the connection closes after it; an idle connection, or one whose peer
    /// stopped reading, is finished. Nothing happens if no deadline has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        let t = self.config.timeouts;
        if let Some(until) = self.clock.linger_until {
            self.linger_done |= now >= until;
            return;
        }
        let c = &self.clock;
        if self.unsent() > 0 && c.send_since.is_some_and(|s| now >= s + t.send) {
            // The peer stopped reading: nothing more can reach it.
            self.abort();
            return;
        }
        let (since, grace) = (c.read_since, c.grace_until);
        match self.reading {
            Reading::Stopped => {}
            Reading::Body(..) if now >= since + t.body => self.fail(408),
            Reading::Streaming(ref s) if now >= since + t.body => {
                let id = s.id;
                self.stream_failed(id, 408);
            }
            Reading::Head if self.has_partial_request() && now >= since + t.header => {
                self.fail(408);
            }
            // A partial head whose time has not come must not fall through to the idle rule.
            Reading::Head if self.has_partial_request() => {}
            Reading::Head
                if self.slots.is_empty()
                    && self.unsent() == 0
                    && (now >= since + t.idle || grace.is_some_and(|g| now >= g)) =>
            {
                self.reading = Reading::Stopped;
            }
            _ => {}
        }
    }

    // ---- what the caller should do ---------------------------------------------------------

    /// The bytes encoded by the last [`Conn::output`] and not yet written.
    pub fn unsent_output(&self) -> &[u8] {
        &self.out[self.out_pos..]
    }

    /// Bytes encoded but not yet written.
    pub fn unsent(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// Reply bytes held for the peer: encoded and unsent, or filed and not yet encoded.
    pub fn backlog(&self) -> usize {
        self.unsent() + self.queued
    }

    /// Whether reading more input now would be useful: false once reading has stopped, and
    /// while replies back up (too many owed, or too many reply bytes held). True while
    /// lingering: input is drained and dropped.
    pub fn wants_read(&self) -> bool {
        if self.clock.linger_until.is_some() {
            return !self.linger_done;
        }
        match &self.reading {
            Reading::Stopped => false,
            // The body's consumer sets the pace; a body being dropped flows at once.
            // Room for a full read left within STREAM_BUFFER: the buffer never grows past it.
            Reading::Streaming(s) => s.discard || self.end - self.start + MIN_READ <= STREAM_BUFFER,
            _ => {
                self.slots.len() < self.config.limits.max_pipeline
                    && self.backlog() < OUTPUT_HIGH_WATER
            }
        }
    }

    /// Nothing more will be read or written: close the socket (after lingering, if
    /// [`Conn::should_linger`] says so).
    pub fn is_finished(&self) -> bool {
        if self.clock.linger_until.is_some() {
            return self.linger_done;
        }
        self.aborted
            || (self.unsent() == 0
                && (self.out_closed
                    || (matches!(self.reading, Reading::Stopped) && self.slots.is_empty())))
    }

    /// Part of a request has arrived but not all of it.
    pub fn has_partial_request(&self) -> bool {
        match self.reading {
            Reading::Body(..) | Reading::Streaming(_) => true,
            Reading::Head => self.input[self.start..self.end]
                .iter()
                .any(|&b| b != b'\r' && b != b'\n'),
            Reading::Stopped => false,
        }
    }

    /// Read no further requests (shutdown), as of `now`. A request partly received is still
    /// read and answered, and a connection that has sent nothing yet may still send its first
    /// request within the shutdown grace; the last reply says `Connection: close`; then the
    /// connection is finished. Calling it again changes nothing.
    pub fn stop_reading(&mut self, now: Instant) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        if self.has_partial_request() {
            return;
        }
        if self.requests_read() == 0 && matches!(self.reading, Reading::Head) {
            self.clock.grace_until = Some(now + self.config.timeouts.shutdown_grace);
            return;
        }
        self.reading = Reading::Stopped;
        if let Some(last) = self.slots.back_mut() {
            last.meta.keep_alive = false;
        }
    }

    /// Closing now could reset the connection and destroy the last reply in flight: the peer
    /// sent bytes that will never be read, or may still be sending the body of a rejected
    /// request. The caller should shut down its sending side, then call [`Conn::begin_linger`].
    pub fn should_linger(&self) -> bool {
        self.clock.linger_until.is_none()
            && !self.eof
            && !self.aborted
            && (self.failed || self.start < self.end)
    }

    /// The caller has shut down its sending side: from now on input is read and dropped until
    /// the peer closes or `linger` passes, and then the connection is finished (nginx's
    /// lingering close).
    pub fn begin_linger(&mut self, now: Instant) {
        self.clock.linger_until = Some(now + self.config.timeouts.linger);
        self.start = self.end;
    }

    /// Heap bytes this connection holds in buffers (its input, output and reply queue): none
    /// once it is idle and has called [`Conn::release_buffers`].
    pub fn buffer_bytes(&self) -> usize {
        self.input.capacity()
            + self.positions.capacity() * size_of::<HeaderPos>()
            + self.out.capacity()
            + self.slots.capacity() * size_of::<Slot>()
    }

    /// Requests read on this connection so far (handed out by [`Conn::next_request`]).
    pub fn requests_read(&self) -> u64 {
        self.first_id + self.slots.len() as u64
    }

    /// How many bytes a streamed reply may add now: half the stream backlog limit, less what is
    /// held already. A driver polls its stream for at most this much, and not at all at 0
    /// (the peer is behind: wait until the output drains), so a replay of many events flows
    /// as fast as the peer reads, and only a peer that stops reading is cut off.
    pub fn stream_budget(&self) -> usize {
        (self.config.limits.max_stream_backlog / 2).saturating_sub(self.backlog())
    }

    /// Whether the reply to request `id` is still owed (not fully written, and not dropped
    /// because the connection failed or was closed).
    pub fn owes(&self, id: ReqId) -> bool {
        self.index(id).is_some()
    }

    /// Replies owed: requests handed out and not yet fully written.
    pub fn owed(&self) -> usize {
        self.slots.len()
    }
}

fn slice_str(buf: &[u8], (start, len): (u32, u32)) -> &str {
    let bytes = &buf[start as usize..(start + len) as usize];
    // httparse checked these bytes: the method is a token and the target visible ASCII.
    std::str::from_utf8(bytes).unwrap_or_default()
}
