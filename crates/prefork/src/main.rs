//! # prefork: a master process and N forked workers (nginx, Apache prefork, PostgreSQL)
//!
//! The master binds the listening socket, then forks N worker processes that inherit it and all
//! accept from its one queue. The master serves nothing: it supervises. Its signal handlers only
//! set flags; its loop sleeps, reaps dead workers and forks replacements into the same slots.
//! Workers share no memory with each other, only a small shared mapping of counters, so a crash
//! takes down one worker's connections and nothing else. nginx (`--mode event`: an epoll loop per
//! worker), Apache's prefork MPM (`--mode blocking`: one connection at a time), PostgreSQL's
//! postmaster and gunicorn all run this way.
//!
//! ```text
//!                   ┌────────── master (one thread; serves nothing) ──────────┐
//!                   │ socket+bind+listen ─▶ fd 3      mmap(MAP_SHARED): slots  │
//!                   │ signals ─▶ flags + self-pipe    loop: poll, waitpid,     │
//!                   │                                 respawn, restart, stop   │
//!                   └──────┬───────────────────┬───────────────────┬───────────┘
//!        fork: the child   │                   │                   │
//!        inherits fd 3 and │                   │                   │
//!        the mapping       ▼                   ▼                   ▼
//!                  ┌── worker-0 ───┐   ┌── worker-1 ───┐   ┌── worker-2 ───┐
//!   clients ─TCP─▶ │ accept(fd 3)  │   │ accept(fd 3)  │   │ accept(fd 3)  │ ◀─ one accept
//!                  │ its own epoll │   │ its own epoll │   │ its own epoll │    queue, in
//!                  │ (or blocking) │   │ (or blocking) │   │ (or blocking) │    the kernel
//!                  │ writes slot 0 │   │ writes slot 1 │   │ writes slot 2 │
//!                  └───────────────┘   └───────────────┘   └───────────────┘
//!   GET /stats, answered by any worker, reads every slot: every worker's pid and counts.
//! ```
//!
//! Who owns what. The master creates the listening socket and the shared mapping before the
//! first fork and keeps both (a respawned worker inherits them again); it creates no thread and
//! no poll, because fork copies only the calling thread. A worker inherits fd 3 (the same
//! socket, not a copy: one accept queue, and one O_NONBLOCK flag for all), the mapping (it
//! writes only its own slot), and the master's signal handlers, which it drops at once for its
//! own. Everything else, its epoll, connections and threads, it creates after the fork.
//!
//! Signals to the master: SIGTERM or SIGINT, graceful (workers stop accepting, finish what is in
//! flight and exit; the master exits 0 after them and SIGKILLs stragglers after
//! `--shutdown-timeout`); SIGQUIT, or a second SIGINT, fast (workers are killed at once);
//! SIGHUP, a rolling restart (each worker is replaced by a new one that starts before the old
//! one is told to stop, so someone is always accepting and the socket never closes). A worker
//! that exits with [`EXIT_FATAL`] (2, as in nginx) cannot start and is not respawned; any other
//! death is respawned, with a back-off for workers that die young.
//!
//! Trade-offs: isolation (a crash or a leak kills one worker; a rolling restart replaces code
//! paths without dropping the socket) for memory (a process each) and for sharing (no shared
//! cache or connection pool without shared memory or IPC). In event mode every worker's epoll
//! wakes for each new connection (the herd: `wasted_wakeups` in `/stats`); blocking accept(2)
//! wakes one sleeper, but a blocking worker serves one connection at a time, so keep-alive
//! clients need as many workers as connections.
//!
//! Run: `cargo run --release -p prefork -- --addr 127.0.0.1:8080 --workers 4 [--mode blocking]`
//! then `ps -o pid,ppid,comm -g $(pgrep -o prefork)` shows the master and `worker-N` processes.

use std::io;
use std::net::TcpListener;
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, getppid};
use runtime::blocking::{OpenConns, serve};
use runtime::listener::{AcceptBackoff, is_out_of_resources};
use runtime::shutdown::STOP_SIGNALS;
use runtime::{App, EventLoop, Inline, ServeConfig, ServerArgs, Shutdown, Stats, WorkerStats};
use signal_hook::SigId;

const PATTERN: &str = "prefork";

