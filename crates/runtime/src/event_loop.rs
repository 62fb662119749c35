//! The event-loop worker every epoll pattern runs: one mio `Poll`, edge-triggered, serving its
//! connections through the sans-IO [`proto::Conn`]. What makes a pattern is what it plugs in:
//!
//! ```text
//!   listener (optional) ──accept──┐
//!   LoopHandle::hand_over ────────┼──▶ connections ──request──▶ Handler ──reply now──┐
//!     (another thread's accepts)  │        ▲                      │                   │
//!                                 │        │ write in order       └─later: another ───┤
//!   LoopHandle::complete ─────────┘        └───────────────────────  thread completes ◀┘
//!     (a reply finished elsewhere; a mio::Waker wakes the loop, like memcached's notify pipe)
//! ```
//!
//! Rules it keeps: read until the socket is drained (a short read proves it is), one write per
//! batch of pipelined replies, stop reading a connection whose replies back up, let proto time
//! out slow heads and idle connections, pause accepting on EMFILE instead of spinning, and on
//! SIGTERM stop accepting, finish what is in flight, and return.
//!
//! Held requests (long polls, replies waiting for a commit) and streams (server push) stay in
//! the loop, a few hundred bytes each: the app's hub rings the loop's waker once when anything
//! moves, and the loop walks its own waiters, so 10,000 of them cost one wake-up per loop.

use std::io::{self, Read, Write};
use std::net::Shutdown as Direction;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use app::{App, Reply, Subscription, WorkerStats};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use proto::{CommonHeaders, Conn, ReqId, Request};
use slab::Slab;

use crate::date::ReplyHeaders;
use crate::held::{self, ConnKey, Held, HeldConn, Upload};
use crate::listener::{AcceptBackoff, is_out_of_resources};

use crate::{ServeConfig, Shutdown};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
const SIGNALS: Token = Token(usize::MAX - 3);

/// Reads one connection may make per turn of the loop. A peer that sends without pause (an
/// upload over loopback) never lets its socket run dry; without a budget its connection would
/// keep the loop to itself (libuv stops at 32 reads per event for the same reason).
const READS_PER_TURN: u32 = 16;

/// Decides what happens to each request. The loop calls it on its own thread.
pub trait Handler {
    /// The reply (now, held, or streamed), or `None` if it will come later through
    /// [`LoopHandle::complete`].
    fn handle(&mut self, req: &Request<'_>, origin: Origin) -> Option<Reply>;
}

/// Runs the whole application on the loop thread, slow requests included.
pub struct Inline(pub App);

impl Handler for Inline {
    fn handle(&mut self, req: &Request<'_>, _: Origin) -> Option<Reply> {
        Some(self.0.handle_inline(req))
    }
}

/// Names a request across threads: which connection (slot and generation, so that a reply for
/// a connection closed meanwhile is dropped, not sent to its successor) and which request.
#[derive(Clone, Copy, Debug)]
pub struct Origin {
    token: usize,
    generation: u64,
    id: ReqId,
}

/// The loop's mailbox: other threads hand it connections and finished replies, then wake it.
pub struct LoopHandle {
    waker: Waker,
    /// Set by the first sender after the loop last emptied the mailbox: one wake-up per batch.
    woken: AtomicBool,
    /// The app's hub called: held requests and streams may have something to say.
    app_moved: AtomicBool,
    incoming: Mutex<Vec<std::net::TcpStream>>,
    completed: Mutex<Vec<(Origin, Reply)>>,
}

impl LoopHandle {
    /// Gives the loop a connection accepted elsewhere (the dispatcher pattern's hand-off).
    pub fn hand_over(&self, stream: std::net::TcpStream) {
        lock(&self.incoming).push(stream);
        self.wake();
    }

    /// Files the reply to a request the handler left pending: a response, or a request for
    /// the loop to hold (a long poll, a stream) from now on.
    pub fn complete(&self, origin: Origin, reply: impl Into<Reply>) {
        lock(&self.completed).push((origin, reply.into()));
        self.wake();
    }

