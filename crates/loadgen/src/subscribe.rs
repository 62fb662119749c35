//! Subscribers (`--subscribe N`: SSE streams; `--long-poll N`: long polls) held open while a
//! publisher posts messages at a fixed rate: how long each message takes to reach each
//! subscriber, and whether every one gets every message once.
//!
//! ```text
//!   main ── GET /messages?after=HUGE: the journal's head H, where every subscriber starts
//!    │   ── spawns sub-0 ... sub-T-1, each a mio event loop over its share of the N:
//!    │        SSE        GET URL, Last-Event-ID: H   -> 200 text/event-stream, `retry:`, events
//!    │        long poll  GET URL?after=A&wait=W      -> 200 {"head","messages"}; again at once
//!    ├─ waits until all are subscribed (or none more for --timeout)
//!    ├─ publishes: POST /messages `lg-RUN-k` at (k+1)/rate on one pipelined connection,
//!    │  each one's send time stored in a table every thread reads
//!    └─ waits until every subscriber has every message (or --timeout after the last POST)
//! ```
//!
//! A subscriber costs a socket and a few hundred bytes: no thread, no timer of its own. Per
//! event: one read, the chunk framing and the SSE lines walked in place (a line is copied only
//! when it arrives split across reads), the JSON parsed without allocating, one histogram
//! record, and a bit set in the subscriber's bitmap of messages (which finds duplicates, and
//! at the end the gaps).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io::{self, Read, Write};
use std::net::TcpStream as StdStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Poll, Token};

use crate::delivery::{Failure, FailureEvent, RunInfo, Summary, Tally};
use crate::engine::{
    connect_registered, connected, cpu_time, is_out_of_files, raise_nofile_limit, share, write_some,
};
use crate::http::ResponseReader;
use crate::messages;
use crate::spec::Target;
use crate::sse::{self, Field};

mod publisher;
use publisher::Publisher;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `GET URL` with `Accept: text/event-stream`: one stream per subscriber.
    Sse,
    /// `GET URL?after=A&wait=W&limit=L` in a loop.
    LongPoll,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The subscribers' URL: `/events?type=message`, or `/messages` for long polls.
    pub target: Target,
    pub mode: Mode,
    pub subscribers: usize,
    pub threads: usize,
    /// Messages per second, published for `duration`.
    pub rate: f64,
    pub duration: Duration,
    /// A connect, a POST's reply, or a long poll past its wait taking longer fails; also how
    /// long to wait for subscribers to keep coming, and for deliveries after the last POST.
    pub timeout: Duration,
    /// A long poll's `wait`.
    pub wait: Duration,
    /// Headers for every subscriber request, `Name: value`.
    pub headers: Vec<String>,
}

/// Where the run is, for the progress line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Subscribing,
    Publishing,
    Draining,
}

#[derive(Debug, Clone, Copy)]
pub struct Tick {
    pub elapsed: Duration,
    pub phase: Phase,
    pub subscribed: u64,
    pub sent: u64,
    pub deliveries: u64,
    pub failures: u64,
}

/// Messages a long poll asks for at most (the servers' largest `limit`).
pub const POLL_LIMIT: usize = 1000;
/// Where messages are posted, and the head is read, on the URL's host.
const MESSAGES_PATH: &str = "/messages";
/// Beyond any head: the server answers at once with its head and no message.
const BEYOND: u64 = (1 << 53) - 1;
/// Connects under way per thread at most: a burst of thousands would overflow the server's
/// accept queue and wait for SYN retransmits (1 s, 3 s, ...).
const CONNECT_WINDOW: usize = 256;
/// How long a subscriber waits before reconnecting, until the server says (`retry:`).
const DEFAULT_RETRY: Duration = Duration::from_secs(1);
const PUBLISHER_RETRY: Duration = Duration::from_millis(100);
const TICK: Duration = Duration::from_millis(100);
const READ_BUF: usize = 64 * 1024;
/// The largest bitmap of deliveries (subscribers x messages bits) the run may hold.
const MAX_BITMAP: usize = 1 << 30;

