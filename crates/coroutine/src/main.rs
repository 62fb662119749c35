//! # coroutine: a goroutine per connection, with may
//!
//! Every connection gets a stackful coroutine that serves it with plain blocking `read` and
//! `write` calls: the very driver thread-per-connection runs. Underneath, may runs the
//! coroutines M:N on `--workers` carrier threads. A read that would block saves the coroutine's
//! registers, leaves the socket in its worker's epoll set and runs the next coroutine; when the
//! socket becomes readable the coroutine is queued again and resumes inside its `read` call, as
//! if it had blocked. Go (goroutines on GOMAXPROCS threads over the netpoller), Java's virtual
//! threads and may_minihttp serve this way.
//!
//! ```text
//!   main thread: waits for SIGTERM/SIGINT; then shuts the listener and the connections' read
//!                sides, and waits for the open connections (--shutdown-timeout)
//!
//!   clients ──TCP──▶ listen socket ◀── accept ── [acceptor coroutine]: loop { accept; go!(serve) }
//!                                                        │ go! onto the socket's home worker
//!   ┌─ may-worker-0 ──────────────────────────┐   ┌─ may-worker-1 ──────────────────────────┐
//!   │ epoll: sockets with fd % workers == 0   │   │ epoll: sockets with fd % workers == 1   │
//!   │ run queue: [conn 8] [conn 10] ...  ◀────┼───┼─ an idle worker steals queued coroutines│
//!   │ runs one coroutine until it would block │   │ ...                                     │
//!   └─────────────────────────────────────────┘   └─────────────────────────────────────────┘
//!   each conn coroutine (own 256 KiB stack): loop { read ▸ parse ▸ handler ▸ write }
//! ```
//!
//! Trade-offs: the code of thread-per-connection at close to the cost of an event loop: a
//! coroutine switch is a few registers, an idle connection costs a stack of memory and no
//! thread, and workers steal queued coroutines from each other. But the scheduling is
//! cooperative: a coroutine keeps its carrier thread until it does may I/O. A `/work` request
//! holds its worker for the whole computation, and **`/block` blocks the carrier thread**:
//! `std::thread::sleep` (like any blocking call that is not may's: a file read, a database
//! driver, a mutex held elsewhere) parks the OS thread itself. That is may's known caveat; Go's
//! runtime hands a thread's other goroutines to a new thread during a blocking syscall, may
//! does not. What waits is more than the worker's run queue: only the home worker polls its
//! epoll, so every socket homed there (fd % workers) goes unserved, and stealing cannot help.
//! With `--workers 1`, a `GET /block?ms=300` delays every other connection by 300 ms (a test
//! shows it); with 2 workers, about half of them.
//!
//! Stacks have a fixed size and cannot grow: an overflow runs into a guard page, a segfault.
//! may's default is 32 KiB; this server gives each coroutine 256 KiB (see [`STACK_SIZE`]).
//!
//! `/stats`: one slot per may worker. A connection counts in the slot of its home worker (the
//! one whose epoll watches its socket: fd % workers, and the one whose run queue its coroutine
//! joins when the socket is ready). An idle worker may steal it for a while; the counts stay
//! with the home worker. A slot's context switches are those of its worker thread.
//!
//! Run: `cargo run --release -p coroutine -- --addr 127.0.0.1:8080 [--workers 2] [--pin]`

use std::ffi::CString;
use std::io::{self, Read, Write};
use std::net::Shutdown as Direction;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use may::coroutine::Builder;
use may::net::{TcpListener, TcpStream};
use may::sync::Blocker;
use may::sync::Semphore;
use runtime::blocking::{BlockingStream, Context, OpenConns, Park, serve};
use runtime::listener::{AcceptBackoff, is_out_of_resources};
use runtime::shutdown::STOP_SIGNALS;
use runtime::{App, ServeConfig, ServerArgs, Stats};
use signal_hook::iterator::Signals;

const PATTERN: &str = "coroutine";

/// Each coroutine's stack, fixed at creation: it cannot grow, and running past it hits a guard
/// page, a segfault. The deepest paths here (a 1 MiB echo, a 431 for a 20 KB header, `/stats`,
/// `/work`) use about 14 KiB in a debug build and 7 KiB in release (measured with may's
/// footprint mode, an odd stack size). may's default of 32 KiB would leave twice that, for any
/// handler anyone adds and for a signal frame, which lands on whatever stack is running. 256 KiB
/// costs address space, not memory: only the pages a coroutine touches are ever backed.
const STACK_SIZE: usize = 256 * 1024;

#[derive(Parser, Debug)]
#[command(name = PATTERN, about = "A stackful coroutine per connection on may's M:N worker threads (Go-style).")]
struct Args {
    #[command(flatten)]
    server: ServerArgs,

    /// Pin each may worker thread to its own core (may pins by default; here only if asked).
    #[arg(long)]
    pin: bool,
}

