//! One worker: its ring, its listener, its connections, and the turn that drives them all.
//!
//! ```text
//!   loop {
//!       io_uring_enter(submit: every SQE this turn queued, wait: 1 CQE or the next deadline)
//!       for each CQE: accept → a connection; recv → bytes into its proto::Conn (buffer back
//!                     to the ring); send → written(n); eventfd → the app moved; signalfd → stop
//!       for each connection a CQE touched: serve its requests, queue ONE send of its output
//!       held requests (the hub called, or a deadline), timeouts (a sweep), shutdown
//!   }
//! ```
//!
//! It keeps the event loop's contract (`runtime::event_loop`) at every point: requests served in
//! order and replies written in order, one send per batch of pipelined replies, no reading
//! while replies back up, proto's timeouts, lingering close, no spinning on EMFILE, held
//! requests and streams walked on one wake-up per ring, and on SIGTERM: stop accepting, serve
//! what has arrived, finish what is in flight, return.
//!
//! What completion changes, and what this file is careful about:
//! - A kernel operation may hold our memory until its completion: the send buffer of a
//!   connection, the eventfd's 8 bytes, the provided buffers. A connection closed while its
//!   receive or send is in flight keeps its slot (and so its send buffer) until their last
//!   completions arrive; the worker cancels and waits for everything before it frees anything.
//! - Closing a descriptor does not cancel the operations on it (they hold the file open):
//!   every close cancels the connection's receive first, or the peer would never see the FIN.
//! - A multishot operation ends whenever its completion lacks IORING_CQE_F_MORE (the peer's
//!   EOF, an error, ENOBUFS when the provided buffers ran dry, a full CQ): re-armed if still
//!   wanted, once the buffers are back for ENOBUFS (at the end of the same turn).
//! - The kernel receives whenever data comes, whatever proto wants: when a connection must stop
//!   reading (backpressure, `Connection: close`), its receive is cancelled, and the little that
//!   arrived meanwhile is kept in proto's buffer. The peer's EOF is passed to proto only where
//!   the event loop would have read it: once proto wants to read again.

use std::collections::VecDeque;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use app::{App, Subscription, WorkerStats};
use io_uring::{IoUring, cqueue, opcode, squeue, types};
use proto::Conn;
use runtime::date::ReplyHeaders;
use runtime::held::{self, ConnKey, Held, HeldConn, Upload};
use runtime::listener::{AcceptBackoff, is_out_of_resources};
use runtime::{ServeConfig, Shutdown};
use slab::Slab;

use crate::buf_ring::BufRing;

/// Each worker's extra counters in `/stats`: `io_uring_enter` calls, completions reaped,
/// receives that found the provided buffers empty, and receives cancelled because a connection
/// had to stop reading (backpressure, or no further request).
pub const COUNTERS: [&str; 4] = ["enters", "completions", "enobufs", "recv_cancels"];
const ENTERS: usize = 0;
const COMPLETIONS: usize = 1;
const ENOBUFS: usize = 2;
const RECV_CANCELS: usize = 3;

/// A send copies at most this much of proto's output; the rest goes when it completes.
const SEND_AT_MOST: usize = 256 * 1024;
/// Send buffers larger than this are freed rather than kept for the next connection.
const KEEP_SEND_BUFFER: usize = 64 * 1024;

#[derive(Clone, Copy, Debug)]
pub struct RingConfig {
    pub entries: u32,
    pub recv_buffers: u16,
    pub recv_buffer_size: usize,
}

/// Everything a worker is given; the ring itself is made on the worker's thread.
pub struct Setup {
    pub config: ServeConfig,
    pub ring: RingConfig,
    pub app: App,
    pub stats: &'static WorkerStats,
    pub shutdown: Arc<Shutdown>,
    /// Every worker's eventfd; `me` indexes this worker's own.
    pub wakes: Arc<[Arc<Wake>]>,
    pub me: usize,
    pub listener: TcpListener,
    /// The signalfd for SIGTERM/SIGINT, for the one worker that watches them.
    pub signals: Option<OwnedFd>,
}

/// Checks that this kernel lets us make the ring we need; the error names the likely cause.
pub fn probe(entries: u32) -> Result<(), String> {
    match new_ring(entries) {
        Ok(_) => Ok(()),
        Err(e) => Err(explain(&e)),
    }
}