/// Runs subscribers and the publisher; returns what they measured. `on_tick` is called about
/// four times a second.
pub fn run(cfg: &Config, mut on_tick: impl FnMut(&Tick)) -> Result<Summary, String> {
    if cfg.threads == 0 || cfg.subscribers < cfg.threads {
        return Err("--threads: must not exceed the subscribers".into());
    }
    let messages = (cfg.rate * cfg.duration.as_secs_f64()).floor() as usize;
    if messages == 0 {
        return Err("--rate: at this rate no message falls due within --duration".into());
    }
    if cfg.subscribers.saturating_mul(messages.div_ceil(64) * 8) > MAX_BITMAP {
        return Err(format!(
            "--rate: {} subscribers x {messages} messages would need over {} MiB of bitmaps",
            cfg.subscribers,
            MAX_BITMAP >> 20
        ));
    }
    raise_nofile_limit();
    let head = read_head(cfg)?;
    let epoch = Instant::now();
    let run_id = {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        (u64::from(std::process::id()) << 32 | u64::from(nanos)) % (1 << 40)
    };
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        prefix: format!("lg-{run_id:x}-"),
        head,
        epoch,
        messages,
        sent: (0..messages).map(|_| AtomicU64::new(0)).collect(),
        confirmed: (0..messages.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect(),
        published: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        progress: (0..cfg.threads).map(|_| Progress::default()).collect(),
    });

    let mut handles = Vec::new();
    let mut first = 0;
    for i in 0..cfg.threads {
        let n = share(cfg.subscribers as u64, cfg.threads, i) as usize;
        let shared = shared.clone();
        let h = thread::Builder::new()
            .name(format!("sub-{i}"))
            .spawn(move || Worker::new(&shared, i, first, n)?.run())
            .map_err(|e| format!("spawning a subscriber thread: {e}"))?;
        handles.push(h);
        first += n;
    }
    let stop = |shared: &Shared, handles: Vec<thread::JoinHandle<Result<Done, String>>>| {
        shared.stop.store(true, Ordering::Relaxed);
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| "a subscriber thread panicked".to_string())?
            })
            .collect::<Result<Vec<Done>, String>>()
    };
    let tick = |phase, sent| {
        let mut t = Tick {
            elapsed: epoch.elapsed(),
            phase,
            subscribed: 0,
            sent,
            deliveries: 0,
            failures: 0,
        };
        for p in &shared.progress {
            t.subscribed += p.subscribed.load(Ordering::Relaxed);
            t.deliveries += p.deliveries.load(Ordering::Relaxed);
            t.failures += p.failures.load(Ordering::Relaxed);
        }
        t
    };

    // Subscribing: until all are, or none more for --timeout.
    let (mut best, mut progressed) = (0, Instant::now());
    loop {
        if handles.iter().any(|h| h.is_finished()) {
            // A thread ended early: only an error does that.
            stop(&shared, handles)?;
            return Err("a subscriber thread ended early".into());
        }
        let t = tick(Phase::Subscribing, 0);
        on_tick(&t);
        if t.subscribed as usize >= cfg.subscribers {
            break;
        }
        if t.subscribed > best {
            (best, progressed) = (t.subscribed, Instant::now());
        } else if progressed.elapsed() > cfg.timeout {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let setup = epoch.elapsed();
    let subscribed = tick(Phase::Subscribing, 0).subscribed;

    // Publishing, then waiting for the deliveries.
    let mut publisher = Publisher::new(&shared)?;
    let deadline = publisher.run(|sent| on_tick(&tick(Phase::Publishing, sent)));
    let published = publisher.result;
    shared.published.store(true, Ordering::Release);
    while Instant::now() < deadline
        && !shared
            .progress
            .iter()
            .all(|p| p.complete.load(Ordering::Acquire))
    {
        on_tick(&tick(Phase::Draining, published.sent));
        thread::sleep(Duration::from_millis(20));
    }
    let subscribed_at_end = tick(Phase::Draining, published.sent).subscribed;
    let done = stop(&shared, handles)?;
    let cpu = cpu_time();

    let mut total = Tally::new(messages);
    for d in &done {
        total.merge(&d.tally);
    }
    // Failure times: from seconds since the epoch to seconds since publishing began.
    for e in &mut total.failure_events {
        e.at_s = ((e.at_s - setup.as_secs_f64()) * 1000.0).round() / 1000.0;
    }
    let info = RunInfo {
        url: format!("http://{}{}", cfg.target.host, cfg.target.path),
        mode: match cfg.mode {
            Mode::Sse => "sse",
            Mode::LongPoll => "long-poll",
        },
        threads: cfg.threads,
        subscribers: cfg.subscribers,
        rate: cfg.rate,
        duration: cfg.duration,
        setup,
        subscribed,
        subscribed_at_end,
        cpu,
    };
    Ok(Summary::new(info, &total, &published))
}

struct Shared {
    cfg: Config,
    /// Every body this run posts starts with it: `lg-RUN-`, then the message's number.
    prefix: String,
    /// The journal's head before the run: every subscriber starts after it.
    head: u64,
    epoch: Instant,
    messages: usize,
    /// Per message: when its POST was written, in ns since `epoch` (at least 1); 0 before.
    sent: Box<[AtomicU64]>,
    /// A bit per message: its POST was answered 201.
    confirmed: Box<[AtomicU64]>,
    /// The publisher is done: `confirmed` is final.
    published: AtomicBool,
    stop: AtomicBool,
    progress: Vec<Progress>,
}

impl Shared {
    fn ns(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// This run's message number in `body`, if it is one of this run's.
    fn number(&self, body: &str) -> Option<usize> {
        let n: usize = body.strip_prefix(&self.prefix)?.parse().ok()?;
        (n < self.messages).then_some(n)
    }
}

/// Live counts a thread publishes for the main thread.
#[derive(Default)]
#[repr(align(128))] // a cache line pair each: threads don't share lines
struct Progress {
    subscribed: AtomicU64,
    deliveries: AtomicU64,
    failures: AtomicU64,
    /// Every subscriber of the thread has every confirmed message (once publishing is over).
    complete: AtomicBool,
}

struct Done {
    tally: Tally,
}

/// Reads the journal's head: `GET /messages?after=BEYOND` is answered at once.
fn read_head(cfg: &Config) -> Result<u64, String> {
    let what = format!("reading the journal's head (GET {MESSAGES_PATH}?after={BEYOND})");
    let fail = |e: String| format!("{what}: {e}");
    let mut s = StdStream::connect_timeout(&cfg.target.addr, cfg.timeout)
        .map_err(|e| fail(e.to_string()))?;
    s.set_read_timeout(Some(cfg.timeout))
        .and_then(|()| s.set_write_timeout(Some(cfg.timeout)))
        .map_err(|e| fail(e.to_string()))?;
    let req = format!(
        "GET {MESSAGES_PATH}?after={BEYOND} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        cfg.target.host
    );
    s.write_all(req.as_bytes())
        .map_err(|e| fail(e.to_string()))?;
    let mut input = Vec::new();
    let mut buf = [0u8; 4096];
    let mut reader = ResponseReader::new();
    let mut body = Vec::new();
    let done = loop {
        let n = s.read(&mut buf).map_err(|e| fail(e.to_string()))?;
        if n == 0 {
            match reader.eof() {
                Some(done) => break done,
                None => return Err(fail("the server closed before replying".into())),
            }
        }
        input.extend_from_slice(&buf[..n]);
        let (used, done) = reader
            .advance_with(&input, false, |b| body.extend_from_slice(b))
            .map_err(|e| fail(format!("{e:?}")))?;
        input.drain(..used);
        if let Some(done) = done {
            break done;
        }
    };
    if done.status != 200 {
        return Err(fail(format!(
            "status {}: {}",
            done.status,
            String::from_utf8_lossy(&body).trim()
        )));
    }
    messages::poll(&body, |_, _| {})
        .map(|p| p.head)
        .map_err(|e| fail(format!("not the messages' JSON: {e}")))
}

// ---------------------------------------------------------------- subscribers

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No socket: waiting for its reconnect time, or for room in the connect window.
    Idle,
    Connecting,
    /// The request is sent: SSE waits for the head; a long poll for its whole reply.
    Requested,
    /// SSE: the head is in; events follow.
    Streaming,
}

/// One subscriber: its connection and what it has received.
struct Sub {
    stream: Option<TcpStream>,
    state: State,
    /// Bumped at each close: tells an event for the old socket from one for the new.
    generation: u32,
    /// When it started connecting, or sent its request.
    since: Instant,
    reader: ResponseReader,
    /// A reply head split across reads.
    leftover: Vec<u8>,
    /// Request bytes the socket did not take yet.
    out: Vec<u8>,
    /// A long poll's reply body so far.
    body: Vec<u8>,
    sse: sse::Parser,
    track: Track,
}

/// What a subscriber keeps across its connections.
struct Track {
    /// A bit per message number: received.
    received: Box<[u64]>,
    /// The highest seq received.
    last_seq: u64,
    /// SSE: the last event id (sent as `Last-Event-ID`); long poll: the next `after`.
    resume: u64,
    /// Wait before reconnecting.
    retry: Duration,
    /// Counted as subscribed right now.
    subscribed: bool,
    /// SSE: this connection's stream has given its first line (`retry:`, from our servers).
    started: bool,
    failed: bool,
    disconnected: bool,
    /// SSE: the event being read.
    event: PendingEvent,
}

#[derive(Default)]
struct PendingEvent {
    /// Its type is not `message` (an `event: job`).
    other: bool,
    /// Its data: the message's seq, and its number if it is one of this run's.
    data: Option<(u64, Option<usize>)>,
    /// Data that is not a message's JSON.
    bad: bool,
}

impl Sub {
    fn new(now: Instant, messages: usize, head: u64) -> Sub {
        Sub {
            stream: None,
            state: State::Idle,
            generation: 0,
            since: now,
            reader: ResponseReader::new(),
            leftover: Vec::new(),
            out: Vec::new(),
            body: Vec::new(),
            sse: sse::Parser::new(),
            track: Track {
                received: vec![0; messages.div_ceil(64)].into_boxed_slice(),
                last_seq: head,
                resume: head,
                retry: DEFAULT_RETRY,
                subscribed: false,
                started: false,
                failed: false,
                disconnected: false,
                event: PendingEvent::default(),
            },
        }
    }
}

/// What reading some input led to.
enum Step {
    /// Bytes from this offset on are an incomplete head: keep them for the next read.
    Carry(usize),
    /// A long poll's reply is complete: send the next poll.
    Poll,
    /// A long poll's reply said `Connection: close`: reconnect at once.
    Reconnect,
    Fail(Failure),
}

struct Worker<'a> {
    shared: &'a Shared,
    cfg: &'a Config,
    progress: &'a Progress,
    poll: Poll,
    subs: Vec<Sub>,
    /// The global number of `subs[0]`.
    first: usize,
    tally: Tally,
    subscribed: u64,
    rbuf: Box<[u8]>,
    /// A request being built.
    scratch: Vec<u8>,
    connecting: usize,
    /// Waiting for room in the connect window.
    queue: VecDeque<usize>,
    /// Reconnects, soonest first.
    retries: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Subscribers before this one have every confirmed message (checked once publishing ends).
    complete_upto: usize,
}

