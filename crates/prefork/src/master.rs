//! The master: it forks the workers, then sleeps until a signal or a deadline, reaps the
//! workers that exited, respawns them, and carries out rolling restarts and stops. It never
//! serves, and never has a second thread: `fork` copies only the calling thread.

use std::io;
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork};
use runtime::Stats;
use runtime::master_signals::{self, MasterSignals};

use crate::worker::{WorkerSetup, worker};
use crate::{EXIT_FATAL, PATTERN, shared};

/// A worker that lived this long died of something other than its start-up: respawn at once.
const STABLE_AFTER: Duration = Duration::from_secs(1);
/// The respawn delay of a worker that dies young: 100 ms, doubling to 10 s per slot.
const RESPAWN_MIN: Duration = Duration::from_millis(100);
const RESPAWN_MAX: Duration = Duration::from_secs(10);

/// The master SIGKILLs a worker this long after `--shutdown-timeout` if it is still there (the
/// workers enforce that timeout themselves; this is for one that hangs).
const KILL_GRACE: Duration = Duration::from_secs(1);

/// How long start-up waits for every worker to be ready before announcing anyway.
const READY_WAIT: Duration = Duration::from_secs(5);

/// The signals the master handles.
const MASTER_SIGNALS: [libc::c_int; 5] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGHUP,
    libc::SIGCHLD,
];

// ---- the master: sleep, reap, respawn --------------------------------------------------------

/// The master's state: the socket it keeps, its workers and their slots, and whether it is
/// restarting or stopping them.
pub struct Master {
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
    /// Takes over the listening socket and installs the master's signal handlers; forks
    /// nothing yet.
    pub fn new(
        listener: TcpListener,
        setup: WorkerSetup,
        stats: Arc<Stats>,
        shutdown_timeout: Duration,
    ) -> io::Result<Master> {
        let workers = stats.workers().len();
        Ok(Master {
            listener: Some(listener),
            signals: MasterSignals::install(&MASTER_SIGNALS)?,
            setup,
            stats,
            children: Vec::new(),
            slots: vec![Slot::default(); workers],
            restart: None,
            stopping: false,
            kill_after: shutdown_timeout + KILL_GRACE,
        })
    }

    /// Forks a worker into every slot and waits until they are ready.
    pub fn start(&mut self) -> io::Result<()> {
        for slot in 0..self.slots.len() {
            self.spawn(slot)?;
        }
        self.wait_ready();
        Ok(())
    }

    /// The master's whole life after start-up; returns its exit code.
    pub fn supervise(&mut self) -> i32 {
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
            self.signals.sleep(self.next_wake(), None);
        }
    }

    /// Start-up: waits (up to READY_WAIT) until every worker has set up its loop and claimed its
    /// slot, or died, so that the announce line means the workers are serving.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_WAIT;
        while Instant::now() < deadline && !self.children.iter().all(|c| self.is_ready(c.pid)) {
            self.signals.sleep(Duration::from_millis(5), None);
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
        self.stats.worker(slot).add_extra(shared::SPAWNS, 1);
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

/// The master's signals ([`MASTER_SIGNALS`]), blocked across a fork: the new process unblocks
/// them once its own handlers are in place.
pub fn master_signal_set() -> SigSet {
    master_signals::signal_set(&MASTER_SIGNALS)
}

/// fork(2) copies only the calling thread.
fn single_threaded() -> bool {
    std::fs::read_dir("/proc/self/task").map_or(true, |tasks| tasks.count() == 1)
}

fn pid_u32(pid: Pid) -> u32 {
    u32::try_from(pid.as_raw()).unwrap_or(0)
}