/// A worker's exit code meaning "I cannot start, and would fail the same way again": the
/// master does not respawn it (nginx's workers exit 2 for this). Workers exit 2 when they
/// cannot set up their loop or signal handling; 1 on a later error; 101 (or SIGABRT in release
/// builds) on a panic.
const EXIT_FATAL: i32 = 2;

/// The extra `/stats` counter of each slot: how many workers the master forked into it.
const SPAWNS: usize = 0;

/// A worker that lived this long died of something other than its start-up: respawn at once.
const STABLE_AFTER: Duration = Duration::from_secs(1);
/// The respawn delay of a worker that dies young: 100 ms, doubling to 10 s per slot.
const RESPAWN_MIN: Duration = Duration::from_millis(100);
const RESPAWN_MAX: Duration = Duration::from_secs(10);

/// The master SIGKILLs a worker this long after `--shutdown-timeout` if it is still there (the
/// workers enforce that timeout themselves; this is for one that hangs).
const KILL_GRACE: Duration = Duration::from_secs(1);

/// How long a blocking worker waits in accept(2) before looking at its stop flag.
const ACCEPT_TICK: Duration = Duration::from_millis(100);

/// The signals the master handles.
const MASTER_SIGNALS: [libc::c_int; 5] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGHUP,
    libc::SIGCHLD,
];

#[derive(Parser, Debug)]
#[command(name = PATTERN, about = "A master binds and supervises N forked worker processes (nginx, Apache prefork).")]
struct Args {
    #[command(flatten)]
    server: ServerArgs,

    /// How each worker process serves: `event` (nginx: one epoll loop, many connections) or
    /// `blocking` (Apache prefork: one connection at a time).
    #[arg(long, value_enum, default_value = "event")]
    mode: Mode,

    /// For the tests of respawning: every worker forked into slot SLOT panics as it starts
    /// (`SLOT:fatal`: exits with EXIT_FATAL instead).
    #[arg(long, hide = true, value_name = "SLOT[:fatal]", value_parser = start_failure)]
    test_fail_start: Option<(usize, StartFailure)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Event,
    Blocking,
}

fn main() -> io::Result<()> {
    let args: Args = runtime::cli::parse();
    let workers = args.server.workers();

    let listener = runtime::listener::bind(&args.server, false)?;
    let addr = listener.local_addr()?;
    if args.mode == Mode::Blocking {
        accept_blocking_with_tick(&listener)?;
    }
    let stats = Stats::with_slots(PATTERN, shared_slots(workers)?).with_extra(&["spawns"]);
    let stats = Arc::new(stats);

    let mut master = Master {
        listener: Some(listener),
        signals: MasterSignals::install()?,
        setup: WorkerSetup {
            mode: args.mode,
            config: ServeConfig::new(PATTERN, &args.server),
            app: App::new(stats.clone()),
            fail_start: args.test_fail_start,
            master: Pid::this(),
        },
        stats,
        children: Vec::new(),
        slots: vec![Slot::default(); workers],
        restart: None,
        stopping: false,
        kill_after: args.server.shutdown_timeout + KILL_GRACE,
    };
    for slot in 0..workers {
        master.spawn(slot)?;
    }
    master.wait_ready();
    runtime::announce(PATTERN, addr, workers);
    std::process::exit(master.supervise())
}

// ---- the master: sleep, reap, respawn --------------------------------------------------------

struct Master {
    /// The listening socket; dropped when a graceful stop begins.
    listener: Option<TcpListener>,
    signals: MasterSignals,
    setup: WorkerSetup,
    stats: Arc<Stats>,
    /// Every forked worker not yet reaped.
    children: Vec<Child>,
    slots: Vec<Slot>,
    restart: Option<Restart>,
    stopping: bool,
    kill_after: Duration,
}

/// A forked worker, until it is reaped.
struct Child {
    pid: Pid,
    slot: usize,
    forked: Instant,
    /// When the master told it to stop (SIGTERM).
    stopping: Option<Instant>,
    killed: bool,
}

#[derive(Clone, Debug)]
struct Slot {
    /// Its worker died: when to fork the next one.
    respawn_at: Option<Instant>,
    /// The delay before respawning the next worker here that dies young.
    backoff: Duration,
    /// Its worker exited with EXIT_FATAL: it is not respawned.
    fatal: bool,
}

impl Default for Slot {
    fn default() -> Slot {
        Slot {
            respawn_at: None,
            backoff: RESPAWN_MIN,
            fatal: false,
        }
    }
}

