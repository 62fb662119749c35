//! A worker process: it inherits the listening socket and the shared counters from the
//! master, drops the master's signal handlers for its own, and serves until told to stop, in
//! one of two modes: an epoll loop (nginx) or one connection at a time (Apache prefork).

use std::io;
use std::net::TcpListener;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::{Pid, getppid};
use runtime::blocking::{Context, OpenConns, ThreadPark, serve};
use runtime::listener::{AcceptBackoff, is_out_of_resources};
use runtime::shutdown::STOP_SIGNALS;
use runtime::{App, EventLoop, Inline, ServeConfig, Shutdown, WorkerStats};

use crate::master::master_signal_set;
use crate::{EXIT_FATAL, Mode, PATTERN};

/// How long a blocking worker waits in accept(2) before looking at its stop flag.
const ACCEPT_TICK: Duration = Duration::from_millis(100);

/// What a worker needs, prepared by the master before forking.
pub struct WorkerSetup {
    mode: Mode,
    config: ServeConfig,
    app: App,
    /// The tests' start-up failure, from [`TEST_FAIL_START`].
    fail_start: Option<(usize, StartFailure)>,
    master: Pid,
}

impl WorkerSetup {
    /// In the master, before the first fork.
    pub fn new(mode: Mode, config: ServeConfig, app: App) -> io::Result<WorkerSetup> {
        Ok(WorkerSetup {
            mode,
            config,
            app,
            fail_start: test_fail_start()?,
            master: Pid::this(),
        })
    }
}

/// Why a worker stopped serving before it was told to.
enum WorkerError {
    /// It could not set itself up: exits with EXIT_FATAL.
    Start(io::Error),
    /// It failed while serving: exits 1, and is respawned.
    Serve(io::Error),
}

/// A worker process's life: serve the inherited socket until told to stop; the exit code.
pub fn worker(slot: usize, listener: TcpListener, setup: &WorkerSetup) -> i32 {
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
                panic!("{TEST_FAIL_START}: worker {slot} panics at start-up")
            }
            Some((s, StartFailure::Fatal)) if s == slot => {
                let e = io::Error::other(format!("{TEST_FAIL_START} asked for a fatal start-up"));
                return Err(WorkerError::Start(e));
            }
            _ => {}
        }
        // The app's threads (journal watcher, committer, job workers), started while the
        // master's signals are still blocked, so that they never receive them.
        setup.app.start().map_err(WorkerError::Start)?;
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
        EventLoop::new(setup.config.clone(), &setup.app, stats, Shutdown::new()).map_err(start)?;
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
        let (open, stop, app) = (open.clone(), stop.clone(), setup.app.clone());
        // Spawned while signals are blocked, so they are always delivered to the main thread.
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if signals.forever().next().is_some() {
                    stop.store(true, Ordering::SeqCst);
                    open.stop_reading();
                    // A held request answers with what it has now.
                    app.stop();
                }
            })
            .map_err(WorkerError::Start)?;
    }
    master_signal_set()
        .thread_unblock()
        .map_err(|e| WorkerError::Start(e.into()))?;
    stats.bind_thread();
    let app = &setup.app;
    let park = ThreadPark::current();
    let cx = Context {
        config: &setup.config,
        app,
        stats,
        open: &open,
        park: &park,
    };
    let mut backoff = AcceptBackoff::default();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            // Accepted during the tick after the stop, too: like every connection that has sent
            // nothing yet at shutdown, it has the shutdown grace to send its first request.
            Ok((stream, _)) => {
                backoff.succeeded();
                serve(stream, &cx, |req| app.handle_inline(req));
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

/// Blocking mode: accept(2) sleeps in the kernel, which wakes one sleeper per connection (no
/// herd), and gives up after ACCEPT_TICK so the worker can look at its stop flag. Both settings
/// belong to the socket, shared by every process, so the master makes them once.
pub fn accept_blocking_with_tick(listener: &TcpListener) -> io::Result<()> {
    listener.set_nonblocking(false)?;
    socket2::SockRef::from(listener).set_read_timeout(Some(ACCEPT_TICK))
}

// ---- the tests' hook -------------------------------------------------------------------------

/// For the tests of respawning (`crates/prefork/tests/supervision.rs`): `SLOT` makes every
/// worker forked into slot SLOT panic as it starts; `SLOT:fatal` makes it exit with
/// [`EXIT_FATAL`] instead. An environment variable rather than a flag, so that `--help` lists
/// only what is the user's.
const TEST_FAIL_START: &str = "PREFORK_TEST_FAIL_START";

#[derive(Clone, Copy, Debug)]
enum StartFailure {
    Panic,
    Fatal,
}

/// [`TEST_FAIL_START`], read once, by the master: a malformed value stops it at start-up.
fn test_fail_start() -> io::Result<Option<(usize, StartFailure)>> {
    let Some(value) = std::env::var_os(TEST_FAIL_START) else {
        return Ok(None);
    };
    let value = value.to_string_lossy();
    let (slot, how) = match value.split_once(':') {
        Some((slot, "fatal")) => (slot, StartFailure::Fatal),
        // With any other suffix the whole fails to parse as a slot, below.
        _ => (value.as_ref(), StartFailure::Panic),
    };
    match slot.parse() {
        Ok(slot) => Ok(Some((slot, how))),
        Err(_) => Err(io::Error::other(format!(
            "{TEST_FAIL_START}={value:?}: expected SLOT or SLOT:fatal"
        ))),
    }
}
