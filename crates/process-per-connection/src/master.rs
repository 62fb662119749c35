//! The master: it accepts, forks a child for each connection, and reaps the children as they
//! exit; it keeps the jobs process alive, and stops everyone on SIGTERM. It serves nothing and
//! never has a second thread: `fork` copies only the calling thread.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork};
use runtime::Stats;
use runtime::listener::AcceptBackoff;
use runtime::master_signals::{self, MasterSignals};

use crate::child::{self, Setup};
use crate::shared::{self, FORKS, JOBS_SLOT};
use crate::{EXIT_FATAL, PATTERN};

/// A jobs process that lived this long died of something other than its start-up: respawn
/// it at once.
const STABLE_AFTER: Duration = Duration::from_secs(1);
/// The respawn delay of a jobs process that dies young: 100 ms, doubling to 10 s.
const RESPAWN_MIN: Duration = Duration::from_millis(100);
const RESPAWN_MAX: Duration = Duration::from_secs(10);

/// The master SIGKILLs a child this long after `--shutdown-timeout` if it is still there.
const KILL_GRACE: Duration = Duration::from_secs(1);

/// How long start-up waits for the jobs process to be ready before announcing anyway.
const READY_WAIT: Duration = Duration::from_secs(5);

/// Connections accepted (and children forked) in a row before the master looks at its
/// signals and reaps again.
const ACCEPT_BATCH: usize = 64;

/// The signals the master handles; SIGCHLD among them, so a child's exit wakes it to reap.
const MASTER_SIGNALS: [libc::c_int; 4] =
    [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT, libc::SIGCHLD];

/// The master's state: the socket, the children and their slots, the jobs process.
pub struct Master {
    /// The listening socket; dropped when a graceful stop begins.
    listener: Option<TcpListener>,
    signals: MasterSignals,
    setup: Setup,
    stats: Arc<Stats>,
    /// Every connection child not yet reaped, by pid.
    children: HashMap<Pid, Child>,
    /// The connection slots no child occupies; each child takes the lowest.
    free: BTreeSet<usize>,
    jobs: JobsProcess,
    /// Accepting is paused until then (out of descriptors, or fork failed).
    paused_until: Option<Instant>,
    backoff: AcceptBackoff,
    /// When the graceful stop began.
    stopping: Option<Instant>,
    killed: bool,
    kill_after: Duration,
    exit_code: i32,
}

/// A connection child, until it is reaped.
struct Child {
    slot: usize,
    forked: Instant,
}

/// The jobs process: there is one, or one is due to be forked.
struct JobsProcess {
    pid: Option<Pid>,
    forked: Instant,
    respawn_at: Option<Instant>,
    /// The delay before respawning the next one that dies young.
    backoff: Duration,
}

impl Master {
    /// Takes over the listening socket and installs the master's signal handlers; forks
    /// nothing yet.
    pub fn new(
        listener: TcpListener,
        setup: Setup,
        stats: Arc<Stats>,
        shutdown_timeout: Duration,
    ) -> io::Result<Master> {
        let slots = stats.workers().len();
        Ok(Master {
            listener: Some(listener),
            signals: MasterSignals::install(&MASTER_SIGNALS)?,
            setup,
            stats,
            children: HashMap::new(),
            free: (1..slots).collect(),
            jobs: JobsProcess {
                pid: None,
                forked: Instant::now(),
                respawn_at: None,
                backoff: RESPAWN_MIN,
            },
            paused_until: None,
            backoff: AcceptBackoff::default(),
            stopping: None,
            killed: false,
            kill_after: shutdown_timeout + KILL_GRACE,
            exit_code: 0,
        })
    }

