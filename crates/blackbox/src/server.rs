//! Starting a server binary, finding its address, signalling it and measuring it.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long a server may take to print its `listening on` line.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// What the startup line must contain, followed by the address and a space.
const LISTENING: &str = "listening on http://";

/// A running server process, killed (SIGKILL, with its process group) and reaped on drop.
///
/// When dropped while the thread is panicking (a failed check), it prints everything the
/// server wrote on stderr, so each failure shows the server's side of the story too.
pub struct Server {
    child: Child,
    /// The journal directory made for this server (removed on drop), unless the test gave one.
    own_data_dir: Option<PathBuf>,
    addr: SocketAddr,
    startup_line: String,
    stderr: Arc<Mutex<String>>,
    exit: Option<ExitStatus>,
}

impl Server {
    /// Starts `bin --addr 127.0.0.1:0 ARGS...` (`--addr` and `--data-dir` are added unless ARGS
    /// has them), waits for its startup line on stderr and for a TCP connect to its address to
    /// succeed.
    ///
    /// The readiness probe only opens and closes one TCP connection (see
    /// [`Server::PROBE_CONNECTIONS`]); it sends no request, so request counts stay exact.
    #[track_caller]
    pub fn start(bin: &str, args: &[&str]) -> Server {
        Server::spawn(bin, args, None)
    }

    /// Like [`Server::start`], with `RLIMIT_NOFILE` set to `limit` (soft and hard) in the server.
    #[track_caller]
    pub fn start_with_nofile(bin: &str, args: &[&str], limit: u64) -> Server {
        Server::spawn(bin, args, Some(limit))
    }

    /// How many TCP connections [`Server::start`] opened to check readiness; the server counts
    /// them as accepted.
    pub const PROBE_CONNECTIONS: u64 = 1;

    #[track_caller]
    fn spawn(bin: &str, args: &[&str], nofile: Option<u64>) -> Server {
        let mut command = Command::new(bin);
        // Port 0 unless the test names an address (e.g. to restart a server on its port).
        if !args.contains(&"--addr") {
            command.arg("--addr").arg("127.0.0.1:0");
        }
        // Every server gets a journal directory of its own (two servers cannot share one),
        // unless the test names one, e.g. to restart a server on the same journal.
        let own_data_dir = (!args.contains(&"--data-dir")).then(fresh_data_dir);
        if let Some(dir) = &own_data_dir {
            command.arg("--data-dir").arg(dir);
        }
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group, so that drop can kill any worker processes it forked.
            .process_group(0);
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls (prctl, setrlimit) on plain values it owns.
        unsafe {
            command.pre_exec(move || {
                // If the test thread that started the server dies, take the server with it.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(limit) = nofile {
                    let rlim = libc::rlimit {
                        rlim_cur: limit as _,
                        rlim_max: limit as _,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => panic!("cannot start server {bin:?}: {e}"),
        };

        // Drain stderr for the whole life of the process, keeping the text; until the startup
        // line is found, also pass each line to this thread.
        let stderr = Arc::new(Mutex::new(String::new()));
        let (lines_tx, lines_rx) = mpsc::channel::<String>();
        let pipe = child.stderr.take().expect("stderr is piped");
        let text = Arc::clone(&stderr);
        thread::Builder::new()
            .name("server-stderr".into())
            .spawn(move || {
                let mut pipe = BufReader::new(pipe);
                let mut line = Vec::new();
                while matches!(pipe.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                    let decoded = String::from_utf8_lossy(&line).into_owned();
                    text.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_str(&decoded);
                    let _ = lines_tx.send(decoded);
                    line.clear();
                }
            })
            .expect("spawn the stderr reader thread");

        let mut server = Server {
            child,
            own_data_dir,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            startup_line: String::new(),
            stderr,
            exit: None,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines_rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = parse_listening(&line) {
                        server.addr = addr;
                        server.startup_line = line.trim_end().to_string();
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => server.fail_start(bin, args, "timed out"),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = server.wait_exit(Duration::from_secs(2));
                    server.fail_start(bin, args, &format!("stderr closed; exit status {status:?}"))
                }
            }
        }
        server.wait_connectable(deadline, bin, args);
        server
    }

    /// Waits until a TCP connection to the server succeeds, then closes it.
    fn wait_connectable(&mut self, deadline: Instant, bin: &str, args: &[&str]) {
        loop {
            match TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)) {
                Ok(_) => return,
                Err(e) if Instant::now() >= deadline => {
                    self.fail_start(bin, args, &format!("connect to {} failed: {e}", self.addr))
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    #[track_caller]
    fn fail_start(&mut self, bin: &str, args: &[&str], why: &str) -> ! {
        let text = self.stderr_text();
        // Do not print stderr again from drop.
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        panic!(
            "server {bin} {args:?} did not start ({why}): expected a stderr line containing \
             `{LISTENING}ADDR `; its stderr so far:\n{text}"
        );
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The data directory this harness made for the server (`None` if the test gave one).
    pub fn data_dir(&self) -> Option<&std::path::Path> {
        self.own_data_dir.as_deref()
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The stderr line that announced the address (e.g. `single-thread listening on ...`).
    pub fn startup_line(&self) -> &str {
        &self.startup_line
    }

    /// Everything the server has written on stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sends signal `sig` (e.g. `libc::SIGTERM`) to the server process.
    #[track_caller]
    /// SIGKILLs the server and every process it forked (its process group) at once, as a crash
    /// or a power cut would stop them, and reaps it.
    pub fn kill_all(&mut self) {
        // SAFETY: kill has no memory-safety preconditions; the negative pid names the process
        // group this server leads (spawned with process_group(0)).
        unsafe { libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL) };
        if let Ok(status) = self.child.wait() {
            self.exit = Some(status);
        }
        // The leader's exit is not the group's: a child killed with it may still be dying
        // (and holding what it held, e.g. the data directory's lock) for a moment.
        let group = self.child.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        while group_alive(group) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn signal(&self, sig: i32) {
        assert!(
            self.exit.is_none(),
            "signal {sig} to a server that already exited"
        );
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child, so it
        // cannot have been reused by another process.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(
            rc,
            0,
            "kill({}, {sig}): {}",
            self.pid(),
            std::io::Error::last_os_error()
        );
    }

    /// Waits up to `timeout` for the server to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.exit.is_some() {
                return self.exit;
            }
            match self.child.try_wait() {
                Ok(Some(status)) => self.exit = Some(status),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                Ok(None) => return None,
                Err(e) => panic!("waiting for the server: {e}"),
            }
        }
    }

    /// CPU time (user + system, in seconds) used so far by the server process (all its threads,
    /// as `/proc/PID/stat` reports) plus its live child processes, e.g. prefork workers.
    pub fn cpu_time(&self) -> f64 {
        let pid = self.pid();
        let mut ticks = proc_stat(pid).map_or(0, |s| s.ticks);
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Some(other) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                else {
                    continue;
                };
                if let Some(stat) = proc_stat(other).filter(|s| s.ppid == pid) {
                    ticks += stat.ticks;
                }
            }
        }
        // SAFETY: sysconf has no memory-safety preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions. The negative pid names the process
        // group this server leads (spawned with process_group(0)), which holds only the server
        // and what it forked.
        unsafe {
            libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL);
        }
        if self.exit.is_none() {
            let _ = self.child.kill();
            if let Ok(status) = self.child.wait() {
                self.exit = Some(status);
            }
        }
        if let Some(dir) = &self.own_data_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        if thread::panicking() {
            // Let the stderr reader catch up with the last lines.
            thread::sleep(Duration::from_millis(50));
            let text = self.stderr_text();
            if !text.is_empty() {
                let exit = self.exit.map(describe_exit).unwrap_or_default();
                eprintln!(
                    "--- server {} stderr ({exit}) ---\n{text}--- end ---",
                    self.pid()
                );
            }
        }
    }
}