    /// The app moved (the hub called): the loop will poll what it holds.
    fn app_moved(&self) {
        if !self.app_moved.swap(true, Ordering::AcqRel) {
            self.wake();
        }
    }

    pub fn wake(&self) {
        if !self.woken.swap(true, Ordering::AcqRel) {
            // A failed wake leaves the loop to its next timer tick; nothing better to do here.
            let _ = self.waker.wake();
        }
    }
}

struct Connection {
    stream: TcpStream,
    /// The protocol state, which also decides every timeout (`poll_timeout`).
    http: Conn,
    generation: u64,
    /// The socket may have input (no WouldBlock or short read since the last edge).
    readable: bool,
    /// The socket may take output.
    writable: bool,
    /// The peer's FIN has arrived (EPOLLRDHUP): a short read no longer means the socket is
    /// empty, since the EOF behind the data brings no new edge.
    read_closed: bool,
    /// Its stream has more to send but the peer is behind: poll it once the output drains.
    stream_waits: bool,
    /// The request whose body is going to the app as it arrives.
    upload: Option<Box<Upload>>,
}

impl HeldConn for Connection {
    fn generation(&self) -> u64 {
        self.generation
    }

    fn http(&mut self) -> &mut Conn {
        &mut self.http
    }

    fn stream_waits(&mut self) -> &mut bool {
        &mut self.stream_waits
    }
}

enum Accepting {
    Yes,
    /// At --max-conns: resume when a connection closes.
    Full,
    /// Out of file descriptors or memory: retry at `until`.
    Paused {
        until: Instant,
    },
    /// Shutting down, or no listener.
    No,
}

pub struct EventLoop {
    poll: Poll,
    events: Events,
    state: State,
}

/// Everything but the poller, so that events can be iterated while the state changes.
struct State {
    config: ServeConfig,
    registry: Registry,
    stats: &'static WorkerStats,
    listener: Option<TcpListener>,
    accepting: Accepting,
    /// The listener sits in the epoll set with EPOLLEXCLUSIVE, level-triggered (see
    /// `EventLoop::listen_exclusive`), and must leave it while accepting is paused.
    exclusive: bool,
    backoff: AcceptBackoff,
    handle: Arc<LoopHandle>,
    shutdown: Arc<Shutdown>,
    signals: Option<signal_hook_mio::v1_0::Signals>,
    conns: Slab<Connection>,
    generations: u64,
    app: App,
    /// Requests held for the app, walked when the hub calls and at the earliest deadline.
    held: Held,
    _subscription: Subscription,
    headers: ReplyHeaders,
    now: Instant,
    sweep_every: Duration,
    next_sweep: Instant,
    draining_since: Option<Instant>,
    /// Scratch list of connection tokens, kept to avoid allocating per wake-up.
    scratch: Vec<usize>,
    /// Connections that spent their read budget with bytes still waiting: driven again next
    /// turn, after the loop has looked at everyone else (no new edge will come for them).
    unfinished: Vec<usize>,
}

impl EventLoop {
    /// A loop serving `app` with `stats` as its counters; give it a listener, or connections
    /// through its [`LoopHandle`], or both. It registers with `shutdown` to hear about SIGTERM,
    /// and with the app's hub to hear when held requests may be answered.
    pub fn new(
        config: ServeConfig,
        app: &App,
        stats: &'static WorkerStats,
        shutdown: Arc<Shutdown>,
    ) -> io::Result<EventLoop> {
        let poll = Poll::new()?;
        let handle = Arc::new(LoopHandle {
            waker: Waker::new(poll.registry(), WAKER)?,
            woken: AtomicBool::new(false),
            app_moved: AtomicBool::new(false),
            incoming: Mutex::new(Vec::new()),
            completed: Mutex::new(Vec::new()),
        });
        shutdown.register(handle.clone());
        let moved = handle.clone();
        let subscription = app.hub().subscribe(move || moved.app_moved());
        let now = Instant::now();
        let sweep_every = config.sweep_every();
        Ok(EventLoop {
            events: Events::with_capacity(1024),
            state: State {
                registry: poll.registry().try_clone()?,
                conns: Slab::with_capacity(config.max_conns.min(1024)),
                headers: ReplyHeaders::new(config.server_name),
                config,
                stats,
                listener: None,
                accepting: Accepting::No,
                exclusive: false,
                backoff: AcceptBackoff::default(),
                handle,
                shutdown,
                signals: None,
                generations: 0,
                app: app.clone(),
                held: Held::new(stats),
                _subscription: subscription,
                now,
                sweep_every,
                next_sweep: now + sweep_every,
                draining_since: None,
                scratch: Vec::new(),
                unfinished: Vec::new(),
            },
            poll,
        })
    }

