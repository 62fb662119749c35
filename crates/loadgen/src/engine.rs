//! The load threads: each one a mio event loop over its share of the connections.
//!
//! ```text
//!   main ── spawns ──▶ load-0 ... load-T-1     each: one Poll (edge-triggered), its own
//!    │                   │                     connections, recorder, RNG and pacing clock
//!    │  barrier: idle connections are open     ├─ closed loop: a reply sends the next request
//!    │  start, warm-up, window, progress line  └─ open loop: requests fall due at --rate / T;
//!    └─ joins, merges the recorders               a due request takes the next connection with
//!                                                 room, and its latency counts from when it fell
//!                                                 due (wrk2's coordinated-omission correction)
//! ```
//!
//! The hot path per reply: one read (often carrying several replies), the reply framed by
//! [`crate::http::ResponseReader`] without copying its body, one histogram record, the next
//! request's pre-encoded bytes appended, one write per read. A short read means the socket is
//! drained (TCP hands over everything it holds), so no extra read waits for `WouldBlock`; any
//! later data raises a new edge.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Protocol, Socket, Type};

use crate::http::ResponseReader;
use crate::spec::{Mix, Rng, Target};
use crate::stats::{ErrorKind, Recorder, RunInfo, Summary, Totals};

/// When to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Measure for this long after the warm-up.
    Duration(Duration),
    /// Send this many requests after the warm-up and wait for their replies.
    Requests(u64),
}

/// Who closes in connection-per-request mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// The client closes once the reply is in.
    Client,
    /// The client sends `Connection: close` and waits for the server to close.
    Server,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub target: Target,
    pub mix: Mix,
    pub headers: Vec<String>,
    pub threads: usize,
    pub connections: usize,
    pub pipeline: usize,
    /// Requests per second over all connections (open loop); `None`: closed loop.
    pub rate: Option<f64>,
    pub stop: Stop,
    pub warmup: Duration,
    pub close: Option<Close>,
    /// Read at most this many bytes per second per connection.
    pub slow_read: Option<u64>,
    /// Connections opened before the run that never send (but see `idle_request`).
    pub idle: usize,
    /// Each idle connection first sends one request (the mix's first class) and reads its
    /// reply, then falls silent: a keep-alive client between requests.
    pub idle_request: bool,
    pub timeout: Duration,
}

/// Live counters a thread publishes for the progress line.
#[derive(Default)]
#[repr(align(128))] // one per cache line pair: threads don't share lines
pub struct Progress {
    pub responses: AtomicU64,
    pub errors: AtomicU64,
}

/// Runs the load and returns what it measured. `on_tick` is called about every 250 ms with
/// the time since the start and the replies and errors so far (warm-up included).
pub fn run(cfg: &Config, mut on_tick: impl FnMut(Duration, u64, u64)) -> Result<Summary, String> {
    if cfg.connections.max(cfg.idle) < cfg.threads {
        return Err("--connections: must be at least --threads".into());
    }
    if cfg.connections == 0 && (cfg.idle == 0 || cfg.rate.is_some()) {
        return Err("--connections: 0 only with --idle, and without --rate".into());
    }
    if cfg.connections == 0 && matches!(cfg.stop, Stop::Requests(_)) {
        return Err("--requests: needs --connections of at least 1".into());
    }
    raise_nofile_limit();
    let wire: Vec<Vec<u8>> = cfg
        .mix
        .classes
        .iter()
        .map(|c| {
            c.encode(
                &cfg.target.host,
                &cfg.headers,
                cfg.close == Some(Close::Server),
            )
        })
        .collect();
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        wire,
        barrier: Barrier::new(cfg.threads + 1),
        progress: (0..cfg.threads).map(|_| Progress::default()).collect(),
    });

    let mut handles = Vec::new();
    for i in 0..cfg.threads {
        let shared = shared.clone();
        let handle = thread::Builder::new()
            .name(format!("load-{i}"))
            .spawn(move || match Worker::new(&shared, i) {
                Ok(w) => w.run(),
                Err(e) => {
                    // Meet the others at the barrier anyway, or they would wait forever.
                    shared.barrier.wait();
                    Err(e)
                }
            })
            .map_err(|e| format!("spawning a load thread: {e}"))?;
        handles.push(handle);
    }

    // Every thread has its idle connections open (or gave up on them): go.
    shared.barrier.wait();
    let start = Instant::now();
    let measure_start = start + cfg.warmup;
    let mut cpu_start = None;
    while !handles.iter().all(|h| h.is_finished()) {
        let now = Instant::now();
        if cpu_start.is_none() && now >= measure_start {
            cpu_start = Some(cpu_time());
        }
        let (responses, errors) = shared.progress.iter().fold((0, 0), |(r, e), p| {
            (
                r + p.responses.load(Ordering::Relaxed),
                e + p.errors.load(Ordering::Relaxed),
            )
        });
        on_tick(now - start, responses, errors);
        let next = if now < measure_start {
            (measure_start - now).min(Duration::from_millis(250))
        } else {
            Duration::from_millis(250)
        };
        sleep_until_finished(&handles, next);
    }
    let cpu_end = cpu_time();
    let cpu = cpu_end.saturating_sub(cpu_start.unwrap_or(cpu_end));

    let mut total = Recorder::new(cfg.mix.classes.len());
    let (mut window, mut all) = (Duration::ZERO, 0);
    let (mut idle_open, mut idle_answered, mut idle_rejected, mut idle_closed) = (0, 0, 0, 0);
    for h in handles {
        let done = h
            .join()
            .map_err(|_| "a load thread panicked".to_string())??;
        total.merge(&done.recorder);
        window = window.max(done.window);
        all += done.all_responses;
        idle_open += done.idle_open;
        idle_answered += done.idle_answered;
        idle_rejected += done.idle_rejected;
        idle_closed += done.idle_closed;
    }
    let info = RunInfo {
        url: format!("http://{}{}", cfg.target.host, cfg.target.path),
        mode: if cfg.rate.is_some() { "open" } else { "closed" },
        threads: cfg.threads,
        connections: cfg.connections,
        pipeline: cfg.pipeline,
        rate: cfg.rate,
        close: cfg.close.map(|c| match c {
            Close::Client => "client",
            Close::Server => "server",
        }),
        slow_read: cfg.slow_read,
        idle: cfg.idle,
        idle_request: cfg.idle_request,
        warmup: cfg.warmup,
    };
    let classes: Vec<(String, u32)> = cfg
        .mix
        .classes
        .iter()
        .map(|c| (c.name.clone(), c.weight))
        .collect();
    let totals = Totals {
        window,
        all_responses: all,
        idle_open,
        idle_answered,
        idle_rejected,
        idle_closed,
        cpu,
    };
    Ok(Summary::new(info, &classes, &total, totals))
}