impl<'a> Worker<'a> {
    fn new(shared: &'a Shared, i: usize, first: usize, n: usize) -> Result<Worker<'a>, String> {
        let now = Instant::now();
        Ok(Worker {
            shared,
            cfg: &shared.cfg,
            progress: &shared.progress[i],
            poll: Poll::new().map_err(|e| format!("epoll: {e}"))?,
            subs: (0..n)
                .map(|_| Sub::new(now, shared.messages, shared.head))
                .collect(),
            first,
            tally: Tally::new(shared.messages),
            subscribed: 0,
            rbuf: vec![0; READ_BUF].into_boxed_slice(),
            scratch: Vec::with_capacity(512),
            connecting: 0,
            queue: (0..n).collect(),
            retries: BinaryHeap::new(),
            complete_upto: 0,
        })
    }

    fn run(mut self) -> Result<Done, String> {
        let mut events = Events::with_capacity(1024);
        let now = Instant::now();
        self.fill_window(now)?;
        let mut next_tick = now + TICK;
        while !self.shared.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let mut wake = next_tick;
            if let Some(Reverse((at, _))) = self.retries.peek() {
                wake = wake.min(*at);
            }
            if let Err(e) = self
                .poll
                .poll(&mut events, Some(wake.saturating_duration_since(now)))
                && e.kind() != io::ErrorKind::Interrupted
            {
                return Err(format!("epoll_wait: {e}"));
            }
            for ev in events.iter() {
                self.event(ev.token().0, ev);
            }
            let now = Instant::now();
            while let Some(&Reverse((at, i))) = self.retries.peek() {
                if at > now {
                    break;
                }
                self.retries.pop();
                self.queue.push_back(i);
            }
            self.fill_window(now)?;
            if now >= next_tick {
                next_tick = now + TICK;
                self.check_timeouts(now);
                self.check_complete();
            }
            self.progress
                .subscribed
                .store(self.subscribed, Ordering::Relaxed);
            self.progress
                .deliveries
                .store(self.tally.deliveries, Ordering::Relaxed);
            self.progress
                .failures
                .store(self.tally.failures.iter().sum(), Ordering::Relaxed);
        }
        self.count_missing();
        Ok(Done { tally: self.tally })
    }

