//! The two kinds of child the master forks: a connection child (`conn-N`), which serves the one
//! connection it was forked for and exits when it closes, and the `jobs` process, which runs
//! every job the connection children accept.
//!
//! How a child learns of a graceful stop. Not by a signal: catching SIGTERM in a blocking
//! child takes a thread waiting for it (a signal handler may not take the locks that waking
//! the connection needs), and that thread was a sixth of the cost of every connection. Instead
//! the master raises a flag in memory every child shares and wakes every process's journal
//! watcher (`Journal::wake_watchers`), which each child has anyway for its held requests; the
//! watcher tells the app's hub, and the child's subscriber, on that thread, sees the flag and
//! stops. So a child keeps SIGTERM's default action, as a
//! PostgreSQL backend's SIGTERM ends its session at once (also what it gets if the master
//! dies), and ignores SIGINT and SIGQUIT, which Ctrl-C and Ctrl-\ send to the whole process
//! group: the master decides what they mean.

use std::io;
use std::net::TcpStream;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use nix::sys::signal::{SigHandler, Signal, signal};
use nix::unistd::{Pid, getppid};
use runtime::blocking::{Context, OpenConns, ThreadPark, serve};
use runtime::{App, JobRole, ServeConfig};

use crate::master::master_signal_set;
use crate::shared::{JOBS_SLOT, StopFlag};
use crate::{EXIT_FATAL, PATTERN};

/// What every child needs, prepared by the master before the first fork.
pub struct Setup {
    pub config: ServeConfig,
    pub app: App,
    pub master: Pid,
    /// Raised by the master when a graceful stop begins.
    pub stop: StopFlag,
    /// The journal's head when the master's view last caught up with it.
    pub caught_up: u64,
}

impl Setup {
    /// Brings the master's view of the journal (and its read index) up to the head, so that a
    /// child forked now inherits it instead of reading again every record appended since the
    /// master started: that was 2 ms per connection once 2000 messages had been posted.
    pub fn catch_up(&mut self) {
        let head = self.app.journal().head();
        if head != self.caught_up {
            self.caught_up = head;
            self.app.catch_up();
        }
    }
}

/// A connection child's life: serve `stream` until it closes; the exit code (0 once the
/// connection has closed, [`EXIT_FATAL`] if the child could not set itself up).
pub fn connection(slot: usize, stream: TcpStream, setup: &Setup, jobs: Pid) -> i32 {
    set_name(&format!("conn-{slot}"));
    if !supervised(setup.master) {
        return 0;
    }
    let stats = setup.app.stats().worker(slot);
    stats.bind_thread();
    run(&format!("conn-{slot}"), || {
        let app = &setup.app;
        // The journal watcher and the committer. No job workers: a job outlives the
        // connection that posted it, so it is handed to the jobs process.
        let jobs = u32::try_from(jobs.as_raw()).unwrap_or(0);
        app.start_with(JobRole::HandTo(jobs))?;
        // At the stop: wake the connection if it is parked in `read` between requests (a
        // request in progress is finished first, and one not sent yet keeps the shutdown
        // grace), and answer a held request with what there is now.
        let open = Arc::new(OpenConns::default());
        let _stop = on_stop(setup, {
            let (app, open) = (app.clone(), open.clone());
            move || {
                open.stop_reading();
                app.stop();
            }
        });
        own_signals()?;
        let park = ThreadPark::current();
        let cx = Context {
            config: &setup.config,
            app,
            stats,
            open: &open,
            park: &park,
        };
        serve(stream, &cx, |req| app.handle_inline(req));
        Ok(())
    })
}

/// The jobs process's life: run the jobs every connection child hands over (and take over the
/// jobs of an earlier run), until the stop; the exit code.
///
/// Its main thread only waits for the stop. Then it exits without waiting for a job in
/// progress: the job's lease runs out and the next run of the server runs it again (jobs run at
/// least once, as in every other pattern).
pub fn jobs(setup: &Setup) -> i32 {
    set_name("jobs");
    if !supervised(setup.master) {
        return 0;
    }
    run("jobs", || {
        setup.app.start_with(JobRole::Run)?;
        let main = std::thread::current();
        let _stop = on_stop(setup, move || main.unpark());
        own_signals()?;
        // Ready: the master waits for this before it announces the server (see
        // `Master::start`), so no job can be handed over before the job workers listen.
        setup.app.stats().worker(JOBS_SLOT).bind_thread();
        // A stray unpark (another hub notification) only makes it look again.
        while !setup.stop.is_raised() {
            std::thread::park();
        }
        setup.app.stop();
        Ok(())
    })
}

/// Calls `stop` (on the journal watcher's thread) once the master has raised the stop flag.
/// Call it after `App::start_with` has started the watcher: then, whenever the flag is raised,
/// either it is raised already here, or the watcher notifies the hub after the master's
/// wake-up, which comes after the flag. The subscription lasts as long as the returned value.
fn on_stop(setup: &Setup, stop: impl Fn() + Send + Sync + 'static) -> impl Sized {
    let flag = setup.stop;
    let check = move || {
        if flag.is_raised() {
            stop();
        }
    };
    check();
    setup.app.hub().subscribe(check)
}

/// The child's own signal dispositions (see the top of this file), then the signals the
/// master blocked across the fork are unblocked: one that arrived meanwhile is handled now.
fn own_signals() -> io::Result<()> {
    let dispositions = [
        (Signal::SIGTERM, SigHandler::SigDfl),
        (Signal::SIGCHLD, SigHandler::SigDfl),
        (Signal::SIGINT, SigHandler::SigIgn),
        (Signal::SIGQUIT, SigHandler::SigIgn),
    ];
    for (sig, handler) in dispositions {
        // SAFETY: the default action or ignoring installs no handler code, so nothing runs in
        // signal context; the master's handlers (signal-hook's) were unregistered already.
        unsafe { signal(sig, handler) }?;
    }
    master_signal_set().thread_unblock()?;
    Ok(())
}

/// Runs a child's life; its exit code. A panic never unwinds out of here: above this frame
/// are the master's, which the child must not run.
fn run(name: &str, life: impl FnOnce() -> io::Result<()>) -> i32 {
    match std::panic::catch_unwind(AssertUnwindSafe(life)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            eprintln!("{PATTERN}: {name}: cannot start: {e}");
            EXIT_FATAL
        }
        // The panic hook has printed the message.
        Err(_) => 101,
    }
}

/// Whether the master is still there: if it dies, the child gets SIGTERM and ends (a
/// PostgreSQL backend, too, ends when the postmaster dies); if it died before that was set up,
/// the child is now some other process's and exits at once.
fn supervised(master: Pid) -> bool {
    nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).is_ok() && getppid() == master
}

/// The process's name, as `ps` and `top` show it.
fn set_name(name: &str) {
    if let Ok(name) = std::ffi::CString::new(name) {
        let _ = nix::sys::prctl::set_name(&name);
    }
}