    /// Accept connections from this listening socket (or a clone of one shared with other loops).
    pub fn listen(&mut self, listener: std::net::TcpListener) -> io::Result<()> {
        let mut listener = TcpListener::from_std(listener);
        self.poll
            .registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        self.state.listener = Some(listener);
        self.state.accepting = Accepting::Yes;
        Ok(())
    }

    /// Like [`EventLoop::listen`], for a listening socket shared with other loops, registered
    /// with EPOLLEXCLUSIVE so that a new connection wakes one of the loops waiting on it, not all
    /// of them (the thundering herd). mio has no such flag, so the listener is added to mio's
    /// epoll set directly, level-triggered, as nginx does.
    pub fn listen_exclusive(&mut self, listener: std::net::TcpListener) -> io::Result<()> {
        self.state.listener = Some(TcpListener::from_std(listener));
        self.state.exclusive = true;
        self.state.set_accepting(Accepting::Yes);
        Ok(())
    }

    /// Handle SIGTERM and SIGINT in this loop: it starts the shutdown of every loop.
    pub fn watch_signals(&mut self) -> io::Result<()> {
        let mut signals = signal_hook_mio::v1_0::Signals::new(crate::shutdown::STOP_SIGNALS)?;
        self.poll
            .registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        self.state.signals = Some(signals);
        Ok(())
    }

    /// The mailbox other threads use to reach this loop.
    pub fn handle(&self) -> Arc<LoopHandle> {
        self.state.handle.clone()
    }

    /// Serves until shutdown completes: every connection closed, or `--shutdown-timeout` passed.
    pub fn run(mut self, handler: &mut impl Handler) -> io::Result<()> {
        let s = &mut self.state;
        s.stats.bind_thread();
        s.tick();
        loop {
            let timeout = if s.unfinished.is_empty() {
                s.next_deadline().saturating_duration_since(s.now)
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut self.events, Some(timeout))
                && e.kind() != io::ErrorKind::Interrupted
            {
                return Err(e);
            }
            s.tick();
            for event in self.events.iter() {
                match event.token() {
                    LISTENER => {
                        let accepted = s.accept_all();
                        if accepted == 0 && matches!(s.accepting, Accepting::Yes) {
                            // Woken for a connection that another loop took first.
                            s.stats.wasted_wakeup();
                        }
                    }
                    WAKER => s.open_mailbox(handler),
                    SIGNALS => s.on_signal(),
                    Token(i) => {
                        if let Some(c) = s.conns.get_mut(i) {
                            c.readable |=
                                event.is_readable() || event.is_read_closed() || event.is_error();
                            c.writable |= event.is_writable() || event.is_error();
                            c.read_closed |= event.is_read_closed();
                            s.drive(i, handler);
                        }
                    }
                }
            }
            s.drive_unfinished(handler);
            if s.shutdown.is_requested() && s.draining_since.is_none() {
                s.start_draining(handler);
            }
            if let Accepting::Paused { until } = s.accepting
                && s.now >= until
            {
                s.set_accepting(Accepting::Yes);
                s.accept_all();
            }
            if s.held.deadline().is_some_and(|at| s.now >= at) {
                s.poll_held(handler);
            }
            if s.now >= s.next_sweep {
                s.sweep(handler);
            }
            if let Some(since) = s.draining_since
                && (s.conns.is_empty() || s.now >= since + s.config.shutdown_timeout)
            {
                return Ok(());
            }
        }
    }
}

impl State {
    /// Reads the clocks once per wake-up; the Date header changes at most once a second.
    fn tick(&mut self) {
        self.now = Instant::now();
        self.headers.refresh();
    }