    /// Forks the jobs process and waits until it is ready, so that a job posted once the
    /// server is announced finds its workers listening.
    pub fn start(&mut self) -> io::Result<()> {
        // Checked once: the master creates no thread, so a fork later copies all of it too.
        if std::fs::read_dir("/proc/self/task")?.count() != 1 {
            return Err(io::Error::other(
                "the master has threads: fork would lose them",
            ));
        }
        let pid = self.fork_jobs()?;
        let ready = &self.stats.worker(JOBS_SLOT).pid;
        let deadline = Instant::now() + READY_WAIT;
        while ready.load(Ordering::Relaxed) != pid_u32(pid) && Instant::now() < deadline {
            self.signals.sleep(Duration::from_millis(5), None);
            if self.signals.take(libc::SIGCHLD) {
                self.reap();
            }
            if self.jobs.pid != Some(pid) {
                return Err(io::Error::other("the jobs process exited at start-up"));
            }
        }
        Ok(())
    }

    /// The master's whole life after start-up; returns its exit code.
    pub fn supervise(&mut self) -> i32 {
        loop {
            if self.signals.take(libc::SIGCHLD) {
                self.reap();
            }
            let [term, int, quit] =
                [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT].map(|sig| self.signals.take(sig));
            if quit || (int && self.stopping.is_some()) {
                return self.stop_fast();
            }
            if (term || int) && self.stopping.is_none() {
                self.begin_stop();
            }
            if let Some(since) = self.stopping {
                self.kill_stragglers(since);
                if self.children.is_empty() && self.jobs.pid.is_none() {
                    eprintln!("{PATTERN}: every child has exited; the master exits");
                    return self.exit_code;
                }
            } else {
                self.respawn_jobs_if_due();
                self.accept();
            }
            let listen =
                (self.accepting().then_some(self.listener.as_ref()).flatten()).map(AsFd::as_fd);
            self.signals.sleep(self.next_wake(), listen);
        }
    }

    /// Whether the master waits for connections: not stopping, below the bound, not paused.
    fn accepting(&self) -> bool {
        self.stopping.is_none()
            && !self.free.is_empty()
            && self.paused_until.is_none_or(|at| Instant::now() >= at)
    }

    // ---- a child per connection --------------------------------------------------------------