    /// Starts connects while the window has room.
    fn fill_window(&mut self, now: Instant) -> Result<(), String> {
        while self.connecting < CONNECT_WINDOW {
            let Some(i) = self.queue.pop_front() else {
                break;
            };
            let result = connect_registered(&self.poll, self.cfg.target.addr, Token(i), None);
            self.tally.connects += 1;
            let sub = &mut self.subs[i];
            sub.since = now;
            match result {
                Ok(s) => {
                    sub.stream = Some(s);
                    sub.state = State::Connecting;
                    self.connecting += 1;
                }
                Err(e) if is_out_of_files(&e) => {
                    return Err(format!(
                        "out of file descriptors at {} subscribers on this thread ({e})",
                        self.subs.len() - self.queue.len()
                    ));
                }
                Err(_) => self.fail(i, Failure::Connect, now),
            }
        }
        Ok(())
    }

    fn event(&mut self, i: usize, ev: &mio::event::Event) {
        let now = Instant::now();
        let generation = self.subs[i].generation;
        if self.subs[i].state == State::Connecting {
            let Some(s) = &self.subs[i].stream else {
                return;
            };
            match connected(s) {
                Ok(true) if !ev.is_error() => {
                    self.connecting -= 1;
                    self.send_request(i, now);
                }
                Ok(false) if !ev.is_error() => return,
                _ => return self.fail(i, Failure::Connect, now),
            }
            if self.subs[i].generation != generation {
                return;
            }
        }
        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
            self.read(i, ev.is_read_closed());
            if self.subs[i].generation != generation {
                return;
            }
        }
        if ev.is_writable() && !self.subs[i].out.is_empty() {
            self.flush(i, now);
        }
    }

    /// Sends the subscription (SSE) or the next poll.
    fn send_request(&mut self, i: usize, now: Instant) {
        let sub = &mut self.subs[i];
        let cfg = self.cfg;
        let b = &mut self.scratch;
        b.clear();
        b.extend_from_slice(b"GET ");
        b.extend_from_slice(cfg.target.path.as_bytes());
        let mut num = itoa::Buffer::new();
        match cfg.mode {
            Mode::Sse => {}
            Mode::LongPoll => {
                b.push(if cfg.target.path.contains('?') {
                    b'&'
                } else {
                    b'?'
                });
                b.extend_from_slice(b"after=");
                b.extend_from_slice(num.format(sub.track.resume).as_bytes());
                b.extend_from_slice(b"&wait=");
                b.extend_from_slice(num.format(cfg.wait.as_millis() as u64).as_bytes());
                b.extend_from_slice(b"ms&limit=");
                b.extend_from_slice(num.format(POLL_LIMIT as u64).as_bytes());
            }
        }
        b.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        b.extend_from_slice(cfg.target.host.as_bytes());
        b.extend_from_slice(b"\r\n");
        if cfg.mode == Mode::Sse {
            b.extend_from_slice(b"Accept: text/event-stream\r\nLast-Event-ID: ");
            b.extend_from_slice(num.format(sub.track.resume).as_bytes());
            b.extend_from_slice(b"\r\n");
        }
        for h in &cfg.headers {
            b.extend_from_slice(h.as_bytes());
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(b"\r\n");
        sub.state = State::Requested;
        sub.since = now;
        sub.out.extend_from_slice(b);
        if cfg.mode == Mode::LongPoll && !sub.track.subscribed {
            // A long poll is "subscribed" once its poll is on its way: the server holds it.
            sub.track.subscribed = true;
            self.subscribed += 1;
        }
        self.flush(i, now);
    }

    fn flush(&mut self, i: usize, now: Instant) {
        let sub = &mut self.subs[i];
        let Some(s) = sub.stream.as_mut() else { return };
        match write_some(s, &sub.out) {
            Ok(n) => drop(sub.out.drain(..n)),
            Err(_) => self.fail(i, Failure::Write, now),
        }
    }

    /// Reads until the socket is drained; `to_eof`: on to the peer's end-of-file.
    fn read(&mut self, i: usize, to_eof: bool) {
        loop {
            let Some(s) = self.subs[i].stream.as_mut() else {
                return;
            };
            match s.read(&mut self.rbuf) {
                Ok(0) => return self.eof(i),
                Ok(n) => {
                    let now = Instant::now();
                    if !self.input(i, n, now) {
                        return;
                    }
                    // A short read means the socket is drained (see engine.rs).
                    if n < self.rbuf.len() && !to_eof {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.fail(i, Failure::Read, Instant::now()),
            }
        }
    }

    /// Takes `rbuf[..n]`, after any carried bytes; false if the connection was closed.
    fn input(&mut self, i: usize, n: usize, now: Instant) -> bool {
        let sub = &mut self.subs[i];
        let now_ns = self.shared.ns(now);
        let mut carried = std::mem::take(&mut sub.leftover);
        let step = if carried.is_empty() {
            let step = consume(sub, &mut self.tally, self.shared, &self.rbuf[..n], now_ns);
            if let Step::Carry(used) = step {
                carried.extend_from_slice(&self.rbuf[used..n]);
            }
            step
        } else {
            carried.extend_from_slice(&self.rbuf[..n]);
            let step = consume(sub, &mut self.tally, self.shared, &carried, now_ns);
            match step {
                Step::Carry(used) => drop(carried.drain(..used)),
                _ => carried.clear(),
            }
            step
        };
        sub.leftover = carried;
        match step {
            Step::Carry(_) => {
                if !sub.track.subscribed && sub.track.started {
                    sub.track.subscribed = true;
                    self.subscribed += 1;
                }
                true
            }
            Step::Poll => {
                self.send_request(i, now);
                self.subs[i].stream.is_some()
            }
            Step::Reconnect => {
                self.close(i);
                self.queue.push_back(i);
                false
            }
            Step::Fail(kind) => {
                self.fail(i, kind, now);
                false
            }
        }
    }

    /// The server closed the connection.
    fn eof(&mut self, i: usize) {
        let now = Instant::now();
        let sub = &mut self.subs[i];
        if self.cfg.mode == Mode::LongPoll
            && sub.state == State::Requested
            && let Some(done) = sub.reader.eof()
        {
            // A reply whose body ran to the close.
            let now_ns = self.shared.ns(now);
            return match finish_poll(sub, &mut self.tally, self.shared, done.status, now_ns) {
                Step::Fail(kind) => self.fail(i, kind, now),
                _ => {
                    self.close(i);
                    self.queue.push_back(i);
                }
            };
        }
        self.fail(i, Failure::Closed, now);
    }

    /// Counts the failure, drops the connection and schedules the reconnect.
    fn fail(&mut self, i: usize, kind: Failure, now: Instant) {
        let sub = &mut self.subs[i];
        let was = sub.track.subscribed;
        if !sub.track.failed {
            sub.track.failed = true;
            self.tally.subscribers_failed += 1;
        }
        if was && !sub.track.disconnected {
            sub.track.disconnected = true;
            self.tally.subscribers_disconnected += 1;
        }
        let retry = sub.track.retry;
        self.tally.failure(
            kind,
            FailureEvent {
                // Seconds since the epoch for now; the main thread makes it relative.
                at_s: now
                    .saturating_duration_since(self.shared.epoch)
                    .as_secs_f64(),
                subscriber: self.first + i,
                kind: kind.name().to_string(),
                was_subscribed: was,
            },
        );
        self.close(i);
        self.retries.push(Reverse((now + retry, i)));
    }

    /// Drops subscriber `i`'s connection and what was under way on it.
    fn close(&mut self, i: usize) {
        let sub = &mut self.subs[i];
        if sub.state == State::Connecting {
            self.connecting -= 1;
        }
        if sub.track.subscribed {
            sub.track.subscribed = false;
            self.subscribed -= 1;
        }
        // Dropping the socket removes it from the epoll set.
        sub.stream = None;
        sub.state = State::Idle;
        sub.generation = sub.generation.wrapping_add(1);
        sub.reader = ResponseReader::new();
        sub.leftover.clear();
        sub.out.clear();
        sub.body.clear();
        sub.sse.reset();
        sub.track.event = PendingEvent::default();
        sub.track.started = false;
    }

    fn check_timeouts(&mut self, now: Instant) {
        let poll_limit = self.cfg.wait + self.cfg.timeout;
        for i in 0..self.subs.len() {
            let sub = &self.subs[i];
            let waited = now.saturating_duration_since(sub.since);
            match sub.state {
                State::Connecting if waited > self.cfg.timeout => {
                    self.fail(i, Failure::Connect, now)
                }
                // SSE waits for its head as long as it takes: a server at its limit leaves
                // connections in its accept queue, and that is what the run reports.
                State::Requested if self.cfg.mode == Mode::LongPoll && waited > poll_limit => {
                    self.fail(i, Failure::Timeout, now)
                }
                _ => {}
            }
        }
    }

    /// Once publishing is over: whether every subscriber has every confirmed message.
    fn check_complete(&mut self) {
        if !self.shared.published.load(Ordering::Acquire) {
            return;
        }
        let confirmed: Vec<u64> = self
            .shared
            .confirmed
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .collect();
        // Subscribers only gain messages, so those found complete stay complete.
        while let Some(sub) = self.subs.get(self.complete_upto) {
            let has_all = sub
                .track
                .received
                .iter()
                .zip(&confirmed)
                .all(|(r, c)| c & !r == 0);
            if !has_all {
                return;
            }
            self.complete_upto += 1;
        }
        self.progress.complete.store(true, Ordering::Release);
    }

    /// At the end: each subscriber's confirmed messages never received, and of those the ones
    /// it skipped (it received a later one).
    fn count_missing(&mut self) {
        let confirmed: Vec<u64> = self
            .shared
            .confirmed
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .collect();
        for sub in &self.subs {
            let r = &sub.track.received;
            // Bits below the highest message received.
            let highest = r
                .iter()
                .rposition(|&w| w != 0)
                .map(|w| w * 64 + 63 - r[w].leading_zeros() as usize);
            for (w, (&got, &conf)) in r.iter().zip(&confirmed).enumerate() {
                let miss = conf & !got;
                self.tally.missing += u64::from(miss.count_ones());
                let below = match highest {
                    Some(h) if h >= (w + 1) * 64 => u64::MAX,
                    Some(h) if h >= w * 64 => (1u64 << (h - w * 64)) - 1,
                    _ => 0,
                };
                self.tally.gaps += u64::from((miss & below).count_ones());
            }
        }
    }
}

/// Reads `data` on subscriber `sub`: the reply head, then SSE events or a long poll's reply.
fn consume(sub: &mut Sub, tally: &mut Tally, shared: &Shared, data: &[u8], now_ns: u64) -> Step {
    match shared.cfg.mode {
        Mode::Sse => consume_sse(sub, tally, shared, data, now_ns),
        Mode::LongPoll => consume_poll(sub, tally, shared, data, now_ns),
    }
}

fn consume_sse(
    sub: &mut Sub,
    tally: &mut Tally,
    shared: &Shared,
    data: &[u8],
    now_ns: u64,
) -> Step {
    let mut pos = 0;
    if sub.state == State::Requested {
        match sub.reader.read_head(data, false) {
            Err(_) => return Step::Fail(Failure::Parse),
            Ok(None) => return Step::Carry(0),
            Ok(Some(n)) => {
                tally.status(sub.reader.status());
                if sub.reader.status() != 200 {
                    return Step::Fail(Failure::Status);
                }
                if !sub.reader.event_stream() {
                    return Step::Fail(Failure::Parse);
                }
                sub.state = State::Streaming;
                pos = n;
            }
        }
    }
    let Sub {
        reader, sse, track, ..
    } = sub;
    let mut too_long = false;
    let result = reader.advance_with(&data[pos..], false, |bytes| {
        if too_long {
            return;
        }
        too_long = sse
            .feed(bytes, |f| on_field(track, tally, shared, f, now_ns))
            .is_err();
    });
    match result {
        Err(_) => Step::Fail(Failure::Parse),
        _ if too_long => Step::Fail(Failure::Parse),
        // The stream ended: the server closed it (it may keep the connection).
        Ok((_, Some(_))) => Step::Fail(Failure::Closed),
        Ok((n, None)) => Step::Carry(pos + n),
    }
}

/// One line of an event stream.
fn on_field(t: &mut Track, tally: &mut Tally, shared: &Shared, f: Field<'_>, now_ns: u64) {
    if matches!(f, Field::Retry(_) | Field::Comment | Field::Dispatch) {
        t.started = true;
    }
    match f {
        Field::Retry(ms) => t.retry = Duration::from_millis(ms),
        Field::Id(v) => {
            if let Some(id) = std::str::from_utf8(v).ok().and_then(|v| v.parse().ok()) {
                t.resume = id;
            }
        }
        Field::Event(v) => t.event.other = v != b"message",
        Field::Data(v) => match messages::message(v) {
            Ok(m) => t.event.data = Some((m.seq, shared.number(&m.body))),
            Err(_) => t.event.bad = true,
        },
        Field::Comment => tally.comments += 1,
        Field::Dispatch => {
            let e = std::mem::take(&mut t.event);
            match e.data {
                _ if e.other => {}
                Some((seq, n)) => deliver(t, tally, shared, seq, n, now_ns),
                None if e.bad => tally.unparsed += 1,
                None => {}
            }
        }
        Field::Other => {}
    }
}

fn consume_poll(
    sub: &mut Sub,
    tally: &mut Tally,
    shared: &Shared,
    data: &[u8],
    now_ns: u64,
) -> Step {
    if sub.state != State::Requested {
        // Bytes nobody asked for.
        return Step::Fail(Failure::Parse);
    }
    let body = &mut sub.body;
    match sub
        .reader
        .advance_with(data, false, |b| body.extend_from_slice(b))
    {
        Err(_) => Step::Fail(Failure::Parse),
        Ok((n, None)) => Step::Carry(n),
        Ok((n, Some(done))) => {
            if n < data.len() {
                return Step::Fail(Failure::Parse);
            }
            match finish_poll(sub, tally, shared, done.status, now_ns) {
                Step::Poll if done.close => Step::Reconnect,
                step => step,
            }
        }
    }
}

/// A long poll's reply is in `sub.body`: its messages are delivered and the next `after` set.
fn finish_poll(
    sub: &mut Sub,
    tally: &mut Tally,
    shared: &Shared,
    status: u16,
    now_ns: u64,
) -> Step {
    tally.status(status);
    tally.polls += 1;
    if status != 200 {
        return Step::Fail(Failure::Status);
    }
    let t = &mut sub.track;
    let parsed = messages::poll(&sub.body, |seq, body| {
        let n = shared.number(body);
        deliver(t, tally, shared, seq, n, now_ns);
    });
    sub.body.clear();
    match parsed {
        Ok(p) => {
            // Next: after the head, unless the reply was cut at the limit (then after its
            // last message, or the rest would be skipped).
            t.resume = match p.last {
                Some(last) if p.count >= POLL_LIMIT => last,
                _ => p.head,
            };
            Step::Poll
        }
        Err(_) => Step::Fail(Failure::Parse),
    }
}

/// Message `seq` (this run's number `n`, if it is one) reached a subscriber at `now_ns`.
fn deliver(
    t: &mut Track,
    tally: &mut Tally,
    shared: &Shared,
    seq: u64,
    n: Option<usize>,
    now_ns: u64,
) {
    let sent = n.map_or(0, |n| shared.sent[n].load(Ordering::Acquire));
    let Some(n) = n.filter(|_| sent > 0) else {
        tally.foreign += 1;
        return;
    };
    let (word, bit) = (n / 64, 1u64 << (n % 64));
    if t.received[word] & bit != 0 {
        tally.duplicates += 1;
        return;
    }
    t.received[word] |= bit;
    if seq < t.last_seq {
        tally.reordered += 1;
    } else {
        t.last_seq = seq;
    }
    tally.delivered(n, now_ns.saturating_sub(sent));
}