    fn next_deadline(&self) -> Instant {
        let mut next = self.next_sweep;
        if let Some(held) = self.held.deadline() {
            next = next.min(held);
        }
        if let Accepting::Paused { until } = self.accepting {
            next = next.min(until);
        }
        if let Some(since) = self.draining_since {
            next = next.min(since + self.config.shutdown_timeout);
        }
        next
    }

    // ---- accepting -----------------------------------------------------------------------

    /// Accepts until the queue is empty (edge-triggered: no new edge comes for connections
    /// already waiting), unless a limit says wait. Returns how many it accepted.
    fn accept_all(&mut self) -> usize {
        let mut accepted = 0;
        while matches!(self.accepting, Accepting::Yes) {
            if self.conns.len() >= self.config.max_conns {
                // They wait in the kernel's accept queue; a close resumes accepting.
                self.set_accepting(Accepting::Full);
                break;
            }
            let Some(listener) = &self.listener else {
                break;
            };
            match listener.accept() {
                Ok((stream, _)) => {
                    self.add(stream);
                    self.backoff.succeeded();
                    accepted += 1;
                }
                // The queue is empty.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if is_out_of_resources(&e) => {
                    // Retrying at once would spin: the queued connection stays readable.
                    let delay = self.backoff.failed();
                    eprintln!(
                        "{}: accept: {e}; pausing accepts for {delay:?}",
                        self.config.server_name
                    );
                    self.set_accepting(Accepting::Paused {
                        until: self.now + delay,
                    });
                    break;
                }
                // The peer gave up while queued (ECONNABORTED) and the like: try the next one.
                Err(_) => continue,
            }
        }
        accepted
    }

