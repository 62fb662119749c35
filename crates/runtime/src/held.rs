//! The requests a loop holds for the app: replies that wait (long polls, commits) and streams
//! (server push), a few hundred bytes each. The app's hub wakes the loop once when anything
//! moves, and the loop walks its own waiters with [`Held::poll`]; at the earliest deadline it
//! walks them too. Shared by the epoll loop and the io_uring loop, which hold requests alike.

use std::time::Instant;

use app::{BodySink, Pending, Reply, Stream, WorkerStats};
use proto::{Conn, ReqId};
use slab::Slab;

/// Names a held request's connection across the loop's slab: its slot and generation (a
/// connection closed meanwhile must not get its successor's reply).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnKey {
    pub token: usize,
    pub generation: u64,
}

/// What a loop's connection must offer to hold requests.
pub trait HeldConn {
    /// Tells it apart from an earlier connection in the same slot.
    fn generation(&self) -> u64;
    /// Whether it is still open (a slot may outlive its connection).
    fn is_open(&self) -> bool {
        true
    }
    fn http(&mut self) -> &mut Conn;
    /// Set when its stream had more to send but the peer was behind: the loop calls
    /// [`Held::output_drained`] once its output drains below the stream budget.
    fn stream_waits(&mut self) -> &mut bool;
}

struct Entry {
    conn: ConnKey,
    id: ReqId,
    what: Holding,
}

enum Holding {
    Pending(Pending),
    Stream(Stream),
}

impl Holding {
    fn deadline(&self) -> Option<Instant> {
        match self {
            Holding::Pending(p) => p.deadline(),
            Holding::Stream(s) => s.deadline(),
        }
    }
}

/// One loop's held requests.
pub struct Held {
    entries: Slab<Entry>,
    next: Option<Instant>,
    stats: &'static WorkerStats,
    /// Scratch space a stream's poll writes its bytes into.
    chunk: Vec<u8>,
    done: Vec<usize>,
}

impl Held {
    pub fn new(stats: &'static WorkerStats) -> Held {
        Held {
            entries: Slab::new(),
            next: None,
            stats,
            chunk: Vec::new(),
            done: Vec::new(),
        }
    }

    /// Files `reply` to request `id` of connection `conn` (whose protocol state is `http`):
    /// into the connection now, or held until the app has it. A reply that reads the
    /// request's body first comes back as an [`Upload`], for the caller to feed.
    #[must_use]
    pub fn file(
        &mut self,
        http: &mut Conn,
        conn: ConnKey,
        id: ReqId,
        reply: Reply,
    ) -> Option<Box<Upload>> {
        let what = match reply {
            Reply::Now(r) => {
                http.respond(id, r);
                return None;
            }
            Reply::Body(sink) => return Upload::start(http, id, sink),
            Reply::Later(pending) => Holding::Pending(pending),
            Reply::Stream(head, stream) => {
                http.respond(id, head);
                Holding::Stream(stream)
            }
        };
        if let Some(at) = what.deadline() {
            self.wake_at(at);
        }
        self.stats.hold();
        self.entries.insert(Entry { conn, id, what });
        None
    }

    /// When to walk the held requests at the latest, whatever the hub says.
    pub fn deadline(&self) -> Option<Instant> {
        self.next
    }

    /// A connection whose stream waited for the peer can take more: walk soon.
    pub fn output_drained(&mut self, now: Instant) {
        self.wake_at(now);
    }

    fn wake_at(&mut self, at: Instant) {
        self.next = Some(self.next.map_or(at, |next| next.min(at)));
    }

    /// Polls every held request and stream at `now`, finding each one's connection in
    /// `conns`. What is ready is filed into its connection; each connection touched is pushed
    /// to `touched` once, for the loop to drive (one write for all it got).
    pub fn poll<C: HeldConn>(
        &mut self,
        now: Instant,
        conns: &mut Slab<C>,
        touched: &mut Vec<usize>,
    ) {
        let mut next: Option<Instant> = None;
        for (key, h) in self.entries.iter_mut() {
            let found = conns.get_mut(h.conn.token);
            // Gone: its connection closed (or failed the request) meanwhile.
            let Some(c) = found.filter(|c| c.generation() == h.conn.generation && c.is_open())
            else {
                self.done.push(key);
                continue;
            };
            if !c.http().owes(h.id) {
                self.done.push(key);
                continue;
            }
            let (answered, ended) = match &mut h.what {
                Holding::Pending(p) => match p.poll(now) {
                    Some(reply) => {
                        c.http().respond(h.id, reply);
                        (true, true)
                    }
                    None => (false, false),
                },
                Holding::Stream(s) => {
                    let budget = c.http().stream_budget();
                    if budget == 0 {
                        // The peer is behind: the loop says when its output drains.
                        *c.stream_waits() = true;
                        continue;
                    }
                    self.chunk.clear();
                    let open = s.poll(now, &mut self.chunk, budget);
                    if !self.chunk.is_empty() {
                        c.http().push_chunk(h.id, &self.chunk);
                    }
                    if !open {
                        c.http().end_stream(h.id);
                    }
                    (!self.chunk.is_empty() || !open, !open)
                }
            };
            if answered && !touched.contains(&h.conn.token) {
                touched.push(h.conn.token);
            }
            if ended {
                self.done.push(key);
            } else if let Some(at) = h.what.deadline() {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        for key in self.done.drain(..) {
            self.entries.remove(key);
            self.stats.release();
        }
        self.next = next;
        if self.chunk.capacity() > 64 * 1024 {
            self.chunk = Vec::new();
        }
    }
}

/// A request whose body goes to the app as it arrives (an upload). Its connection keeps it
/// (boxed: idle connections pay one pointer) and feeds it after every read, until the app has
/// the reply; dropped with its connection, the sink keeps what arrived.
pub struct Upload {
    id: ReqId,
    sink: BodySink,
}

impl Upload {
    /// Feeds what `http` holds already; `None` if that was the whole body.
    pub fn start(http: &mut Conn, id: ReqId, sink: Box<BodySink>) -> Option<Box<Upload>> {
        let mut upload = Box::new(Upload { id, sink: *sink });
        (!upload.feed(http)).then_some(upload)
    }

    /// Feeds the sink what `http` has buffered; true once the reply is filed (drop it then).
    pub fn feed(&mut self, http: &mut Conn) -> bool {
        match self.sink.feed(http) {
            Some(reply) => {
                http.respond(self.id, reply);
                true
            }
            None => false,
        }
    }
}

/// Feeds a connection's upload, if it has one, and drops it once answered.
pub fn feed(upload: &mut Option<Box<Upload>>, http: &mut Conn) {
    if let Some(u) = upload
        && u.feed(http)
    {
        *upload = None;
    }
}