struct Shared {
    cfg: Config,
    /// Each class's request bytes.
    wire: Vec<Vec<u8>>,
    barrier: Barrier,
    progress: Vec<Progress>,
}

/// What a thread hands back.
struct Done {
    recorder: Recorder,
    window: Duration,
    all_responses: u64,
    idle_open: u64,
    idle_answered: u64,
    idle_rejected: u64,
    idle_closed: u64,
}

/// Thread `i`'s share of `total`: the remainder goes to the first threads.
pub fn share(total: u64, threads: usize, i: usize) -> u64 {
    let t = threads as u64;
    total / t + u64::from((i as u64) < total % t)
}

const TIMER: Token = Token(usize::MAX - 1);
const IDLE_BASE: usize = 1 << 40;
/// How often timeouts are checked.
const TICK: Duration = Duration::from_millis(100);
/// How often slow readers read.
const SLOW_TICK: Duration = Duration::from_millis(10);
/// Wait before reconnecting after a failed connect (a refused connect fails at once).
const RECONNECT_DELAY: Duration = Duration::from_millis(10);
/// The run starts once every idle connection is open (and answered, with --idle-request), or
/// when none has got further for this long.
const IDLE_SETUP: Duration = Duration::from_secs(3);
/// Idle connects under way at most: a burst of thousands would overflow the server's accept
/// queue and wait for SYN retransmits (1 s, 3 s, ...).
const IDLE_CONNECT_WINDOW: usize = 256;
const READ_BUF: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No socket; in connection-per-request mode, a free slot.
    Free,
    Connecting,
    Open,
    /// Reply in, waiting for the server's close (`--close server`).
    Draining,
}

struct Inflight {
    class: usize,
    /// When it was sent, or in open loop when it fell due.
    at: Instant,
    /// Sent after the warm-up (counts toward --requests).
    measured: bool,
}

struct Conn {
    stream: Option<TcpStream>,
    state: State,
    inflight: VecDeque<Inflight>,
    reader: ResponseReader,
    /// A partial reply head carried to the next read.
    leftover: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    /// Last sign of life: connect started, request sent to an idle connection, reply in.
    since: Instant,
    /// Bumped at each close: tells an event for the old socket from one for the new.
    generation: u32,
    /// In the open-loop ready queue.
    queued: bool,
    /// Slow reading: bytes it may read now, when that was topped up, and whether data waits.
    allowance: f64,
    refilled: Instant,
    read_pending: bool,
}

impl Conn {
    fn new(now: Instant, pipeline: usize) -> Conn {
        Conn {
            stream: None,
            state: State::Free,
            inflight: VecDeque::with_capacity(pipeline),
            reader: ResponseReader::new(),
            leftover: Vec::new(),
            out: Vec::with_capacity(256),
            out_pos: 0,
            since: now,
            generation: 0,
            queued: false,
            allowance: 0.0,
            refilled: now,
            read_pending: false,
        }
    }
}