/// One ring per thread: only this thread submits (SINGLE_ISSUER), and the kernel runs the
/// completion work when this thread enters to wait (DEFER_TASKRUN), not by interrupting it.
fn new_ring(entries: u32) -> io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_taskrun_flag()
        .setup_submit_all()
        .setup_cqsize(entries * 4)
        .build(entries)
}

fn explain(e: &io::Error) -> String {
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    match (e.raw_os_error(), disabled) {
        (Some(libc::ENOSYS), _) => format!(
            "io_uring is unavailable: io_uring_setup failed ({e}): a kernel without io_uring, \
             or a seccomp filter that hides it"
        ),
        (Some(libc::EPERM), Some(2)) => {
            format!("io_uring is disabled by the sysctl kernel.io_uring_disabled=2 ({e})")
        }
        (Some(libc::EPERM), Some(1)) => format!(
            "io_uring is limited to root and kernel.io_uring_group by the sysctl \
             kernel.io_uring_disabled=1 ({e})"
        ),
        (Some(libc::EPERM | libc::EACCES), _) => format!(
            "io_uring is blocked: io_uring_setup failed ({e}) with kernel.io_uring_disabled \
             off: a seccomp filter (container runtimes block io_uring by default) or a \
             security module"
        ),
        (Some(libc::EINVAL), _) => format!(
            "io_uring_setup rejected SINGLE_ISSUER|DEFER_TASKRUN ({e}): this server needs \
             Linux 6.1 or later"
        ),
        _ => format!("io_uring_setup failed: {e}"),
    }
}

/// A ring's doorbell for other threads: an eventfd the ring keeps a read on. The app's hub
/// rings it when something moved; the signal-watching worker rings every one at shutdown.
pub struct Wake {
    fd: OwnedFd,
    /// Set by the first ringer after the worker last read the eventfd: one write per batch.
    woken: AtomicBool,
    /// The app's hub called: held requests and streams may have something to say.
    app_moved: AtomicBool,
}

impl Wake {
    pub fn new() -> io::Result<Wake> {
        // SAFETY: eventfd has no memory arguments; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Wake {
            // SAFETY: eventfd returned a new descriptor that nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            woken: AtomicBool::new(false),
            app_moved: AtomicBool::new(false),
        })
    }

    pub fn wake(&self) {
        if !self.woken.swap(true, Ordering::AcqRel) {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live local to an eventfd we own. A failed write
            // (the counter cannot overflow at one per wake-up) leaves the ring to its next timer.
            unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        }
    }

    fn app_moved(&self) {
        if !self.app_moved.swap(true, Ordering::AcqRel) {
            self.wake();
        }
    }
}

/// What a completion is for: the operation in user_data's high half, the connection's slot in
/// its low half.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Accept = 1,
    Recv,
    Send,
    Wake,
    Signal,
    /// Cancels and closes post nothing when they succeed (IOSQE_CQE_SKIP_SUCCESS).
    Cancel,
    Close,
}

fn tag(op: Op, slot: usize) -> u64 {
    ((op as u64) << 32) | slot as u64
}

fn untag(user_data: u64) -> (Option<Op>, usize) {
    let op = match user_data >> 32 {
        1 => Op::Accept,
        2 => Op::Recv,
        3 => Op::Send,
        4 => Op::Wake,
        5 => Op::Signal,
        6 => Op::Cancel,
        7 => Op::Close,
        _ => return (None, 0),
    };
    (Some(op), (user_data & u64::from(u32::MAX)) as usize)
}

/// The ring, the completions reaped but not yet handled, and how many operations will still
/// post a final completion (the worker frees no memory an operation may use while any will).
struct Ring {
    ring: IoUring,
    reaped: Vec<cqueue::Entry>,
    in_flight: usize,
}

impl Ring {
    /// Queues `entry`, an operation that posts a final completion; submitted at the next enter.
    ///
    /// # Safety
    /// Whatever memory and descriptors `entry` names must stay valid until that completion.
    unsafe fn push_op(&mut self, entry: &squeue::Entry) {
        // SAFETY: passed on to the caller.
        unsafe { self.push(entry) };
        self.in_flight += 1;
    }

