//! The two kinds of child the master forks: a connection child (`conn-N`), which serves the one
//! connection it was forked for and exits when it closes, and the `jobs` process, which runs
//! every job the connection children accept. Each starts with the master's signals blocked
//! (see `Master::fork`), sets up its own handling of SIGTERM/SIGINT, and only then unblocks
//! them, so a stop sent at any moment is neither lost nor handled by the master's handlers.

use std::io;
use std::net::TcpStream;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use nix::sys::signal::Signal;
use nix::unistd::{Pid, getppid};
use runtime::blocking::{Context, OpenConns, ThreadPark, serve};
use runtime::shutdown::STOP_SIGNALS;
use runtime::{App, JobRole, Routable, ServeConfig};
use signal_hook::iterator::Signals;

use crate::master::master_signal_set;
use crate::shared::JOBS_SLOT;
use crate::{EXIT_FATAL, PATTERN};

/// What every child needs, prepared by the master before the first fork.
pub struct Setup {
    pub config: ServeConfig,
    pub app: App,
    pub master: Pid,
    /// The journal's head when the master's view last caught up with it.
    pub caught_up: u64,
}

impl Setup {
    /// Brings the master's view of the journal (and its read index) up to the head, so that a
    /// child forked now inherits it instead of reading again every record appended since the
    /// master started: that was 2 ms per connection once 2000 messages had been posted. The
    /// app has no call that only catches up; every read of the journal does, and the cheapest
    /// is a look for a job that cannot exist (ids are seqs, from 1).
    pub fn catch_up(&mut self) {
        let head = self.app.journal().head();
        if head != self.caught_up {
            self.caught_up = head;
            let _ = self.app.route(&NoSuchJob);
        }
    }
}

/// `GET /jobs/0`.
struct NoSuchJob;

impl Routable for NoSuchJob {
    fn method(&self) -> &str {
        "GET"
    }
    fn path(&self) -> &str {
        "/jobs/0"
    }
    fn query_param(&self, _: &str) -> Option<&str> {
        None
    }
    fn header(&self, _: &str) -> Option<&[u8]> {
        None
    }
    fn body(&self) -> &[u8] {
        &[]
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
        // The journal watcher and the committer, started while the master's signals are still
        // blocked, so that they never receive them. No job workers: a job outlives the
        // connection that posted it, so it is handed to the jobs process.
        let jobs = u32::try_from(jobs.as_raw()).unwrap_or(0);
        app.start_with(JobRole::HandTo(jobs))?;
        let open = Arc::new(OpenConns::default());
        on_stop_signal(app, &open)?;
        master_signal_set().thread_unblock()?;
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
/// jobs of an earlier run), until told to stop; the exit code.
///
/// Its main thread only waits for SIGTERM/SIGINT. At the stop it exits without waiting for a
/// job in progress: the job's lease runs out and the next run of the server runs it again
/// (jobs run at least once, as in every other pattern).
pub fn jobs(setup: &Setup) -> i32 {
    set_name("jobs");
    if !supervised(setup.master) {
        return 0;
    }
    run("jobs", || {
        let mut signals = Signals::new(STOP_SIGNALS)?;
        setup.app.start_with(JobRole::Run)?;
        master_signal_set().thread_unblock()?;
        // Ready: the master waits for this before it announces the server (see
        // `Master::start`), so no job can be handed over before the job workers listen.
        setup.app.stats().worker(JOBS_SLOT).bind_thread();
        if signals.forever().next().is_some() {
            setup.app.stop();
        }
        Ok(())
    })
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

/// At SIGTERM/SIGINT a thread wakes the connection if it is parked in `read` between
/// requests (a request in progress is finished first, and one not sent yet keeps the shutdown
/// grace), and the app answers a held request with what it has now. The thread is spawned
/// while the master's signals are blocked, so they always reach the main thread, whose
/// handler only writes to the pipe this thread reads.
fn on_stop_signal(app: &App, open: &Arc<OpenConns>) -> io::Result<()> {
    let mut signals = Signals::new(STOP_SIGNALS)?;
    let (app, open) = (app.clone(), open.clone());
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                open.stop_reading();
                app.stop();
            }
        })?;
    Ok(())
}

/// Whether the master is still there: if it dies, the child gets SIGTERM (it finishes its
/// connection rather than serve on unsupervised); if it died before that was set up, the child
/// is now some other process's and exits at once.
fn supervised(master: Pid) -> bool {
    nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).is_ok() && getppid() == master
}

/// The process's name, as `ps` and `top` show it.
fn set_name(name: &str) {
    if let Ok(name) = std::ffi::CString::new(name) {
        let _ = nix::sys::prctl::set_name(&name);
    }
}