fn main() -> io::Result<()> {
    let args: Args = runtime::cli::parse();
    let workers = args.server.workers();
    // may reads its configuration once, when its scheduler starts on first use.
    may::config()
        .set_workers(workers)
        .set_stack_size(STACK_SIZE / size_of::<usize>()); // in words, not bytes
    may::config().set_worker_pin(args.pin);

    let stats = Arc::new(Stats::new(PATTERN, workers));
    let listener = runtime::listener::bind(&args.server, false)?;
    let addr = listener.local_addr()?;
    // SAFETY: the descriptor is the open listening socket `bind` just made; ownership passes to
    // may's listener (which registers it with a worker's epoll), and nothing else closes it.
    // (may offers no fallible conversion: if epoll refused the socket, this would panic, at
    // start-up.) may's own `bind` would ignore --backlog, --rcvbuf and the rest.
    let listener = unsafe { TcpListener::from_raw_fd(listener.into_raw_fd()) };
    name_workers(&stats, workers);
    // Before the start-up line, so that a signal sent as soon as it appears is not lost.
    let mut signals = Signals::new(STOP_SIGNALS)?;

    let server = Arc::new(Server {
        app: runtime::open_app(PATTERN, &args.server, stats.clone()),
        config: ServeConfig::new(PATTERN, &args.server),
        stats,
        listener,
        open: OpenConns::default(),
        slots: Semphore::new(args.server.max_conns),
        live: AtomicUsize::new(0),
        stopping: AtomicBool::new(false),
    });
    let accepting = server.clone();
    // SAFETY: may's spawn is unsafe for two things the compiler cannot check. A coroutine's
    // stack is fixed: running past it is a segfault. Thread-locals belong to the carrier
    // thread: one set before a may call (which may park the coroutine and resume it on another
    // worker, or run others on this one) may be gone or another's after it. Neither happens
    // here: the acceptor's deepest calls (accept, an eprintln, the next spawn) need a few KiB of
    // STACK_SIZE's 256; neither this crate, runtime nor proto declares a thread-local, and what
    // std and libc keep per thread (errno, the panic count) is set and read within one call.
    // Its waits (accept, the --max-conns semaphore, the EMFILE pause) are may's: they park the
    // coroutine, never the carrier thread.
    let acceptor = may::go!(Builder::new().name("acceptor".into()), move || {
        accepting.accept_loop()
    })?;
    runtime::announce(PATTERN, addr, workers);

    // The main thread is no may worker: it sleeps here until SIGTERM or SIGINT. signal-hook's
    // handler only writes to a pipe; it runs on whichever thread the kernel picks, a may worker
    // too (on the stack of the coroutine running there), whose epoll_wait then returns EINTR
    // and is simply called again.
    let _ = signals.forever().next();
    server.shut_down(acceptor);
    Ok(())
}

/// What every connection coroutine shares.
struct Server {
    app: App,
    config: ServeConfig,
    stats: Arc<Stats>,
    listener: TcpListener,
    open: OpenConns,
    /// `--max-conns` permits: the acceptor takes one per connection, the connection returns it.
    slots: Semphore,
    /// Connection coroutines spawned and not finished.
    live: AtomicUsize,
    stopping: AtomicBool,
}

impl Server {
    /// Go's `for { conn := l.Accept(); go serve(conn) }`. Each `accept` that finds no connection
    /// parks this coroutine until the listener is readable; its worker runs others meanwhile.
    fn accept_loop(self: Arc<Self>) {
        let mut backoff = AcceptBackoff::default();
        loop {
            // At --max-conns, new connections wait in the backlog until one closes.
            self.slots.wait();
            let stream = loop {
                match self.listener.accept() {
                    Ok((stream, _)) => break stream,
                    // Shutdown shut the listener down, which woke this accept.
                    Err(_) if self.stopping.load(Ordering::SeqCst) => return,
                    // EMFILE and the like: the connection stays queued and retrying now would
                    // spin. The sleep parks this coroutine only, not its worker.
                    Err(e) if is_out_of_resources(&e) => {
                        let pause = backoff.failed();
                        eprintln!("{PATTERN}: accept: {e}; pausing accepts for {pause:?}");
                        may::coroutine::sleep(pause);
                    }
                    // The peer gave up while queued (ECONNABORTED) and the like.
                    Err(_) => {}
                }
            };
            backoff.succeeded();
            self.spawn_connection(stream);
        }
    }