/// A rolling restart at `slot`: `new` is replacing `old`.
#[derive(Clone, Copy, Debug)]
struct Restart {
    slot: usize,
    old: Pid,
    new: Pid,
}

impl Master {
    /// The master's whole life after start-up; returns its exit code.
    fn supervise(&mut self) -> i32 {
        loop {
            self.reap();
            let [term, int, quit, hup] = [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT, libc::SIGHUP]
                .map(|sig| self.signals.take(sig));
            if quit || (int && self.stopping) {
                return self.stop_fast();
            }
            if (term || int) && !self.stopping {
                self.begin_stop();
            }
            if hup && !self.stopping {
                self.begin_restart();
            }
            self.kill_stragglers();
            if self.stopping && self.children.is_empty() {
                eprintln!("{PATTERN}: every worker has exited; the master exits");
                return 0;
            }
            if !self.stopping {
                self.respawn_due();
                self.advance_restart();
                if self.children.is_empty() && self.slots.iter().all(|s| s.fatal) {
                    eprintln!("{PATTERN}: no worker can start; the master exits");
                    return EXIT_FATAL;
                }
            }
            self.signals.sleep(self.next_wake());
        }
    }

    /// Start-up: waits (up to 5 s) until every worker has set up its loop and claimed its
    /// slot, or died, so that the announce line means the workers are serving.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !self.children.iter().all(|c| self.is_ready(c.pid)) {
            self.signals.sleep(Duration::from_millis(5));
            self.reap();
        }
    }

    /// A worker is ready once it has claimed its slot's stats: it calls `bind_thread` when its
    /// loop is set up.
    fn is_ready(&self, pid: Pid) -> bool {
        let child = self.children.iter().find(|c| c.pid == pid);
        child.is_some_and(|c| self.stats.worker(c.slot).pid.load(Ordering::Relaxed) == pid_u32(pid))
    }

    /// Forks a worker into `slot`. The child never returns from here: it serves, then exits.
    fn spawn(&mut self, slot: usize) -> io::Result<Pid> {
        if !single_threaded() {
            return Err(io::Error::other(
                "the master has threads: fork would lose them",
            ));
        }
        self.stats.worker(slot).add_extra(SPAWNS, 1);
        // Blocked until the child has put its own handlers in place of the master's, so that a
        // SIGTERM sent to a brand-new worker waits for them instead of being lost.
        master_signal_set().thread_block()?;
        // SAFETY: the master has a single thread (checked above), so the child is a complete
        // copy of its process, with no lock held by a thread that does not exist there.
        let forked = unsafe { fork() };
        if !matches!(forked, Ok(ForkResult::Child)) {
            master_signal_set().thread_unblock()?;
        }
        let pid = match forked? {
            ForkResult::Child => std::process::exit(self.become_worker(slot)),
            ForkResult::Parent { child } => child,
        };
        self.children.push(Child {
            pid,
            slot,
            forked: Instant::now(),
            stopping: None,
            killed: false,
        });
        Ok(pid)
    }

    /// In the child, right after fork: drop what is the master's, keep the socket, serve.
    fn become_worker(&mut self, slot: usize) -> i32 {
        self.signals.leave();
        self.children.clear();
        match self.listener.take() {
            Some(listener) => worker(slot, listener, &self.setup),
            None => EXIT_FATAL,
        }
    }

    /// Collects every worker that has exited, so none stays a zombie, and decides what next.
    fn reap(&mut self) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.exited(pid, Some(code), None),
                Ok(WaitStatus::Signaled(pid, signal, _)) => self.exited(pid, None, Some(signal)),
                // Nothing more has exited (or there are no children at all).
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => {
                    eprintln!("{PATTERN}: waitpid: {e}");
                    return;
                }
            }
        }
    }

    fn exited(&mut self, pid: Pid, code: Option<i32>, signal: Option<Signal>) {
        let Some(i) = self.children.iter().position(|c| c.pid == pid) else {
            return;
        };
        let child = self.children.swap_remove(i);
        let now = Instant::now();
        if !self.children.iter().any(|c| c.slot == child.slot) {
            // No process is left in the slot, so none has a connection open there: a killed
            // worker's connections died with it.
            self.stats
                .worker(child.slot)
                .open
                .store(0, Ordering::Relaxed);
        }
        let how = match (code, signal) {
            (Some(code), _) => format!("exited with {code}"),
            (_, Some(signal)) => format!("was killed by {signal}"),
            _ => "ended".into(),
        };
        if child.stopping.is_some() {
            // Told to stop: expected, and worth a line only if it did not exit cleanly.
            if code != Some(0) {
                eprintln!(
                    "{PATTERN}: stopping worker {} (pid {pid}) {how}",
                    child.slot
                );
            }
            return;
        }
        let lived = now - child.forked;
        let what = format!(
            "{PATTERN}: worker {} (pid {pid}) {how} after {lived:.1?}",
            child.slot
        );
        if code == Some(EXIT_FATAL) {
            self.slots[child.slot].fatal = true;
            eprintln!("{what}: exit code {EXIT_FATAL} means it cannot start; not respawning it");
        } else if let Some(other) = self.serving(child.slot) {
            // A rolling restart had two workers in the slot; the other one serves on.
            eprintln!("{what}; pid {other} serves slot {}", child.slot);
        } else {
            let slot = &mut self.slots[child.slot];
            let delay = if lived >= STABLE_AFTER {
                slot.backoff = RESPAWN_MIN;
                Duration::ZERO
            } else {
                // Died young: probably dies at start-up; do not loop through forks.
                let delay = slot.backoff;
                slot.backoff = (delay * 2).min(RESPAWN_MAX);
                delay
            };
            slot.respawn_at = Some(now + delay);
            match delay {
                Duration::ZERO => eprintln!("{what}; respawning it"),
                _ => eprintln!("{what}; respawning it in {delay:?}"),
            }
        }
    }

    fn respawn_due(&mut self) {
        let now = Instant::now();
        for slot in 0..self.slots.len() {
            if self.slots[slot].respawn_at.is_some_and(|at| now >= at) {
                self.slots[slot].respawn_at = None;
                if let Err(e) = self.spawn(slot) {
                    let delay = self.slots[slot].backoff;
                    eprintln!("{PATTERN}: fork for worker {slot}: {e}; retrying in {delay:?}");
                    self.slots[slot].respawn_at = Some(now + delay);
                    self.slots[slot].backoff = (delay * 2).min(RESPAWN_MAX);
                }
            }
        }
    }

    /// How long the master may sleep: until the next respawn or kill deadline, or a short
    /// tick while a rolling restart waits for a new worker to be ready; a second at most.
    fn next_wake(&self) -> Duration {
        let now = Instant::now();
        let mut wake = now + Duration::from_secs(1);
        for at in self.slots.iter().filter_map(|s| s.respawn_at) {
            wake = wake.min(at);
        }
        for since in self
            .children
            .iter()
            .filter(|c| !c.killed)
            .filter_map(|c| c.stopping)
        {
            wake = wake.min(since + self.kill_after);
        }
        if self.restart.is_some() {
            wake = wake.min(now + Duration::from_millis(20));
        }
        wake.saturating_duration_since(now)
    }

    // ---- stopping and restarting ----------------------------------------------------------

    /// SIGTERM (or a first SIGINT): every worker finishes what it is doing and exits.
    fn begin_stop(&mut self) {
        eprintln!(
            "{PATTERN}: graceful stop: telling {} workers to finish and exit",
            self.children.len()
        );
        self.stopping = true;
        self.restart = None;
        // The socket closes when the last worker drops its copy too: from then on connections
        // are refused instead of queueing for nobody.
        self.listener = None;
        for c in &mut self.children {
            tell_to_stop(c);
        }
    }

    /// SIGQUIT (or a second SIGINT): kill every worker now, reap them, exit.
    fn stop_fast(&mut self) -> i32 {
        eprintln!(
            "{PATTERN}: fast stop: killing {} workers",
            self.children.len()
        );
        for c in &self.children {
            let _ = kill(c.pid, Signal::SIGKILL);
        }
        for c in self.children.drain(..) {
            // SIGKILL cannot be caught or ignored, so this wait is short.
            while waitpid(c.pid, None) == Err(Errno::EINTR) {}
        }
        0
    }

    /// A worker told to stop that is still there after the shutdown timeout gets SIGKILL.
    fn kill_stragglers(&mut self) {
        let now = Instant::now();
        for c in &mut self.children {
            if let Some(since) = c.stopping
                && !c.killed
                && now >= since + self.kill_after
            {
                eprintln!(
                    "{PATTERN}: worker {} (pid {}) did not stop in {:?}; killing it",
                    c.slot, c.pid, self.kill_after
                );
                let _ = kill(c.pid, Signal::SIGKILL);
                c.killed = true;
            }
        }
    }

    /// SIGHUP: replace the workers one by one, keeping the listening socket open.
    fn begin_restart(&mut self) {
        if self.restart.is_some() {
            eprintln!("{PATTERN}: SIGHUP: a rolling restart is already under way");
            return;
        }
        eprintln!(
            "{PATTERN}: SIGHUP: rolling restart of {} workers",
            self.slots.len()
        );
        self.restart = self.replace_from(0);
    }

    /// Forks a replacement for the first slot from `from` on that has a serving worker.
    fn replace_from(&mut self, from: usize) -> Option<Restart> {
        for slot in from..self.slots.len() {
            // A slot waiting to respawn gets a new worker anyway.
            let Some(old) = self.serving(slot) else {
                continue;
            };
            match self.spawn(slot) {
                Ok(new) => return Some(Restart { slot, old, new }),
                Err(e) => {
                    eprintln!("{PATTERN}: rolling restart stopped at worker {slot}: fork: {e}");
                    return None;
                }
            }
        }
        eprintln!("{PATTERN}: rolling restart done");
        None
    }

    /// One step of a rolling restart. Once the new worker is ready, the old one is told to
    /// stop; once the old one has exited, the next slot's turn comes. So the socket always has
    /// a worker accepting, and there are never more than N + 1 workers.
    fn advance_restart(&mut self) {
        while let Some(r) = self.restart {
            if !self.children.iter().any(|c| c.pid == r.new) {
                eprintln!(
                    "{PATTERN}: rolling restart abandoned: worker {}'s replacement (pid {}) \
                     exited",
                    r.slot, r.new
                );
                self.restart = None;
                return;
            }
            let ready = self.is_ready(r.new);
            if let Some(old) = self.children.iter_mut().find(|c| c.pid == r.old) {
                if ready && old.stopping.is_none() {
                    tell_to_stop(old);
                }
                return;
            }
            self.restart = self.replace_from(r.slot + 1);
        }
    }

    /// The worker serving `slot`, not counting one told to stop.
    fn serving(&self, slot: usize) -> Option<Pid> {
        let serving = |c: &&Child| c.slot == slot && c.stopping.is_none();
        self.children.iter().find(serving).map(|c| c.pid)
    }
}