enum IdleState {
    /// Not opened yet: waits for room in the connect window.
    Waiting,
    Connecting(TcpStream),
    /// --idle-request: the request is being written (`written` bytes so far) and its reply
    /// read (`head`: a reply head split across reads).
    Asking(Box<Asking>),
    Open(TcpStream),
    Gone,
}

struct Asking {
    stream: TcpStream,
    written: usize,
    reader: ResponseReader,
    head: Vec<u8>,
}

struct Worker<'a> {
    cfg: &'a Config,
    wire: &'a [Vec<u8>],
    mix: &'a Mix,
    progress: &'a Progress,
    barrier: &'a Barrier,
    poll: Poll,
    conns: Vec<Conn>,
    idle: Vec<IdleState>,
    /// The next idle connection to open, and the connects under way.
    idle_next: usize,
    idle_connecting: usize,
    idle_open: u64,
    idle_answered: u64,
    idle_rejected: u64,
    idle_closed: u64,
    rbuf: Box<[u8]>,
    rng: Rng,
    rec: Recorder,
    all_responses: u64,
    errors: u64,
    churn: Option<Close>,
    /// Open loop: this thread's rate, its next request's number, connections with room.
    rate: Option<f64>,
    next_due: u64,
    ready: VecDeque<usize>,
    timer: Option<Timer>,
    timer_armed: Option<Instant>,
    /// Phases (set when the barrier opens).
    start: Instant,
    measure_start: Instant,
    end: Option<Instant>,
    /// --requests: this thread's quota, how many it sent after warm-up, and how many of those
    /// are still waiting for a reply.
    quota: Option<u64>,
    sent_measured: u64,
    outstanding: u64,
    last_reply: Instant,
    /// Connections to reopen, and when.
    reconnect: Vec<(Instant, usize)>,
}