    /// Queues a cancel or a close, which name no memory and post only if they fail.
    fn push_quiet(&mut self, entry: squeue::Entry) {
        let entry = entry.flags(squeue::Flags::SKIP_SUCCESS);
        // SAFETY: cancels and closes name a descriptor or a user_data, no memory.
        unsafe { self.push(&entry) };
    }

    /// # Safety
    /// As for [`Ring::push_op`].
    unsafe fn push(&mut self, entry: &squeue::Entry) {
        loop {
            // SAFETY: passed on to the caller.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return;
            }
            // The queue is full (a turn that touched more connections than it has entries):
            // submit what it holds, and set aside the completions that makes room for.
            self.reaped.extend(self.ring.completion());
            if let Err(e) = self.ring.submit()
                && !matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EINTR))
            {
                panic!("io_uring_enter: {e}");
            }
        }
    }

    /// The one system call of a turn: submits every queued entry, then waits until a
    /// completion comes or `timeout` passes (at once if completions are already set aside).
    fn enter(&mut self, timeout: Duration, stats: &WorkerStats) -> io::Result<()> {
        self.reaped.extend(self.ring.completion());
        let timeout = if self.reaped.is_empty() {
            timeout
        } else {
            Duration::ZERO
        };
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        stats.add_extra(ENTERS, 1);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            // The deadline came first; a signal; completions the CQ has no room for yet.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            // Out of descriptors or memory while submitting (seen at EMFILE under load): what
            // was not submitted stays queued for the next turn, which closes or pauses
            // accepting meanwhile; a short pause keeps the retry from spinning.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EAGAIN)
                ) =>
            {
                std::thread::sleep(Duration::from_millis(1));
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The completions that arrived, in order.
    fn reap(&mut self, into: &mut Vec<cqueue::Entry>) {
        into.append(&mut self.reaped);
        into.extend(self.ring.completion());
    }
}