fn tell_to_stop(c: &mut Child) {
    if c.stopping.is_none() {
        let _ = kill(c.pid, Signal::SIGTERM);
        c.stopping = Some(Instant::now());
    }
}

// ---- the master's signals --------------------------------------------------------------------

/// Each handler only sets its signal's flag and writes a byte to a socket pair; the master's
/// loop sleeps in poll(2) on the other end (the self-pipe trick), so a signal that arrives
/// between looking at the flags and going to sleep still wakes it.
struct MasterSignals {
    flags: [Arc<AtomicBool>; MASTER_SIGNALS.len()],
    ids: Vec<SigId>,
    wake: Option<UnixStream>,
}

impl MasterSignals {
    fn install() -> io::Result<MasterSignals> {
        let (wake, notify) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        let flags: [Arc<AtomicBool>; MASTER_SIGNALS.len()] = Default::default();
        let mut ids = Vec::new();
        for (&signal, flag) in MASTER_SIGNALS.iter().zip(&flags) {
            // The flag first: it is set by the time the byte wakes the loop.
            ids.push(signal_hook::flag::register(signal, flag.clone())?);
            ids.push(signal_hook::low_level::pipe::register(
                signal,
                notify.try_clone()?,
            )?);
        }
        Ok(MasterSignals {
            flags,
            ids,
            wake: Some(wake),
        })
    }