/// A directory name no other server of this test run uses (the directory does not exist yet).
pub fn fresh_data_dir() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("blackbox-{}-{n}", std::process::id()))
}

/// `exited with 0`, `killed by signal 9`, ...
pub fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => format!("{status:?}"),
    }
}

/// The address in a line containing `listening on http://ADDR ` (or ending with ADDR).
fn parse_listening(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(LISTENING)? + LISTENING.len()..];
    let addr = rest.split_whitespace().next()?;
    addr.trim_end_matches('/').parse().ok()
}

struct ProcStat {
    ppid: u32,
    ticks: u64,
}

/// The parent pid and utime + stime (clock ticks) of process `pid`.
fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: split after it.
    let fields: Vec<&str> = text[text.rfind(')')? + 1..].split_whitespace().collect();
    // fields[0] is field 3 (state); ppid is field 4, utime 14, stime 15.
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(ProcStat {
        ppid,
        ticks: utime + stime,
    })
}

/// Whether any process of process group `pgid` is alive (not a zombie).
fn group_alive(pgid: u32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            return false;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        // After the command's closing parenthesis: state, ppid, pgrp.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
        fields.len() > 2 && fields[2] == pgid.to_string() && fields[0] != "Z" && fields[0] != "X"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_startup_line() {
        let line = "single-thread listening on http://127.0.0.1:43567 (workers: 1, pid: 1234)\n";
        assert_eq!(
            parse_listening(line),
            Some("127.0.0.1:43567".parse().unwrap())
        );
        assert_eq!(
            parse_listening("x listening on http://[::1]:80"),
            Some("[::1]:80".parse().unwrap())
        );
        assert_eq!(parse_listening("starting up"), None);
    }

    #[test]
    fn reads_own_cpu_time() {
        let stat = proc_stat(std::process::id()).expect("own /proc stat");
        assert_eq!(stat.ppid, std::os::unix::process::parent_id());
    }
}