/// A connection: its socket, its protocol state, and what the kernel is doing with it.
struct Connection {
    /// `None` once closed; the slot then lives on until no operation holds its memory.
    fd: Option<OwnedFd>,
    http: Conn,
    /// Told apart from an earlier connection in the same slot (held requests name both).
    generation: u64,
    recv: Recv,
    /// The peer's EOF came; proto hears of it once it wants to read again.
    eof: bool,
    /// A copy of the output being sent; the kernel reads it until the send completes.
    send: Vec<u8>,
    sending: bool,
    /// Listed in `Worker::dirty`, to be driven at the end of the turn.
    touched: bool,
    /// Its stream has more to send but the peer is behind: poll it once the output drains.
    stream_waits: bool,
    /// The request whose body is going to the app as it arrives.
    upload: Option<Box<Upload>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Recv {
    /// No receive armed.
    Off,
    /// A multishot receive is armed.
    Armed,
    /// Asked to stop; its last completion has not come yet.
    Cancelling,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Accepting {
    Yes,
    /// At --max-conns: resume when a connection closes.
    Full,
    /// Out of file descriptors or memory: retry at `until`.
    Paused {
        until: Instant,
    },
    /// Shutting down.
    No,
}

impl HeldConn for Connection {
    fn generation(&self) -> u64 {
        self.generation
    }

    fn is_open(&self) -> bool {
        self.fd.is_some()
    }

    fn http(&mut self) -> &mut Conn {
        &mut self.http
    }

    fn stream_waits(&mut self) -> &mut bool {
        &mut self.stream_waits
    }
}

pub struct Worker {
    // First, so that it is dropped first: the kernel lets go of our memory before it is freed.
    ring: Ring,
    bufs: BufRing,
    config: ServeConfig,
    stats: &'static WorkerStats,
    app: App,
    listener: Option<TcpListener>,
    accepting: Accepting,
    /// The multishot accept, as a receive's state.
    accept: Recv,
    backoff: AcceptBackoff,
    /// Connections a multishot accept took past --max-conns (it empties the accept queue):
    /// they wait here, unread, as they would have in the kernel's queue.
    waiting: VecDeque<OwnedFd>,
    shutdown: Arc<Shutdown>,
    wakes: Arc<[Arc<Wake>]>,
    me: usize,
    /// Where the ring reads the eventfd's counter into.
    wake_buf: Box<[u8; 8]>,
    signals: Option<OwnedFd>,
    /// Where the ring reads a `signalfd_siginfo` into.
    signal_buf: Box<[u8; 128]>,
    conns: Slab<Connection>,
    /// Connections not yet closed (`conns` also holds closed ones waiting for completions).
    open: usize,
    generations: u64,
    /// Requests held for the app, walked when the hub calls and at the earliest deadline.
    held: Held,
    _subscription: Subscription,
    headers: ReplyHeaders,
    now: Instant,
    sweep_every: Duration,
    next_sweep: Instant,
    draining_since: Option<Instant>,
    /// Tearing down: nothing is armed again.
    quiescing: bool,
    /// Connections a completion touched this turn, each driven once at the end of it.
    dirty: Vec<usize>,
    cqes: Vec<cqueue::Entry>,
    send_pool: Vec<Vec<u8>>,
    scratch: Vec<usize>,
}

impl Worker {
    pub fn new(setup: Setup) -> io::Result<Worker> {
        let ring = new_ring(setup.ring.entries)?;
        let bufs = BufRing::new(
            &ring,
            0,
            setup.ring.recv_buffers,
            setup.ring.recv_buffer_size,
        )?;
        let wake = setup.wakes[setup.me].clone();
        let subscription = setup.app.hub().subscribe(move || wake.app_moved());
        let now = Instant::now();
        // Deadlines are swept, as in the event loop, not kept as a timer per connection.
        let sweep_every = setup.config.sweep_every();
        Ok(Worker {
            ring: Ring {
                ring,
                reaped: Vec::new(),
                in_flight: 0,
            },
            bufs,
            conns: Slab::with_capacity(setup.config.max_conns.min(1024)),
            headers: ReplyHeaders::new(setup.config.server_name),
            config: setup.config,
            stats: setup.stats,
            app: setup.app,
            listener: Some(setup.listener),
            accepting: Accepting::No,
            accept: Recv::Off,
            backoff: AcceptBackoff::default(),
            waiting: VecDeque::new(),
            shutdown: setup.shutdown,
            wakes: setup.wakes,
            me: setup.me,
            wake_buf: Box::new([0; 8]),
            signals: setup.signals,
            signal_buf: Box::new([0; 128]),
            open: 0,
            generations: 0,
            held: Held::new(setup.stats),
            _subscription: subscription,
            now,
            sweep_every,
            next_sweep: now + sweep_every,
            draining_since: None,
            quiescing: false,
            dirty: Vec::new(),
            cqes: Vec::new(),
            send_pool: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// Serves until shutdown completes: every connection closed, or `--shutdown-timeout` passed.
    pub fn run(mut self) -> io::Result<()> {
        self.stats.bind_thread();
        self.tick();
        self.arm_wake();
        self.arm_signals();
        self.set_accepting(Accepting::Yes);
        loop {
            let timeout = self.next_deadline().saturating_duration_since(self.now);
            self.turn(timeout)?;
            if self.shutdown.is_requested() && self.draining_since.is_none() {
                self.start_draining()?;
            }
            if let Accepting::Paused { until } = self.accepting
                && self.now >= until
            {
                self.set_accepting(Accepting::Yes);
            }
            if self.wakes[self.me].app_moved.swap(false, Ordering::AcqRel)
                || self.held.deadline().is_some_and(|at| self.now >= at)
            {
                self.poll_held();
            }
            if self.now >= self.next_sweep {
                self.sweep();
            }
            if let Some(since) = self.draining_since
                && (self.open == 0 || self.now >= since + self.config.shutdown_timeout)
            {
                return self.quiesce();
            }
        }
    }

    /// One turn: enter the kernel once (submit, wait), handle every completion, then drive
    /// each connection they touched, queueing its send for the next enter.
    fn turn(&mut self, timeout: Duration) -> io::Result<()> {
        // Connections touched outside a turn (a held reply, a timeout, a close that let a
        // waiting connection in) queue their operations before the enter too.
        self.drive_touched();
        self.ring.enter(timeout, self.stats)?;
        self.tick();
        let mut cqes = std::mem::take(&mut self.cqes);
        self.ring.reap(&mut cqes);
        self.stats.add_extra(COMPLETIONS, cqes.len() as u64);
        for cqe in cqes.drain(..) {
            self.complete(cqe.user_data(), cqe.result(), cqe.flags());
        }
        self.cqes = cqes;
        self.drive_touched();
        Ok(())
    }

    /// Drives every touched connection once, including those touched meanwhile.
    fn drive_touched(&mut self) {
        let mut i = 0;
        while let Some(&token) = self.dirty.get(i) {
            self.drive(token);
            i += 1;
        }
        self.dirty.clear();
    }

    /// Reads the clocks once per turn; the Date header changes at most once a second.
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

    fn touch(&mut self, token: usize) {
        if let Some(c) = self.conns.get_mut(token)
            && !c.touched
        {
            c.touched = true;
            self.dirty.push(token);
        }
    }

    // ---- completions ---------------------------------------------------------------------

    fn complete(&mut self, user_data: u64, res: i32, flags: u32) {
        let (op, slot) = untag(user_data);
        let ended = !cqueue::more(flags);
        match op {
            Some(Op::Accept) => self.accepted(res, ended),
            Some(Op::Recv) => self.received(slot, res, flags, ended),
            Some(Op::Send) => self.sent(slot, res),
            Some(Op::Wake) => self.woken(),
            Some(Op::Signal) => self.signalled(res),
            // A cancel that found nothing (the operation had just ended), a close of a socket
            // the peer reset: nothing to do.
            Some(Op::Cancel | Op::Close) | None => {}
        }
    }

    fn accepted(&mut self, res: i32, ended: bool) {
        if ended {
            self.accept = Recv::Off;
            self.ring.in_flight -= 1;
        }
        if res >= 0 {
            // SAFETY: a successful accept returns a new descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(res) };
            self.backoff.succeeded();
            if self.draining_since.is_none() {
                self.admit(fd);
            }
        } else if is_out_of_resources(&io::Error::from_raw_os_error(-res)) {
            // Re-arming at once would spin: the queued connection stays there.
            let delay = self.backoff.failed();
            eprintln!(
                "{}: accept: {}; pausing accepts for {delay:?}",
                self.config.server_name,
                io::Error::from_raw_os_error(-res)
            );
            self.set_accepting(Accepting::Paused {
                until: self.now + delay,
            });
        }
        // Anything else (the peer gave up while queued, a full CQ, our own cancel) ended the
        // multishot or not; re-arm it if it should still be accepting.
        self.set_accepting(self.accepting);
    }

    fn received(&mut self, token: usize, res: i32, flags: u32, ended: bool) {
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        if let Some(bid) = cqueue::buffer_select(flags) {
            if c.fd.is_some() && res > 0 {
                c.http
                    .fill_from(self.bufs.received(bid, res as usize), self.now);
            }
            // Copied out: the kernel may fill it again.
            self.bufs.give_back(bid);
        }
        if ended {
            c.recv = Recv::Off;
            self.ring.in_flight -= 1;
        }
        if c.fd.is_none() {
            return self.forget_if_idle(token);
        }
        match res {
            0 => c.eof = true,
            n if n > 0 => {}
            // Ended for want of buffers: re-armed when it is driven, with this turn's buffers
            // back in the ring.
            e if -e == libc::ENOBUFS => self.stats.add_extra(ENOBUFS, 1),
            e if -e == libc::ECANCELED => {}
            // Reset by the peer, or worse: nobody is left to answer.
            _ => return self.close(token),
        }
        self.touch(token);
    }

    fn sent(&mut self, token: usize, res: i32) {
        self.ring.in_flight -= 1;
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        c.sending = false;
        if c.fd.is_none() {
            return self.forget_if_idle(token);
        }
        match usize::try_from(res) {
            Ok(n) => c.http.written(n, self.now),
            // The peer is gone (EPIPE, ECONNRESET): nothing more can reach it.
            Err(_) => return self.close(token),
        }
        if c.stream_waits && c.http.stream_budget() > 0 {
            c.stream_waits = false;
            self.held.output_drained(self.now);
        }
        self.touch(token);
    }

    fn woken(&mut self) {
        self.ring.in_flight -= 1;
        // Cleared before `app_moved` is looked at (in `run`), so no call is missed.
        self.wakes[self.me].woken.store(false, Ordering::Release);
        self.arm_wake();
    }

    fn signalled(&mut self, res: i32) {
        self.ring.in_flight -= 1;
        if res > 0 {
            self.shutdown.trigger();
            for wake in self.wakes.iter() {
                wake.wake();
            }
        } else {
            self.arm_signals();
        }
    }

    // ---- arming ----------------------------------------------------------------------------

    fn arm_wake(&mut self) {
        if self.quiescing {
            return;
        }
        let fd = self.wakes[self.me].fd.as_raw_fd();
        let read = opcode::Read::new(types::Fd(fd), self.wake_buf.as_mut_ptr(), 8)
            .build()
            .user_data(tag(Op::Wake, 0));
        // SAFETY: `wake_buf` is a heap block that only this read writes to, freed after every
        // operation has completed (or leaked: see Drop); the eventfd outlives the worker.
        unsafe { self.ring.push_op(&read) };
    }

    fn arm_signals(&mut self) {
        let Some(signals) = &self.signals else {
            return;
        };
        if self.quiescing {
            return;
        }
        let read = opcode::Read::new(
            types::Fd(signals.as_raw_fd()),
            self.signal_buf.as_mut_ptr(),
            self.signal_buf.len() as u32,
        )
        .build()
        .user_data(tag(Op::Signal, 0));
        // SAFETY: as for `wake_buf`; the signalfd lives as long as the worker.
        unsafe { self.ring.push_op(&read) };
    }

    /// Moves between accepting and not: arms the multishot accept, or cancels it.
    fn set_accepting(&mut self, next: Accepting) {
        self.accepting = next;
        let want = next == Accepting::Yes && !self.quiescing;
        match (&self.listener, self.accept) {
            (Some(listener), Recv::Off) if want => {
                let accept = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
                    .flags(libc::SOCK_CLOEXEC)
                    .build()
                    .user_data(tag(Op::Accept, 0));
                // SAFETY: a multishot accept names no memory; the listener is closed only after
                // its accept is cancelled (`start_draining`).
                unsafe { self.ring.push_op(&accept) };
                self.accept = Recv::Armed;
            }
            (_, Recv::Armed) if !want => {
                self.ring
                    .push_quiet(opcode::AsyncCancel::new(tag(Op::Accept, 0)).build());
                self.accept = Recv::Cancelling;
            }
            _ => {}
        }
    }

    // ---- connections -----------------------------------------------------------------------

    fn admit(&mut self, fd: OwnedFd) {
        if self.open < self.config.max_conns {
            self.add(fd);
        } else {
            self.waiting.push_back(fd);
        }
        if self.open >= self.config.max_conns && self.accepting == Accepting::Yes {
            // The rest wait in the kernel's accept queue; a close resumes accepting.
            self.set_accepting(Accepting::Full);
        }
    }

    fn add(&mut self, fd: OwnedFd) {
        self.generations += 1;
        let token = self.conns.insert(Connection {
            fd: Some(fd),
            http: Conn::new(self.config.conn.clone(), self.now),
            generation: self.generations,
            recv: Recv::Off,
            eof: false,
            send: Vec::new(),
            sending: false,
            touched: false,
            stream_waits: false,
            upload: None,
        });
        self.open += 1;
        self.stats.connection_opened();
        // Driving it arms its receive.
        self.touch(token);
    }

    /// Closes the socket: cancels what the kernel still does with it, then closes the
    /// descriptor, all in the next enter. The slot stays until the cancelled operations'
    /// last completions have come (they may still be using its memory).
    fn close(&mut self, token: usize) {
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        let Some(fd) = c.fd.take() else {
            return;
        };
        if c.recv == Recv::Armed {
            self.ring
                .push_quiet(opcode::AsyncCancel::new(tag(Op::Recv, token)).build());
            c.recv = Recv::Cancelling;
        }
        if c.sending {
            self.ring
                .push_quiet(opcode::AsyncCancel::new(tag(Op::Send, token)).build());
        }
        // The socket itself closes when the last operation holding it lets go.
        let close = opcode::Close::new(types::Fd(fd.into_raw_fd()));
        self.ring
            .push_quiet(close.build().user_data(tag(Op::Close, token)));
        self.open -= 1;
        self.stats.connection_closed();
        self.forget_if_idle(token);
        if let Some(fd) = self.waiting.pop_front() {
            self.add(fd);
        } else if self.accepting == Accepting::Full {
            self.set_accepting(Accepting::Yes);
        }
    }

    /// Frees a closed connection's slot once no operation uses it any more.
    fn forget_if_idle(&mut self, token: usize) {
        if self
            .conns
            .get(token)
            .is_some_and(|c| c.fd.is_none() && c.recv == Recv::Off && !c.sending)
        {
            let c = self.conns.remove(token);
            keep_send_buffer(&mut self.send_pool, c.send);
        }
    }

    /// Moves a connection as far as it can go this turn: serve the requests it has, queue one
    /// send of every reply that is ready, start or stop its receive, then close it, or give its
    /// buffers back to the pools while it waits.
    fn drive(&mut self, token: usize) {
        let Some(c) = self.conns.get_mut(token) else {
            return;
        };
        c.touched = false;
        let Some(fd) = c.fd.as_ref().map(AsRawFd::as_raw_fd) else {
            return;
        };
        let now = self.now;
        held::feed(&mut c.upload, &mut c.http);
        while let Some(req) = c.http.next_request() {
            self.stats.request();
            let id = req.id;
            let reply = self.app.handle_inline(&req);
            let key = ConnKey {
                token,
                generation: c.generation,
            };
            if let Some(upload) = self.held.file(&mut c.http, key, id, reply) {
                c.upload = Some(upload);
            }
        }
        if c.eof && c.http.wants_read() {
            // Where the event loop's read would have returned 0.
            c.http.read_eof();
            // An upload cut short learns of it now.
            held::feed(&mut c.upload, &mut c.http);
        }
        if !c.sending {
            let out = c.http.output(self.headers.get(), now);
            if !out.is_empty() {
                let n = out.len().min(SEND_AT_MOST);
                if c.send.capacity() == 0 {
                    c.send = self.send_pool.pop().unwrap_or_default();
                }
                c.send.clear();
                c.send.extend_from_slice(&out[..n]);
                let send = opcode::Send::new(types::Fd(fd), c.send.as_ptr(), n as u32)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
                    .user_data(tag(Op::Send, token));
                // SAFETY: `c.send`'s heap block is neither written nor freed until this send
                // completes: `sending` guards it, and a connection closed meanwhile keeps its
                // slot, and so this Vec, until then (`forget_if_idle`). Moving the Vec (the
                // slab growing) does not move its heap block.
                unsafe { self.ring.push_op(&send) };
                c.sending = true;
            }
        }
        if c.http.is_finished() && c.http.should_linger() {
            // Half-close, then drain what the peer still sends before closing, so that a
            // reset cannot destroy the last reply (nginx's lingering close).
            // SAFETY: `fd` is this connection's open socket.
            if unsafe { libc::shutdown(fd, libc::SHUT_WR) } != 0 {
                return self.close(token);
            }
            c.http.begin_linger(now);
            if c.eof {
                c.http.read_eof();
            }
        }
        let want_read = c.http.wants_read() && !c.eof;
        match c.recv {
            Recv::Off if want_read => {
                let recv = opcode::RecvMulti::new(types::Fd(fd), self.bufs.group())
                    .build()
                    .user_data(tag(Op::Recv, token));
                // SAFETY: the receive writes only into provided buffers, registered until
                // every operation has completed (`quiesce`), and leaked otherwise.
                unsafe { self.ring.push_op(&recv) };
                c.recv = Recv::Armed;
            }
            Recv::Armed if !want_read => {
                // Backpressure, or no more requests: the kernel must stop taking bytes for it.
                self.ring
                    .push_quiet(opcode::AsyncCancel::new(tag(Op::Recv, token)).build());
                c.recv = Recv::Cancelling;
                self.stats.add_extra(RECV_CANCELS, 1);
            }
            _ => {}
        }
        if c.http.is_finished() {
            self.close(token);
        } else {
            c.http.release_buffers();
            if !c.sending && c.send.capacity() > 0 {
                keep_send_buffer(&mut self.send_pool, std::mem::take(&mut c.send));
            }
        }
    }

    // ---- held requests and streams ---------------------------------------------------------

    /// Polls every held request and stream: what is ready is filed into its connection, and
    /// each connection touched is driven once (one send for all it got).
    fn poll_held(&mut self) {
        let mut touched = std::mem::take(&mut self.scratch);
        self.held.poll(self.now, &mut self.conns, &mut touched);
        for &token in &touched {
            self.drive(token);
        }
        touched.clear();
        self.scratch = touched;
    }

    // ---- timeouts and shutdown -------------------------------------------------------------

    /// Hands every connection whose deadline has passed to proto's `handle_timeout` (a 408, an
    /// idle close, the end of a lingering close...), then drives it.
    fn sweep(&mut self) {
        self.next_sweep = self.now + self.sweep_every;
        let now = self.now;
        let mut expired = std::mem::take(&mut self.scratch);
        for (token, c) in self.conns.iter_mut() {
            if c.fd.is_some() && c.http.poll_timeout().is_some_and(|at| at <= now) {
                expired.push(token);
            }
        }
        for &token in &expired {
            if let Some(c) = self.conns.get_mut(token) {
                c.http.handle_timeout(now);
                self.drive(token);
            }
        }
        expired.clear();
        self.scratch = expired;
    }

    /// Stop accepting and reading new requests; connections close as their replies go out.
    fn start_draining(&mut self) -> io::Result<()> {
        self.set_accepting(Accepting::No);
        if let Some(listener) = self.listener.take() {
            // After the cancel of its accept, queued just before: connections still in its
            // queue are reset, as in reuseport.
            let close = opcode::Close::new(types::Fd(listener.into_raw_fd()));
            self.ring
                .push_quiet(close.build().user_data(tag(Op::Close, 0)));
        }
        self.waiting.clear();
        // Held requests answer with what they have, streams end (the hub calls every ring).
        self.app.stop();
        // A request that reached the socket before now is in flight too: one turn that waits
        // for nothing delivers what the kernel has received and serves it.
        self.turn(Duration::ZERO)?;
        // From now on each connection reads nothing after its current request; one that has
        // sent nothing yet gets the shutdown grace to send its first (proto decides).
        self.draining_since = Some(self.now);
        let mut tokens = std::mem::take(&mut self.scratch);
        tokens.extend(
            self.conns
                .iter()
                .filter(|(_, c)| c.fd.is_some())
                .map(|(t, _)| t),
        );
        for &token in &tokens {
            if let Some(c) = self.conns.get_mut(token) {
                c.http.stop_reading(self.now);
                self.drive(token);
            }
        }
        tokens.clear();
        self.scratch = tokens;
        Ok(())
    }

    /// The end: closes what is still open (the shutdown timeout passed), cancels every
    /// operation, and waits for their last completions, so that no memory the kernel may
    /// write to is freed before it is done with it.
    fn quiesce(&mut self) -> io::Result<()> {
        let open: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.fd.is_some())
            .map(|(t, _)| t)
            .collect();
        for token in open {
            self.close(token);
        }
        self.quiescing = true;
        self.ring.push_quiet(
            opcode::AsyncCancel2::new(types::CancelBuilder::any())
                .build()
                .user_data(tag(Op::Cancel, 0)),
        );
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.ring.in_flight > 0 && Instant::now() < deadline {
            self.turn(Duration::from_millis(100))?;
        }
        if self.ring.in_flight == 0 {
            self.bufs.unregister(&self.ring.ring)?;
        }
        Ok(())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.ring.in_flight > 0 {
            // Operations may still write to these (an error return, or a kernel that did not
            // cancel in time): leak them rather than free memory the kernel may use.
            std::mem::forget(std::mem::take(&mut self.conns));
            std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new([0; 8])));
            std::mem::forget(std::mem::replace(&mut self.signal_buf, Box::new([0; 128])));
        }
    }
}

fn keep_send_buffer(pool: &mut Vec<Vec<u8>>, mut buf: Vec<u8>) {
    if buf.capacity() > 0 && buf.capacity() <= KEEP_SEND_BUFFER && pool.len() < 1024 {
        buf.clear();
        pool.push(buf);
    }
}