    /// One coroutine for the connection, queued to the worker whose epoll watches its socket,
    /// so that it starts where it will be woken.
    fn spawn_connection(self: &Arc<Self>, stream: TcpStream) {
        let home = home_worker(stream.as_raw_fd(), self.stats.workers().len());
        self.live.fetch_add(1, Ordering::SeqCst);
        let server = self.clone();
        // SAFETY: as for the acceptor (see main): the deepest path of `serve` and the handler
        // (a 1 MiB echo, a 431, `/stats`, `/work`) was measured at 14 KiB of stack in a debug
        // build, far inside STACK_SIZE; nothing thread-scoped lives across a may call (the
        // driver's state is in its frame, the counters in `stats`, and `/work` reads its
        // thread's CPU clock with no may call in between). The locks on the way (OpenConns'
        // std mutex; the app's view mutex and the journal's append lock, held over a pread or
        // pwrite of the journal file) are held with no may call inside, so no coroutine parks
        // holding one, and one that waits for another carrier's holder waits microseconds. A
        // held request parks the coroutine in may's own Blocker, never the carrier thread.
        // `/block` and `/work` hold the carrier thread on purpose: the caveat this server
        // shows, a delay for the other coroutines, not a fault.
        let spawned = may::go!(Builder::new().id(home), move || {
            let cx = Context {
                config: &server.config,
                app: &server.app,
                stats: server.stats.worker(home),
                open: &server.open,
                park: &MayPark(Arc::new(Blocker::new(false))),
            };
            serve(MayStream(stream), &cx, |req| server.app.handle_inline(req));
            server.slots.post();
            server.live.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            eprintln!("{PATTERN}: cannot start a coroutine: {e}");
            self.slots.post();
            self.live.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Stop accepting (new connections are refused), let every connection finish the request
    /// in flight, and return when all are closed or after `--shutdown-timeout`.
    fn shut_down(&self, acceptor: may::coroutine::JoinHandle<()>) {
        self.stopping.store(true, Ordering::SeqCst);
        // A listening socket shut down for reading stops listening and wakes its accept, like
        // closing it would (Go's Shutdown closes its listeners) but without freeing the
        // descriptor under the acceptor's feet.
        let _ = socket2::SockRef::from(self.listener.inner()).shutdown(Direction::Read);
        self.slots.post(); // in case the acceptor waits at --max-conns
        let _ = acceptor.join();

        self.open.stop_reading();
        // Coroutines held by long polls and streams answer with what they have now.
        self.app.stop();
        let deadline = Instant::now() + self.config.shutdown_timeout;
        while self.live.load(Ordering::SeqCst) > 0 {
            if Instant::now() >= deadline {
                eprintln!(
                    "{PATTERN}: {} connections still open after the shutdown timeout",
                    self.live.load(Ordering::SeqCst)
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// may's `TcpStream` for the shared blocking driver (a newtype: neither the trait nor the type
/// is this crate's). Its `read` and `write` park the coroutine, not the thread, and its
/// timeouts are may timers that wake the coroutine with `TimedOut`, as the driver expects.
struct MayStream(TcpStream);

impl Read for MayStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for MayStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl AsRawFd for MayStream {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl BlockingStream for MayStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.0.set_read_timeout(timeout)
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.0.set_write_timeout(timeout)
    }

    fn shutdown(&self, how: Direction) -> io::Result<()> {
        self.0.shutdown(how)
    }
}

/// may's parking for the shared blocking driver: a held request parks its coroutine (its worker
/// runs others meanwhile), where std's would park the carrier thread and every coroutine on it.
struct MayPark(Arc<Blocker>);

impl Park for MayPark {
    fn park(&self, timeout: Option<Duration>) {
        // A cancel or a timeout both end the wait; the driver polls again either way.
        let _ = self.0.park(timeout);
    }

    fn unparker(&self) -> Box<dyn Fn() + Send + Sync> {
        let blocker = self.0.clone();
        Box::new(move || blocker.unpark())
    }
}

/// may registers a socket with worker `fd % workers`'s epoll, and queues the socket's coroutine
/// on that worker whenever the socket is ready.
fn home_worker(fd: RawFd, workers: usize) -> usize {
    fd as usize % workers
}

/// may starts its worker threads unnamed. Runs one short coroutine on each worker that names
/// its thread `may-worker-N` (for `ps -T`) and binds stats slot N to it (for `/stats`).
fn name_workers(stats: &Arc<Stats>, workers: usize) {
    // A coroutine queued to worker N could, rarely, be stolen by another idle worker before N
    // runs it: then two slots name the same thread, and we try again.
    for _ in 0..5 {
        let tids: Vec<u32> = (0..workers)
            .map(|id| {
                let stats = stats.clone();
                // SAFETY: as for the acceptor (see main): a few calls deep, and thread-scoped on
                // purpose without a may call in between: it records and names the thread it
                // runs on, which is all this coroutine is for (and stealing is checked below).
                may::go!(Builder::new().id(id), move || {
                    stats.worker(id).bind_thread();
                    if let Ok(name) = CString::new(format!("may-worker-{id}")) {
                        let _ = nix::sys::prctl::set_name(&name);
                    }
                    stats.worker(id).tid.load(Ordering::Relaxed)
                })
            })
            .filter_map(|spawned| spawned.ok()?.join().ok())
            .collect();
        let mut distinct = tids.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() == workers {
            return;
        }
    }
}