    /// Whether `signal` arrived since the last look, clearing it.
    fn take(&self, signal: libc::c_int) -> bool {
        let i = MASTER_SIGNALS.iter().position(|&s| s == signal);
        i.is_some_and(|i| self.flags[i].swap(false, Ordering::SeqCst))
    }

    /// Sleeps until a signal arrives or `timeout` passes.
    fn sleep(&self, timeout: Duration) {
        let Some(wake) = &self.wake else {
            return;
        };
        let timeout = PollTimeout::try_from(timeout.max(Duration::from_millis(1)))
            .unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(wake.as_fd(), PollFlags::POLLIN)];
        // EINTR: a signal arrived, which is what we wait for.
        let _ = nix::poll::poll(&mut fds, timeout);
        let mut drain = [0u8; 64];
        while matches!(io::Read::read(&mut &*wake, &mut drain), Ok(n) if n > 0) {}
    }

    /// In a new worker: the master's handlers and self-pipe are none of its business.
    fn leave(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
        self.wake = None;
    }
}

fn master_signal_set() -> SigSet {
    let mut set = SigSet::empty();
    for signal in MASTER_SIGNALS {
        if let Ok(signal) = Signal::try_from(signal) {
            set.add(signal);
        }
    }
    set
}

// ---- the workers -----------------------------------------------------------------------------