impl<'a> Worker<'a> {
    fn new(shared: &'a Shared, i: usize) -> Result<Worker<'a>, String> {
        let cfg = &shared.cfg;
        let now = Instant::now();
        let conns = share(cfg.connections as u64, cfg.threads, i) as usize;
        let idle = share(cfg.idle as u64, cfg.threads, i) as usize;
        let quota = match cfg.stop {
            Stop::Requests(n) => Some(share(n, cfg.threads, i)),
            Stop::Duration(_) => None,
        };
        let rate = cfg
            .rate
            .filter(|_| cfg.connections > 0)
            .map(|r| r * conns as f64 / cfg.connections as f64);
        let poll = Poll::new().map_err(|e| format!("epoll: {e}"))?;
        let timer = match rate {
            Some(_) => {
                let t = Timer::new().map_err(|e| format!("timerfd: {e}"))?;
                poll.registry()
                    .register(&mut SourceFd(&t.fd.as_raw_fd()), TIMER, Interest::READABLE)
                    .map_err(|e| format!("epoll: {e}"))?;
                Some(t)
            }
            None => None,
        };
        Ok(Worker {
            cfg,
            wire: &shared.wire,
            mix: &cfg.mix,
            progress: &shared.progress[i],
            barrier: &shared.barrier,
            poll,
            conns: (0..conns).map(|_| Conn::new(now, cfg.pipeline)).collect(),
            idle: (0..idle).map(|_| IdleState::Waiting).collect(),
            idle_next: 0,
            idle_connecting: 0,
            idle_open: 0,
            idle_answered: 0,
            idle_rejected: 0,
            idle_closed: 0,
            rbuf: vec![0; READ_BUF].into_boxed_slice(),
            rng: Rng::new(i as u64),
            rec: Recorder::new(cfg.mix.classes.len()),
            all_responses: 0,
            errors: 0,
            churn: cfg.close,
            rate,
            next_due: 0,
            ready: VecDeque::with_capacity(conns),
            timer,
            timer_armed: None,
            start: now,
            measure_start: now,
            end: None,
            quota,
            sent_measured: 0,
            outstanding: 0,
            last_reply: now,
            reconnect: Vec::new(),
        })
    }

    fn run(mut self) -> Result<Done, String> {
        let mut events = Events::with_capacity(1024);
        let setup = self.open_idle(&mut events);
        // Always meet the others at the barrier, even after a failure, or they would wait forever.
        self.barrier.wait();
        setup?;
        self.idle_open = self
            .idle
            .iter()
            .filter(|c| matches!(c, IdleState::Open(_) | IdleState::Asking(_)))
            .count() as u64;

        let now = Instant::now();
        self.start = now;
        self.measure_start = now + self.cfg.warmup;
        self.end = match self.cfg.stop {
            Stop::Duration(d) => Some(self.measure_start + d),
            Stop::Requests(_) => None,
        };
        self.last_reply = self.measure_start;
        for i in 0..self.conns.len() {
            self.begin(i, now);
        }

        let mut next_tick = now + TICK;
        let mut next_slow = now + SLOW_TICK;
        loop {
            let now = Instant::now();
            if self.finished(now) {
                break;
            }
            if self.rate.is_some() {
                self.pump(now);
            }
            let mut wake = next_tick;
            if self.cfg.slow_read.is_some() {
                wake = wake.min(next_slow);
            }
            if let Some(end) = self.end {
                wake = wake.min(end);
            }
            if let Some(&(at, _)) = self.reconnect.iter().min_by_key(|(at, _)| *at) {
                wake = wake.min(at);
            }
            let timeout = wake.saturating_duration_since(now);
            if let Err(e) = self.poll.poll(&mut events, Some(timeout))
                && e.kind() != io::ErrorKind::Interrupted
            {
                return Err(format!("epoll_wait: {e}"));
            }
            for ev in events.iter() {
                match ev.token() {
                    TIMER => {
                        self.timer_armed = None;
                        if let Some(t) = &self.timer {
                            t.clear();
                        }
                    }
                    Token(t) if t >= IDLE_BASE => self.idle_event(t - IDLE_BASE),
                    Token(i) => self.event(i, ev),
                }
            }
            let now = Instant::now();
            if !self.reconnect.is_empty() {
                self.reconnect_due(now);
            }
            if self.cfg.slow_read.is_some() && now >= next_slow {
                next_slow = now + SLOW_TICK;
                self.slow_reads();
            }
            if now >= next_tick {
                next_tick = now + TICK;
                self.check_timeouts(now);
            }
            self.progress
                .responses
                .store(self.all_responses, Ordering::Relaxed);
            self.progress.errors.store(self.errors, Ordering::Relaxed);
        }
        self.progress
            .responses
            .store(self.all_responses, Ordering::Relaxed);
        let window = match self.end {
            Some(end) => end - self.measure_start,
            None => self
                .last_reply
                .saturating_duration_since(self.measure_start),
        };
        Ok(Done {
            recorder: self.rec,
            window,
            all_responses: self.all_responses,
            idle_open: self.idle_open,
            idle_answered: self.idle_answered,
            idle_rejected: self.idle_rejected,
            idle_closed: self.idle_closed,
        })
    }

    fn finished(&self, now: Instant) -> bool {
        match (self.end, self.quota) {
            (Some(end), _) => now >= end,
            (None, Some(quota)) => {
                let all_sent = self.sent_measured >= quota;
                // Done when every measured request is answered, or nothing moved for a timeout
                // after warm-up (a dead server must not hang the run).
                now >= self.measure_start
                    && ((all_sent && self.outstanding == 0)
                        || now.saturating_duration_since(self.last_reply) > self.cfg.timeout)
            }
            (None, None) => unreachable!("a stop condition"),
        }
    }

    /// May another request be sent now?
    fn may_send(&self, now: Instant) -> bool {
        match (self.end, self.quota) {
            (Some(end), _) => now < end,
            (None, Some(q)) => now < self.measure_start || self.sent_measured < q,
            (None, None) => false,
        }
    }

    // ------------------------------------------------------------ idle connections

    /// Opens the idle connections, at most [`IDLE_CONNECT_WINDOW`] connects at a time, and
    /// waits until each is open (with --idle-request: answered) or gone, or until none has got
    /// further for [`IDLE_SETUP`]. Those still waiting then go on during the run.
    fn open_idle(&mut self, events: &mut Events) -> Result<(), String> {
        self.idle_fill()?;
        let mut progressed = Instant::now();
        let mut settled = self.idle_settled();
        while settled < self.idle.len() {
            let now = Instant::now();
            let deadline = progressed + IDLE_SETUP;
            if now >= deadline {
                break;
            }
            if let Err(e) = self.poll.poll(events, Some(deadline - now))
                && e.kind() != io::ErrorKind::Interrupted
            {
                return Err(format!("epoll_wait: {e}"));
            }
            for ev in events.iter() {
                if let Token(t) = ev.token()
                    && t >= IDLE_BASE
                {
                    self.idle_event(t - IDLE_BASE);
                }
            }
            self.idle_fill()?;
            let now_settled = self.idle_settled();
            if now_settled > settled {
                (settled, progressed) = (now_settled, Instant::now());
            }
        }
        Ok(())
    }

    /// Idle connections that need nothing more: open and quiet, or gone.
    fn idle_settled(&self) -> usize {
        self.idle
            .iter()
            .filter(|c| matches!(c, IdleState::Open(_) | IdleState::Gone))
            .count()
    }

    /// Starts idle connects while the window has room.
    fn idle_fill(&mut self) -> Result<(), String> {
        while self.idle_next < self.idle.len() && self.idle_connecting < IDLE_CONNECT_WINDOW {
            let j = self.idle_next;
            self.idle_next += 1;
            match connect_registered(&self.poll, self.cfg.target.addr, Token(IDLE_BASE + j), None) {
                Ok(s) => {
                    self.idle[j] = IdleState::Connecting(s);
                    self.idle_connecting += 1;
                }
                Err(e) if is_out_of_files(&e) => {
                    return Err(format!(
                        "--idle: out of file descriptors after {j} idle connections ({e})"
                    ));
                }
                Err(_) => {
                    self.rec.error(ErrorKind::Connect);
                    self.idle[j] = IdleState::Gone;
                }
            }
        }
        Ok(())
    }

    fn idle_event(&mut self, j: usize) {
        let state = std::mem::replace(&mut self.idle[j], IdleState::Gone);
        let state = match state {
            IdleState::Connecting(s) => match connected(&s) {
                Ok(false) => IdleState::Connecting(s),
                done => {
                    self.idle_connecting -= 1;
                    match done {
                        Ok(_) if self.cfg.idle_request => self.idle_ask(Box::new(Asking {
                            stream: s,
                            written: 0,
                            reader: ResponseReader::new(),
                            head: Vec::new(),
                        })),
                        Ok(_) => IdleState::Open(s),
                        Err(_) => {
                            self.rec.error(ErrorKind::Connect);
                            IdleState::Gone
                        }
                    }
                }
            },
            IdleState::Asking(a) => self.idle_ask(a),
            IdleState::Open(s) => self.idle_quiet(s),
            other => other,
        };
        self.idle[j] = state;
        if !matches!(self.idle[j], IdleState::Connecting(_)) {
            // A connect finished: room for the next (a descriptor shortage shows at setup).
            let _ = self.idle_fill();
        }
    }

    /// --idle-request: writes the request, reads the reply; then the connection falls silent.
    fn idle_ask(&mut self, mut a: Box<Asking>) -> IdleState {
        let wire = &self.wire[0];
        if a.written < wire.len() {
            match write_some(&mut a.stream, &wire[a.written..]) {
                Ok(n) => a.written += n,
                Err(_) => {
                    self.rec.error(ErrorKind::Write);
                    return IdleState::Gone;
                }
            }
            if a.written < wire.len() {
                return IdleState::Asking(a); // the rest on the next writable edge
            }
        }
        let no_body = self.mix.classes[0].expects_no_body();
        loop {
            let carried = a.head.len();
            self.rbuf[..carried].copy_from_slice(&a.head);
            let n = match a.stream.read(&mut self.rbuf[carried..]) {
                Ok(0) => {
                    self.rec.error(ErrorKind::Closed);
                    return IdleState::Gone;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return IdleState::Asking(a),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.rec.error(ErrorKind::Read);
                    return IdleState::Gone;
                }
            };
            let input = &self.rbuf[..carried + n];
            match a.reader.advance(input, no_body) {
                Err(_) => {
                    self.rec.error(ErrorKind::Parse);
                    return IdleState::Gone;
                }
                Ok((used, None)) => {
                    if input.len() - used > crate::http::MAX_HEAD {
                        self.rec.error(ErrorKind::Parse);
                        return IdleState::Gone;
                    }
                    a.head = input[used..].to_vec();
                }
                Ok((_, Some(done))) => {
                    if (200..300).contains(&done.status) {
                        self.idle_answered += 1;
                    } else {
                        self.idle_rejected += 1;
                    }
                    // Anything more (the server's close after `Connection: close`) is for the
                    // quiet state; edge-triggered, so drain it now.
                    return self.idle_quiet(a.stream);
                }
            }
        }
    }

    /// An idle connection only hears from the server when it gives up on us (idle timeout:
    /// maybe a 408, then the close).
    fn idle_quiet(&mut self, mut s: TcpStream) -> IdleState {
        loop {
            match s.read(&mut self.rbuf) {
                Ok(0) => {
                    self.idle_closed += 1;
                    return IdleState::Gone;
                }
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return IdleState::Open(s),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.idle_closed += 1;
                    return IdleState::Gone;
                }
            }
        }
    }