    /// Accepts what is queued, a child for each connection, while below the bound. At the
    /// bound the master stops calling accept(2): new connections complete their handshake in
    /// the kernel and wait in the listen queue until a child exits.
    fn accept(&mut self) {
        for _ in 0..ACCEPT_BATCH {
            if !self.accepting() {
                return;
            }
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((stream, _)) => {
                    self.backoff.succeeded();
                    self.paused_until = None;
                    self.fork_connection(stream);
                }
                // Nothing more queued.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // The client gave up while queued, or a signal interrupted: try the next.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
                    ) => {}
                // Out of descriptors (is_out_of_resources), or worse: the connection stays
                // queued, and retrying at once would spin.
                Err(e) => self.pause(&format!("accept: {e}")),
            }
        }
    }

    /// Forks a child to serve `stream`; the master closes its own copy at once.
    fn fork_connection(&mut self, stream: TcpStream) {
        let Some(slot) = self.free.pop_first() else {
            return; // not reached: accepting() checks for a free slot
        };
        let jobs = self.jobs.pid.unwrap_or(Pid::from_raw(0));
        self.setup.catch_up();
        match self.fork(|master| master.become_connection(slot, stream, jobs)) {
            Ok(pid) => {
                self.stats.worker(slot).add_extra(FORKS, 1);
                self.children.insert(
                    pid,
                    Child {
                        slot,
                        forked: Instant::now(),
                    },
                );
            }
            Err(e) => {
                // The connection closes unserved: without a pause, the next one would fail too.
                self.free.insert(slot);
                self.pause(&format!("fork: {e}; a connection was closed unserved"));
            }
        }
    }

    /// In the new child, right after fork: drop what is the master's, serve, exit.
    fn become_connection(&mut self, slot: usize, stream: TcpStream, jobs: Pid) -> i32 {
        self.leave_master();
        child::connection(slot, stream, &self.setup, jobs)
    }

    fn fork_jobs(&mut self) -> io::Result<Pid> {
        let pid = self.fork(|master| {
            master.leave_master();
            child::jobs(&master.setup)
        })?;
        self.stats.worker(JOBS_SLOT).add_extra(FORKS, 1);
        self.jobs.pid = Some(pid);
        self.jobs.forked = Instant::now();
        Ok(pid)
    }

    /// Forks; the child runs `child` and exits with what it returns, never coming back here.
    fn fork(&mut self, child: impl FnOnce(&mut Master) -> i32) -> io::Result<Pid> {
        // Blocked until the child has set its own dispositions: a signal that reached a
        // brand-new child before that (Ctrl-C's SIGINT, to the whole group) would run the
        // master's handlers there instead.
        master_signal_set().thread_block()?;
        // SAFETY: the master has a single thread (checked at start, and it starts none), so
        // the child is a complete copy of its process, with no lock held by a thread that does
        // not exist there.
        let forked = unsafe { fork() };
        match forked {
            Ok(ForkResult::Child) => std::process::exit(child(self)),
            Ok(ForkResult::Parent { child }) => {
                master_signal_set().thread_unblock()?;
                Ok(child)
            }
            Err(e) => {
                master_signal_set().thread_unblock()?;
                Err(e.into())
            }
        }
    }

    /// In a child: the listening socket and the master's signal handlers are not its business
    /// (a child holding the socket would keep it open after the master closed it at a stop).
    fn leave_master(&mut self) {
        self.signals.leave();
        self.listener = None;
    }

    /// Stops accepting for a while, doubling up to a second, and says why.
    fn pause(&mut self, why: &str) {
        let pause = self.backoff.failed();
        eprintln!("{PATTERN}: {why}; pausing accepts for {pause:?}");
        self.paused_until = Some(Instant::now() + pause);
    }

    // ---- reaping -----------------------------------------------------------------------------

    /// Collects every child that has exited, so none stays a zombie, and frees its slot.
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
        let how = match (code, signal) {
            (Some(code), _) => format!("exited with {code}"),
            (_, Some(signal)) => format!("was killed by {signal}"),
            _ => "ended".into(),
        };
        if let Some(child) = self.children.remove(&pid) {
            shared::vacate(self.stats.worker(child.slot));
            self.free.insert(child.slot);
            // Exit 0: its connection closed. Anything else took only that connection down.
            if code != Some(0) {
                let lived = child.forked.elapsed();
                eprintln!(
                    "{PATTERN}: conn-{} (pid {pid}) {how} after {lived:.1?}; its connection is \
                     lost, the others are served on",
                    child.slot
                );
            }
        } else if self.jobs.pid == Some(pid) {
            self.jobs_exited(code, &how);
        }
    }

    fn jobs_exited(&mut self, code: Option<i32>, how: &str) {
        shared::vacate(self.stats.worker(JOBS_SLOT));
        self.jobs.pid = None;
        if self.stopping.is_some() {
            if code != Some(0) {
                eprintln!("{PATTERN}: the stopping jobs process {how}");
            }
            return;
        }
        let lived = self.jobs.forked.elapsed();
        let what = format!("{PATTERN}: the jobs process {how} after {lived:.1?}");
        if code == Some(EXIT_FATAL) {
            // It cannot start (or cannot make the journal durable any more): a server that
            // accepts jobs nobody runs is worse than none.
            eprintln!("{what}: exit code {EXIT_FATAL} means it cannot go on; stopping the server");
            self.exit_code = EXIT_FATAL;
            self.begin_stop();
            return;
        }
        let delay = if lived >= STABLE_AFTER {
            self.jobs.backoff = RESPAWN_MIN;
            Duration::ZERO
        } else {
            // Died young: probably dies at start-up; do not loop through forks.
            let delay = self.jobs.backoff;
            self.jobs.backoff = (delay * 2).min(RESPAWN_MAX);
            delay
        };
        eprintln!(
            "{what}; respawning it{}; its jobs are taken over when their lease runs out",
            match delay {
                Duration::ZERO => String::new(),
                d => format!(" in {d:?}"),
            }
        );
        self.jobs.respawn_at = Some(Instant::now() + delay);
    }

    fn respawn_jobs_if_due(&mut self) {
        let now = Instant::now();
        if self.jobs.respawn_at.is_some_and(|at| now >= at) {
            self.jobs.respawn_at = None;
            if let Err(e) = self.fork_jobs() {
                let delay = self.jobs.backoff;
                eprintln!("{PATTERN}: fork for the jobs process: {e}; retrying in {delay:?}");
                self.jobs.respawn_at = Some(now + delay);
                self.jobs.backoff = (delay * 2).min(RESPAWN_MAX);
            }
        }
    }

    /// How long the master may sleep: until the jobs process is due, accepting resumes, or
    /// stragglers are to be killed; a second at most.
    fn next_wake(&self) -> Duration {
        let now = Instant::now();
        let mut wake = now + Duration::from_secs(1);
        for at in [self.jobs.respawn_at, self.paused_until]
            .into_iter()
            .flatten()
        {
            wake = wake.min(at);
        }
        if let Some(since) = self.stopping
            && !self.killed
        {
            wake = wake.min(since + self.kill_after);
        }
        wake.saturating_duration_since(now)
    }

    // ---- stopping ----------------------------------------------------------------------------

    /// SIGTERM (or a first SIGINT): no new connections; every child finishes the request in
    /// flight and exits.
    fn begin_stop(&mut self) {
        eprintln!(
            "{PATTERN}: graceful stop: telling {} and the jobs process to finish and exit",
            children(self.children.len())
        );
        self.stopping = Some(Instant::now());
        // Only the master holds the socket: from now on connections are refused instead of
        // queueing for nobody.
        self.listener = None;
        self.jobs.respawn_at = None;
        // The children learn of it through the flag and their journal watchers, which this
        // wakes (in every process): the flag first, so that a watcher woken sees it.
        self.setup.stop.raise();
        self.setup.app.journal().wake_watchers();
    }

    /// SIGQUIT (or a second SIGINT): kill every child now, reap them, exit.
    fn stop_fast(&mut self) -> i32 {
        eprintln!(
            "{PATTERN}: fast stop: killing {} and the jobs process",
            children(self.children.len())
        );
        let pids = self.every_child();
        for &pid in &pids {
            let _ = kill(pid, Signal::SIGKILL);
        }
        for pid in pids {
            // SIGKILL cannot be caught or ignored, so this wait is short.
            while waitpid(pid, None) == Err(Errno::EINTR) {}
        }
        self.exit_code
    }

    /// The children still there `--shutdown-timeout` (and a grace) after the stop get SIGKILL.
    fn kill_stragglers(&mut self, since: Instant) {
        if self.killed || since.elapsed() < self.kill_after {
            return;
        }
        self.killed = true;
        let pids = self.every_child();
        eprintln!(
            "{PATTERN}: {} child process(es) still there {:?} after the stop; killing them",
            pids.len(),
            self.kill_after
        );
        for pid in pids {
            let _ = kill(pid, Signal::SIGKILL);
        }
    }

    /// The connection children and the jobs process, not yet reaped.
    fn every_child(&self) -> Vec<Pid> {
        let jobs = self.jobs.pid.iter();
        self.children.keys().chain(jobs).copied().collect()
    }
}

// ---- the master's signals --------------------------------------------------------------------

/// The master's signals ([`MASTER_SIGNALS`]), blocked across a fork: the new process unblocks
/// them once its own handlers are in place.
pub fn master_signal_set() -> SigSet {
    master_signals::signal_set(&MASTER_SIGNALS)
}

/// "1 connection child", "3 connection children".
fn children(n: usize) -> String {
    match n {
        1 => "1 connection child".into(),
        n => format!("{n} connection children"),
    }
}

fn pid_u32(pid: Pid) -> u32 {
    u32::try_from(pid.as_raw()).unwrap_or(0)
}