    /// Moves between accepting and not. A level-triggered exclusive listener leaves the epoll
    /// set while paused, or every wait would return at once with it still readable.
    fn set_accepting(&mut self, next: Accepting) {
        let was = matches!(self.accepting, Accepting::Yes);
        let will = matches!(next, Accepting::Yes);
        self.accepting = next;
        if self.exclusive
            && was != will
            && let Some(listener) = &self.listener
        {
            let op = if will {
                libc::EPOLL_CTL_ADD
            } else {
                libc::EPOLL_CTL_DEL
            };
            let mut event = libc::epoll_event {
                events: (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32,
                u64: LISTENER.0 as u64,
            };
            // SAFETY: both descriptors are open and owned by this loop (the registry's
            // epoll set and the listener), and `event` is a valid epoll_event. mio decodes
            // `u64` as the event's token, so the loop sees this as a LISTENER event.
            let rc = unsafe {
                libc::epoll_ctl(
                    self.registry.as_raw_fd(),
                    op,
                    listener.as_raw_fd(),
                    &mut event,
                )
            };
            if rc != 0 {
                eprintln!(
                    "{}: epoll_ctl on the listener: {}",
                    self.config.server_name,
                    io::Error::last_os_error()
                );
            }
        }
    }

    fn add(&mut self, mut stream: TcpStream) {
        let entry = self.conns.vacant_entry();
        let token = Token(entry.key());
        // Both directions, once: edge-triggered, so no re-registration as interest changes.
        if self
            .registry
            .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
            .is_err()
        {
            return;
        }
        self.generations += 1;
        entry.insert(Connection {
            stream,
            http: Conn::new(self.config.conn.clone(), self.now),
            generation: self.generations,
            readable: false,
            writable: false,
            read_closed: false,
            stream_waits: false,
            upload: None,
        });
        self.stats.connection_opened();
    }

    fn close(&mut self, token: usize) {
        // Closing the socket removes it from the epoll set: no deregister call needed.
        drop(self.conns.remove(token));
        self.stats.connection_closed();
        if matches!(self.accepting, Accepting::Full) {
            self.set_accepting(Accepting::Yes);
            self.accept_all();
        }
    }

    // ---- mailbox and signals -------------------------------------------------------------

    fn open_mailbox(&mut self, handler: &mut impl Handler) {
        self.handle.woken.store(false, Ordering::Release);
        let incoming = std::mem::take(&mut *lock(&self.handle.incoming));
        for stream in incoming {
            if self.draining_since.is_some() || stream.set_nonblocking(true).is_err() {
                continue;
            }
            self.add(TcpStream::from_std(stream));
        }
        let completed = std::mem::take(&mut *lock(&self.handle.completed));
        let mut touched = std::mem::take(&mut self.scratch);
        for (origin, reply) in completed {
            if self
                .conns
                .get(origin.token)
                .is_some_and(|c| c.generation == origin.generation)
            {
                self.file(origin, reply);
                if !touched.contains(&origin.token) {
                    touched.push(origin.token);
                }
            }
        }
        // One drive per connection, however many of its replies came in: one write.
        for &token in &touched {
            self.drive(token, handler);
        }
        touched.clear();
        self.scratch = touched;
        if self.handle.app_moved.swap(false, Ordering::AcqRel) {
            self.poll_held(handler);
        }
    }

    // ---- held requests and streams -------------------------------------------------------

    /// Files a reply: into the connection now, or held by the loop until the app has it.
    fn file(&mut self, origin: Origin, reply: Reply) {
        if let Some(c) = self.conns.get_mut(origin.token) {
            let key = ConnKey {
                token: origin.token,
                generation: origin.generation,
            };
            if let Some(upload) = self.held.file(&mut c.http, key, origin.id, reply) {
                c.upload = Some(upload);
            }
        }
    }

    /// Polls every held request and stream: what is ready is filed into its connection, and
    /// each connection touched is driven once (one write for all it got).
    fn poll_held(&mut self, handler: &mut impl Handler) {
        let mut touched = std::mem::take(&mut self.scratch);
        self.held.poll(self.now, &mut self.conns, &mut touched);
        for &token in &touched {
            self.drive(token, handler);
        }
        touched.clear();
        self.scratch = touched;
    }

    fn on_signal(&mut self) {
        if let Some(signals) = &mut self.signals
            && signals.pending().next().is_some()
        {
            self.shutdown.trigger();
        }
    }

    /// Stop accepting and reading new requests; connections close as their replies go out.
    fn start_draining(&mut self, handler: &mut impl Handler) {
        self.set_accepting(Accepting::No);
        self.listener = None;
        // Held requests answer with what they have, streams end (the hub calls every loop).
        self.app.stop();
        let mut tokens = std::mem::take(&mut self.scratch);
        tokens.extend(self.conns.iter().map(|(t, _)| t));
        // A request that reached the socket before now is in flight too, though a loop busy in
        // a handler may not have had its readiness event yet: serve what has arrived.
        for &token in &tokens {
            if let Some(c) = self.conns.get_mut(token) {
                c.readable = true;
                self.drive(token, handler);
            }
        }
        // From now on each connection reads nothing after its current request; one that has
        // sent nothing yet gets the shutdown grace to send its first (proto decides).
        self.draining_since = Some(self.now);
        for &token in &tokens {
            if let Some(c) = self.conns.get_mut(token) {
                c.http.stop_reading(self.now);
                self.drive(token, handler);
            }
        }
        tokens.clear();
        self.scratch = tokens;
    }

    // ---- one connection ------------------------------------------------------------------

    /// Moves a connection as far as it can go: serve buffered requests, write the replies
    /// that are ready in one write, read more, and repeat. Then either close it, or give its
    /// buffers back to the pool while it waits.
    fn drive(&mut self, token: usize, handler: &mut impl Handler) {
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        let now = self.now;
        let mut reads = 0;
        loop {
            held::feed(&mut c.upload, &mut c.http);
            while let Some(req) = c.http.next_request() {
                self.stats.request();
                let origin = Origin {
                    token,
                    generation: c.generation,
                    id: req.id,
                };
                if let Some(reply) = handler.handle(&req, origin) {
                    let key = ConnKey {
                        token,
                        generation: c.generation,
                    };
                    if let Some(upload) = self.held.file(&mut c.http, key, origin.id, reply) {
                        c.upload = Some(upload);
                    }
                }
            }
            if c.writable && write_out(c, self.headers.get(), now).is_err() {
                return self.close(token);
            }
            if c.stream_waits && c.http.stream_budget() > 0 {
                c.stream_waits = false;
                self.held.output_drained(now);
            }
            if c.http.is_finished() && c.http.should_linger() {
                // Half-close, then drain what the peer still sends before closing, so that a
                // reset cannot destroy the last reply (nginx's lingering close).
                if c.stream.shutdown(Direction::Write).is_err() {
                    return self.close(token);
                }
                c.http.begin_linger(now);
                c.readable = true;
            }
            if !(c.readable && c.http.wants_read()) {
                break;
            }
            if reads == READS_PER_TURN {
                // Still readable: the others get their turn first.
                if !self.unfinished.contains(&token) {
                    self.unfinished.push(token);
                }
                break;
            }
            reads += 1;
            let buf = c.http.read_buf();
            let room = buf.len();
            match c.stream.read(buf) {
                // The peer is done sending; what it asked for is still answered.
                Ok(0) => {
                    c.http.read_eof();
                    c.readable = false;
                }
                Ok(n) => {
                    c.http.filled(n, now);
                    // A short read emptied the socket, and the next byte brings a new edge:
                    // this saves the read that would only return WouldBlock.
                    c.readable = n == room || c.read_closed;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.readable = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Reset by the peer, or worse: nobody is left to answer.
                Err(_) => return self.close(token),
            }
        }
        if c.http.is_finished() {
            self.close(token);
        } else {
            c.http.release_buffers();
        }
    }

    /// Drives the connections whose last turn ended on their read budget.
    fn drive_unfinished(&mut self, handler: &mut impl Handler) {
        let tokens = std::mem::take(&mut self.unfinished);
        for &token in &tokens {
            self.drive(token, handler);
        }
    }

    // ---- timeouts ------------------------------------------------------------------------

    /// Hands every connection whose deadline has passed to proto's `handle_timeout` (a 408, an
    /// idle close, the end of a lingering close...), then drives it.
    fn sweep(&mut self, handler: &mut impl Handler) {
        self.next_sweep = self.now + self.sweep_every;
        let now = self.now;
        let mut expired = std::mem::take(&mut self.scratch);
        for (token, c) in self.conns.iter_mut() {
            if c.http
                .poll_timeout()
                .is_some_and(|deadline| deadline <= now)
            {
                expired.push(token);
            }
        }
        for &token in &expired {
            if let Some(c) = self.conns.get_mut(token) {
                c.http.handle_timeout(now);
                c.writable = true;
                self.drive(token, handler);
            }
        }
        expired.clear();
        self.scratch = expired;
    }
}

/// Writes what the connection has ready, until the socket takes no more.
fn write_out(c: &mut Connection, common: &CommonHeaders, now: Instant) -> io::Result<()> {
    while c.writable {
        let out = c.http.output(common, now);
        if out.is_empty() {
            break;
        }
        match c.stream.write(out) {
            Ok(n) => c.http.written(n, now),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.writable = false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