/// What a worker needs, prepared by the master before forking.
struct WorkerSetup {
    mode: Mode,
    config: ServeConfig,
    app: App,
    fail_start: Option<(usize, StartFailure)>,
    master: Pid,
}

/// Why a worker stopped serving before it was told to.
enum WorkerError {
    /// It could not set itself up: exits with EXIT_FATAL.
    Start(io::Error),
    /// It failed while serving: exits 1, and is respawned.
    Serve(io::Error),
}

/// A worker process's life: serve the inherited socket until told to stop; the exit code.
fn worker(slot: usize, listener: TcpListener, setup: &WorkerSetup) -> i32 {
    // `ps` shows the role: the master keeps the binary's name, the workers are worker-N.
    if let Ok(name) = std::ffi::CString::new(format!("worker-{slot}")) {
        let _ = nix::sys::prctl::set_name(&name);
    }
    // If the master dies, finish and exit rather than serve on unsupervised.
    if nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).is_err() || getppid() != setup.master {
        return 0;
    }
    let stats = setup.app.stats().worker(slot);
    let served = std::panic::catch_unwind(AssertUnwindSafe(|| {
        match setup.fail_start {
            Some((s, StartFailure::Panic)) if s == slot => {
                panic!("--test-fail-start: worker {slot} panics at start-up")
            }
            Some((s, StartFailure::Fatal)) if s == slot => {
                let e = io::Error::other("--test-fail-start asked for a fatal start-up");
                return Err(WorkerError::Start(e));
            }
            _ => {}
        }
        match setup.mode {
            Mode::Event => serve_events(listener, setup, stats),
            Mode::Blocking => serve_blocking(listener, setup, stats),
        }
    }));
    match served {
        Ok(Ok(())) => 0,
        Ok(Err(WorkerError::Start(e))) => {
            eprintln!("{PATTERN}: worker {slot}: cannot start: {e}");
            EXIT_FATAL
        }
        Ok(Err(WorkerError::Serve(e))) => {
            eprintln!("{PATTERN}: worker {slot}: {e}");
            1
        }
        // The panic hook has printed the message. Never unwind into the master's frames.
        Err(_) => 101,
    }
}

/// nginx: an epoll loop on the shared socket, many connections at once.
fn serve_events(
    listener: TcpListener,
    setup: &WorkerSetup,
    stats: &'static WorkerStats,
) -> Result<(), WorkerError> {
    let start = WorkerError::Start;
    let mut event_loop =
        EventLoop::new(setup.config.clone(), stats, Shutdown::new()).map_err(start)?;
    event_loop.listen(listener).map_err(start)?;
    event_loop.watch_signals().map_err(start)?;
    // Signals held since the fork are delivered now, to this worker's own handlers.
    master_signal_set()
        .thread_unblock()
        .map_err(|e| start(e.into()))?;
    let mut handler = Inline(setup.app.clone());
    event_loop.run(&mut handler).map_err(WorkerError::Serve)
}