    // ------------------------------------------------------------ connections

    /// Starts connection `i` at the beginning of the run.
    fn begin(&mut self, i: usize, now: Instant) {
        match (self.churn, self.rate) {
            // Connection per request, open loop: a free slot waits for a due request.
            (Some(_), Some(_)) => self.enqueue(i),
            // Connection per request, closed loop: connect and send.
            (Some(_), None) => {
                if self.may_send(now) {
                    self.send(i, now);
                }
            }
            (None, _) => self.open(i, now),
        }
    }

    /// Opens a new socket for connection `i`; a failure schedules a retry.
    fn open(&mut self, i: usize, now: Instant) {
        let rcvbuf = self.cfg.slow_read.map(|_| 4096);
        let result = connect_registered(&self.poll, self.cfg.target.addr, Token(i), rcvbuf);
        self.rec.connects += 1;
        let c = &mut self.conns[i];
        c.since = now;
        c.refilled = now;
        c.allowance = 0.0;
        match result {
            Ok(s) => {
                c.stream = Some(s);
                c.state = State::Connecting;
            }
            Err(_) => self.fail(i, ErrorKind::Connect, now),
        }
    }

    fn event(&mut self, i: usize, ev: &mio::event::Event) {
        let now = Instant::now();
        // Each step below may close the connection and open a new one in its slot; the
        // rest of this event was about the old socket.
        let generation = self.conns[i].generation;
        if self.conns[i].state == State::Connecting {
            let Some(s) = &self.conns[i].stream else {
                return;
            };
            match connected(s) {
                Ok(true) if !ev.is_error() => self.established(i, now),
                Ok(false) if !ev.is_error() => return,
                _ => return self.fail(i, ErrorKind::Connect, now),
            }
            if self.conns[i].generation != generation {
                return;
            }
        }
        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
            // The peer's FIN came with this edge: read on to the end-of-file, past the
            // short read that would otherwise mean "drained".
            self.read(i, ev.is_read_closed());
            if self.conns[i].generation != generation {
                return;
            }
        }
        if ev.is_writable() && self.conns[i].state != State::Free {
            self.flush(i, now);
        }
    }

    fn established(&mut self, i: usize, now: Instant) {
        let c = &mut self.conns[i];
        c.state = State::Open;
        c.since = now;
        if self.churn.is_some() {
            // Its request is already in the output buffer.
            self.flush(i, now);
        } else if self.rate.is_some() {
            self.enqueue(i);
        } else {
            self.fill(i, now);
        }
    }

    /// Closed loop: tops connection `i` up to --pipeline requests in flight, and writes.
    fn fill(&mut self, i: usize, now: Instant) {
        while self.conns[i].inflight.len() < self.cfg.pipeline && self.may_send(now) {
            self.push_request(i, now);
        }
        self.flush(i, now);
    }

    /// Sends one request on connection `i`, which in connection-per-request mode is a free
    /// slot: the connection is opened now and the request written once it is established.
    fn send(&mut self, i: usize, at: Instant) {
        if self.churn.is_some() && self.conns[i].state == State::Free {
            self.push_request(i, at);
            self.open(i, Instant::now());
        } else {
            self.push_request(i, at);
            self.flush(i, Instant::now());
        }
    }

    fn push_request(&mut self, i: usize, at: Instant) {
        let class = self.mix.pick(&mut self.rng);
        let measured = at >= self.measure_start;
        if measured && self.quota.is_some() {
            self.sent_measured += 1;
            self.outstanding += 1;
        }
        let c = &mut self.conns[i];
        if c.inflight.is_empty() {
            c.since = at;
        }
        c.inflight.push_back(Inflight {
            class,
            at,
            measured,
        });
        c.out.extend_from_slice(&self.wire[class]);
    }

    /// Writes what connection `i` has to send; the rest waits for a writable edge.
    fn flush(&mut self, i: usize, now: Instant) {
        let c = &mut self.conns[i];
        if c.state == State::Connecting {
            return;
        }
        let Some(s) = c.stream.as_mut() else { return };
        while c.out_pos < c.out.len() {
            match s.write(&c.out[c.out_pos..]) {
                Ok(n) => c.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.fail(i, ErrorKind::Write, now),
            }
        }
        c.out.clear();
        c.out_pos = 0;
    }

    /// Reads until the socket is drained (or a slow reader's allowance is spent), framing
    /// replies as they complete. `to_eof`: keep reading until the peer's end-of-file.
    fn read(&mut self, i: usize, to_eof: bool) {
        loop {
            let c = &mut self.conns[i];
            let Some(s) = c.stream.as_mut() else { return };
            let carried = c.leftover.len();
            self.rbuf[..carried].copy_from_slice(&c.leftover);
            let mut room = self.rbuf.len() - carried;
            if let Some(rate) = self.cfg.slow_read {
                let now = Instant::now();
                let rate = rate as f64;
                c.allowance = (c.allowance + rate * (now - c.refilled).as_secs_f64())
                    .min((rate / 20.0).max(1.0));
                c.refilled = now;
                if c.allowance < 1.0 {
                    c.read_pending = true;
                    break;
                }
                room = room.min(c.allowance as usize);
            }
            match s.read(&mut self.rbuf[carried..carried + room]) {
                Ok(0) => return self.eof(i),
                Ok(n) => {
                    c.leftover.clear();
                    let now = Instant::now();
                    if self.cfg.slow_read.is_some() {
                        c.allowance -= n as f64;
                    }
                    if self.in_window(now) {
                        self.rec.bytes += n as u64;
                    }
                    let drained = n < room && !to_eof;
                    if !self.replies(i, carried + n, now) {
                        return;
                    }
                    if drained {
                        self.conns[i].read_pending = false;
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.read_pending = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.fail(i, ErrorKind::Read, Instant::now()),
            }
        }
        let now = Instant::now();
        if self.rate.is_none() && self.churn.is_none() {
            self.fill(i, now);
        } else {
            self.flush(i, now);
        }
    }

    /// Frames the replies in `rbuf[..len]`; false if the connection was closed meanwhile.
    fn replies(&mut self, i: usize, len: usize, now: Instant) -> bool {
        let mut pos = 0;
        let mut close = false;
        while pos < len {
            let c = &mut self.conns[i];
            let no_body = c
                .inflight
                .front()
                .is_some_and(|r| self.mix.classes[r.class].expects_no_body());
            match c.reader.advance(&self.rbuf[pos..len], no_body) {
                Err(_) => {
                    self.fail(i, ErrorKind::Parse, now);
                    return false;
                }
                Ok((n, None)) => {
                    pos += n;
                    break;
                }
                Ok((n, Some(done))) => {
                    pos += n;
                    if c.state == State::Draining {
                        // Bytes after the reply we asked to be the last.
                        self.fail(i, ErrorKind::Parse, now);
                        return false;
                    }
                    let Some(req) = c.inflight.pop_front() else {
                        self.fail(i, ErrorKind::Parse, now);
                        return false;
                    };
                    c.since = now;
                    self.reply(req, done.status, now);
                    if done.close || self.churn.is_some() {
                        close = true;
                        break;
                    }
                }
            }
        }
        if close {
            return self.after_last_reply(i, now);
        }
        let c = &mut self.conns[i];
        if pos < len {
            c.leftover.extend_from_slice(&self.rbuf[pos..len]);
        }
        if self.rate.is_some() && c.inflight.len() < self.cfg.pipeline && !c.queued {
            self.enqueue(i);
        }
        true
    }

    /// Counts a reply.
    fn reply(&mut self, req: Inflight, status: u16, now: Instant) {
        self.all_responses += 1;
        let counted = match self.end {
            Some(_) => self.in_window(now),
            None => req.measured,
        };
        if counted {
            self.rec.response(req.class, now - req.at, status);
        }
        if req.measured && self.quota.is_some() {
            self.outstanding -= 1;
            self.last_reply = now;
        }
    }

    fn in_window(&self, now: Instant) -> bool {
        now >= self.measure_start && self.end.is_none_or(|end| now < end)
    }

    /// A reply said the connection ends, or connection-per-request mode is done with it.
    fn after_last_reply(&mut self, i: usize, now: Instant) -> bool {
        match self.churn {
            Some(Close::Server) => {
                // Wait for the server's close (or a timeout).
                self.conns[i].state = State::Draining;
                self.conns[i].since = now;
                true
            }
            Some(Close::Client) => {
                self.close(i, now, false);
                false
            }
            None => {
                // The server announced its close: whatever is still in flight is lost.
                let lost = !self.conns[i].inflight.is_empty();
                if lost {
                    self.fail(i, ErrorKind::Closed, now);
                } else {
                    self.close(i, now, false);
                }
                false
            }
        }
    }

    /// The server closed the connection.
    fn eof(&mut self, i: usize) {
        let now = Instant::now();
        let c = &mut self.conns[i];
        if c.state == State::Draining {
            return self.close(i, now, false);
        }
        if let Some(done) = c.reader.eof() {
            // A reply whose body ran to the close.
            if let Some(req) = c.inflight.pop_front() {
                self.reply(req, done.status, now);
            }
        }
        let c = &self.conns[i];
        if c.inflight.is_empty() && !c.reader.in_progress() && c.leftover.is_empty() {
            // Nothing owed: the server timed an idle connection out, or is restarting.
            self.close(i, now, false);
        } else {
            self.fail(i, ErrorKind::Closed, now);
        }
    }

    fn fail(&mut self, i: usize, kind: ErrorKind, now: Instant) {
        self.rec.error(kind);
        self.errors += 1;
        self.close(i, now, kind == ErrorKind::Connect);
    }

    /// Drops connection `i`'s socket and what it owed, then reopens it (or frees the slot).
    fn close(&mut self, i: usize, now: Instant, delay: bool) {
        let c = &mut self.conns[i];
        // Dropping the socket removes it from the epoll set.
        c.stream = None;
        c.generation = c.generation.wrapping_add(1);
        c.state = State::Free;
        let lost = c.inflight.iter().filter(|r| r.measured).count() as u64;
        if self.quota.is_some() {
            self.outstanding -= lost;
        }
        c.inflight.clear();
        c.reader = ResponseReader::new();
        c.leftover.clear();
        c.out.clear();
        c.out_pos = 0;
        c.read_pending = false;
        if delay {
            self.reconnect.push((now + RECONNECT_DELAY, i));
        } else {
            self.restart(i, now);
        }
    }

    fn restart(&mut self, i: usize, now: Instant) {
        match (self.churn, self.rate) {
            (Some(_), Some(_)) => self.enqueue(i),
            (Some(_), None) => {
                if self.may_send(now) {
                    self.send(i, now);
                }
            }
            (None, _) => {
                if self.may_send(now) {
                    self.open(i, now);
                }
            }
        }
    }

    fn reconnect_due(&mut self, now: Instant) {
        let mut k = 0;
        while k < self.reconnect.len() {
            if self.reconnect[k].0 <= now {
                let (_, i) = self.reconnect.swap_remove(k);
                self.restart(i, now);
            } else {
                k += 1;
            }
        }
    }

    /// A connection waiting on the server longer than --timeout fails.
    fn check_timeouts(&mut self, now: Instant) {
        for i in 0..self.conns.len() {
            let c = &self.conns[i];
            let waiting = match c.state {
                State::Connecting | State::Draining => true,
                State::Open => !c.inflight.is_empty(),
                State::Free => false,
            };
            if waiting && now.saturating_duration_since(c.since) > self.cfg.timeout {
                let kind = match c.state {
                    State::Connecting => ErrorKind::Connect,
                    _ => ErrorKind::Timeout,
                };
                self.fail(i, kind, now);
            }
        }
    }

    fn slow_reads(&mut self) {
        for i in 0..self.conns.len() {
            if self.conns[i].read_pending {
                self.read(i, false);
            }
        }
    }

    // ------------------------------------------------------------ open loop

    fn enqueue(&mut self, i: usize) {
        if !self.conns[i].queued {
            self.conns[i].queued = true;
            self.ready.push_back(i);
        }
    }

    /// Sends every request that is due, each on the next connection with room. When none has
    /// room, due requests wait, and their latency keeps counting from when they fell due.
    fn pump(&mut self, now: Instant) {
        let rate = self.rate.expect("open loop");
        loop {
            let due = self.start + Duration::from_secs_f64(self.next_due as f64 / rate);
            if !self.may_send(due) {
                return;
            }
            if due > now {
                if !self.ready.is_empty() && self.timer_armed != Some(due) {
                    if let Some(t) = &self.timer {
                        t.set(due - now);
                    }
                    self.timer_armed = Some(due);
                }
                return;
            }
            let Some(i) = self.ready.pop_front() else {
                return;
            };
            self.conns[i].queued = false;
            let c = &self.conns[i];
            let usable = match self.churn {
                Some(_) => c.state == State::Free,
                None => c.state == State::Open && c.inflight.len() < self.cfg.pipeline,
            };
            if !usable {
                continue;
            }
            self.next_due += 1;
            self.send(i, due);
            let c = &self.conns[i];
            if self.churn.is_none()
                && c.state == State::Open
                && c.inflight.len() < self.cfg.pipeline
            {
                self.enqueue(i);
            }
        }
    }
}

/// A non-blocking connect; the result arrives as a writable (or error) event.
pub(crate) fn connect(addr: SocketAddr, rcvbuf: Option<usize>) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(size) = rcvbuf {
        // Before connect, so the advertised window is small from the start.
        socket.set_recv_buffer_size(size)?;
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

/// [`connect`], and the socket registered with `poll` under `token` for both directions.
pub(crate) fn connect_registered(
    poll: &Poll,
    addr: SocketAddr,
    token: Token,
    rcvbuf: Option<usize>,
) -> io::Result<TcpStream> {
    let mut s = connect(addr, rcvbuf)?;
    poll.registry()
        .register(&mut s, token, Interest::READABLE | Interest::WRITABLE)?;
    Ok(s)
}

/// Writes as much of `buf` as the socket takes now; how much that was.
pub(crate) fn write_some(s: &mut TcpStream, buf: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while written < buf.len() {
        match s.write(&buf[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

/// Whether a non-blocking connect finished: `Ok(false)` while in progress.
pub(crate) fn connected(s: &TcpStream) -> io::Result<bool> {
    if let Some(e) = s.take_error()? {
        return Err(e);
    }
    match s.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e),
    }
}

pub(crate) fn is_out_of_files(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// A one-shot timerfd: open-loop pacing needs finer wake-ups than epoll_wait's milliseconds.
struct Timer {
    fd: OwnedFd,
}

impl Timer {
    fn new() -> io::Result<Timer> {
        // SAFETY: plain syscall; the fd it returns is checked and then owned.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        Ok(Timer {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Fires once after `after` (at least 1 ns: zero would disarm it).
    fn set(&self, after: Duration) {
        let after = after.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: a valid timerfd and a fully initialised itimerspec; old value not wanted.
        unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
    }

    /// Consumes the expiry count so the next expiry raises a new edge.
    fn clear(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into an 8-byte buffer from our own fd.
        unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    }
}

/// This process's CPU time so far (user + system, all threads).
pub(crate) fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the zeroed struct we own.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Many idle connections need many descriptors: lift the soft limit to the hard one.
pub(crate) fn raise_nofile_limit() {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn sleep_until_finished(handles: &[thread::JoinHandle<Result<Done, String>>], d: Duration) {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if handles.iter().all(|h| h.is_finished()) {
            return;
        }
        thread::sleep(
            Duration::from_millis(10).min(until.saturating_duration_since(Instant::now())),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up() {
        for (total, threads) in [(50u64, 1usize), (50, 3), (7, 4), (0, 2), (5000, 7)] {
            let parts: Vec<u64> = (0..threads).map(|i| share(total, threads, i)).collect();
            assert_eq!(parts.iter().sum::<u64>(), total);
            assert!(parts.iter().max().unwrap() - parts.iter().min().unwrap() <= 1);
        }
    }
}