/// Apache prefork: accept one connection, serve it to the end, accept the next.
///
/// SIGTERM may find the worker in one of two places. Parked in accept(2): that wait ends every
/// ACCEPT_TICK (SO_RCVTIMEO), and the loop looks at the stop flag. Parked in read(2) on a
/// keep-alive connection: a thread waiting for the signal shuts down the reading side of the
/// connection ([`OpenConns::stop_reading`]), so the read returns, owed replies go out, and the
/// connection closes. A connection accept(2) hands over during the tick after the stop still
/// has its first request answered.
fn serve_blocking(
    listener: TcpListener,
    setup: &WorkerSetup,
    stats: &'static WorkerStats,
) -> Result<(), WorkerError> {
    let open = Arc::new(OpenConns::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut signals =
        signal_hook::iterator::Signals::new(STOP_SIGNALS).map_err(WorkerError::Start)?;
    {
        let (open, stop) = (open.clone(), stop.clone());
        // Spawned while signals are blocked, so they are always delivered to the main thread.
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if signals.forever().next().is_some() {
                    stop.store(true, Ordering::SeqCst);
                    open.stop_reading();
                }
            })
            .map_err(WorkerError::Start)?;
    }
    master_signal_set()
        .thread_unblock()
        .map_err(|e| WorkerError::Start(e.into()))?;
    stats.bind_thread();
    let app = &setup.app;
    let mut backoff = AcceptBackoff::default();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            // Accepted during the tick after the stop, too: like every connection that has sent
            // nothing yet at shutdown, it has the shutdown grace to send its first request.
            Ok((stream, _)) => {
                backoff.succeeded();
                serve(stream, &setup.config, stats, &open, |req| {
                    app.handle_inline(req)
                });
            }
            // The tick ran out (EAGAIN) or a signal interrupted: look at the flag again.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) if is_out_of_resources(&e) => {
                let pause = backoff.failed();
                eprintln!("{PATTERN}: accept: {e}; pausing accepts for {pause:?}");
                std::thread::sleep(pause);
            }
            // The client gave up while queued.
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            Err(e) => return Err(WorkerError::Serve(e)),
        }
    }
    Ok(())
}

// ---- helpers ---------------------------------------------------------------------------------

/// Per-worker counters in an anonymous shared mapping, made before the first fork so that every
/// worker inherits it: each writes its own slot, and any of them can answer `/stats`.
///
/// A slot outlives its workers: `accepted` and `requests` add up over every worker forked into
/// it, so the totals are the server's since start; `open` is reset when the slot's last process
/// dies (its connections died with it); `spawns` counts the forks.
fn shared_slots(n: usize) -> io::Result<&'static [WorkerStats]> {
    let bytes = n
        .checked_mul(size_of::<WorkerStats>())
        .and_then(NonZeroUsize::new);
    let bytes = bytes.ok_or_else(|| io::Error::other("--workers: no room for that many"))?;
    let prot = nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE;
    // SAFETY: a new anonymous mapping at an address the kernel picks aliases nothing.
    let base = unsafe {
        nix::sys::mman::mmap_anonymous(None, bytes, prot, nix::sys::mman::MapFlags::MAP_SHARED)
    }?;
    let slots = base.cast::<WorkerStats>();
    for i in 0..n {
        // SAFETY: `i < n` slots fit in the mapping, which is page-aligned (more than
        // WorkerStats needs) and not yet shared with anyone.
        unsafe { slots.add(i).write(WorkerStats::default()) };
    }
    // SAFETY: `n` initialized slots; the mapping is never unmapped, so it lives as long as the
    // process (and every process forked from it). WorkerStats is atomics only, so shared
    // references across processes are sound.
    Ok(unsafe { std::slice::from_raw_parts(slots.as_ptr(), n) })
}

/// Blocking mode: accept(2) sleeps in the kernel, which wakes one sleeper per connection (no
/// herd), and gives up after ACCEPT_TICK so the worker can look at its stop flag. Both settings
/// belong to the socket, shared by every process, so the master makes them once.
fn accept_blocking_with_tick(listener: &TcpListener) -> io::Result<()> {
    listener.set_nonblocking(false)?;
    socket2::SockRef::from(listener).set_read_timeout(Some(ACCEPT_TICK))
}

/// fork(2) copies only the calling thread.
fn single_threaded() -> bool {
    std::fs::read_dir("/proc/self/task").map_or(true, |tasks| tasks.count() == 1)
}

fn pid_u32(pid: Pid) -> u32 {
    u32::try_from(pid.as_raw()).unwrap_or(0)
}

#[derive(Clone, Copy, Debug)]
enum StartFailure {
    Panic,
    Fatal,
}

fn start_failure(value: &str) -> Result<(usize, StartFailure), String> {
    let (slot, how) = match value.split_once(':') {
        Some((slot, "fatal")) => (slot, StartFailure::Fatal),
        Some(_) => return Err("expected SLOT or SLOT:fatal".into()),
        None => (value, StartFailure::Panic),
    };
    let slot = slot
        .parse()
        .map_err(|_| "expected a slot number".to_string())?;
    Ok((slot, how))
}
