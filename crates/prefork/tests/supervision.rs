//! What makes prefork prefork: worker processes supervised by a master. The workers' pids in
//! `/stats`; a killed worker replaced at once while the others keep serving; a rolling restart
//! on SIGHUP that never closes the socket; graceful and fast stops; no zombie ever left; no
//! fork loop for a worker that cannot start.
//!
//! The load in these tests is keep-alive `GET /` loops. A request "fails" if its reply is wrong,
//! truncated, garbled or late, or if a connect fails (the socket must stay open). Where a worker
//! is told to stop, a request sent just as it closes an idle keep-alive connection is closed
//! unanswered before any byte of a reply; clients retry that on a new connection (RFC 9112
//! §9.3.1), and so does the load here, counting it as a retry, not a failure.
//!
//! The tests of workers that cannot start set `PREFORK_TEST_FAIL_START` in the server's
//! environment (read once by the master, in `src/worker.rs`): `SLOT` makes every worker forked
//! into slot SLOT panic as it starts; `SLOT:fatal` makes it exit with 2 instead. A test hook, so
//! not a flag in the user's `--help`.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use blackbox::checks::{GET_HELLO, HELLO, get};
use blackbox::json::Value;
use blackbox::server::describe_exit;
use blackbox::{Client, Expect, ReadError, Server};

const BIN: &str = env!("CARGO_BIN_EXE_prefork");
/// The environment variable that makes workers fail at start-up (see the top of this file).
const FAIL_START: &str = "PREFORK_TEST_FAIL_START";
/// How long a worker must live for the master to respawn it at once when it dies (the master's
/// STABLE_AFTER, 1 s, with a margin).
const PAST_STABLE: Duration = Duration::from_millis(1200);

// ---- /stats shows the processes ----------------------------------------------------------------

#[test]
fn stats_show_every_worker_process_event() {
    stats_show_every_worker_process("event");
}

#[test]
fn stats_show_every_worker_process_blocking() {
    stats_show_every_worker_process("blocking");
}

/// `/stats`, answered by whichever worker, lists N distinct worker pids, each a live child of
/// the master named `worker-N`, and the master's pid at the top. The master has one thread.
fn stats_show_every_worker_process(mode: &str) {
    let server = Server::start(BIN, &["--mode", mode, "--workers", "3"]);
    let master = server.pid();
    let (stats, text) = fetch_stats(server.addr());
    assert_eq!(
        stats.get("pid").and_then(Value::as_u64),
        Some(u64::from(master)),
        "/stats pid should be the master's: {text}"
    );
    let slots = slots(&stats);
    assert_eq!(slots.len(), 3, "/stats should list 3 workers: {text}");
    let pids: HashSet<u32> = slots.iter().map(|s| s.pid).collect();
    assert_eq!(pids.len(), 3, "3 distinct worker pids expected: {text}");
    for (id, slot) in slots.iter().enumerate() {
        assert_ne!(slot.pid, master, "worker {id} has the master's pid: {text}");
        let proc = proc_stat(slot.pid).unwrap_or_else(|| panic!("worker {id} is not running"));
        assert_eq!(proc.ppid, master, "worker {id} is not the master's child");
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", slot.pid)).unwrap_or_default();
        assert_eq!(
            comm.trim(),
            format!("worker-{id}"),
            "worker {id}'s process name"
        );
        assert_eq!(slot.spawns, 1, "worker {id} was forked once: {text}");
    }
    let threads = std::fs::read_dir(format!("/proc/{master}/task")).map(|d| d.count());
    assert_eq!(
        threads.ok(),
        Some(1),
        "the master must have a single thread"
    );
}

// ---- a killed worker ---------------------------------------------------------------------------

#[test]
fn sigkill_worker_under_load_event() {
    sigkill_worker_under_load("event", 3, 6);
}

#[test]
fn sigkill_worker_under_load_blocking() {
    // One connection per blocking worker: more workers than clients, so that the killed
    // worker's clients find a free one.
    sigkill_worker_under_load("blocking", 6, 4);
}

/// SIGKILL the busiest worker under steady keep-alive load: a new worker appears in its slot
/// within 1 s, the killed worker's connections are the only ones that see an error (once
/// each; they reconnect), and it leaves no zombie.
fn sigkill_worker_under_load(mode: &str, workers: usize, clients: usize) {
    let workers_arg = workers.to_string();
    let server = Server::start(BIN, &["--mode", mode, "--workers", &workers_arg]);
    // The workers were forked before the start-up line, so from here on they are older.
    let started = Instant::now();
    let load = Load::start(server.addr(), clients, Retry::Never);
    load.wait_served(20 * clients as u64);
    // Not a guess that something has happened: the wait *is* the condition. Once the workers
    // have lived past the master's "died young" threshold, the respawn is immediate.
    thread::sleep(PAST_STABLE.saturating_sub(started.elapsed()));

    let (stats, text) = fetch_stats(server.addr());
    let before = slots(&stats);
    let (victim_slot, victim) = before
        .iter()
        .enumerate()
        .max_by_key(|(_, s)| s.open)
        .map(|(i, s)| (i, s.pid))
        .expect("at least one worker");
    // Which clients are the victim's, from its sockets: they alone may see an error.
    let victims_clients = peer_ports(victim, server.addr().port());
    let served_before = load.served();
    kill(victim, libc::SIGKILL);
    let killed = Instant::now();

    let replacement = loop {
        let (stats, _) = fetch_stats(server.addr());
        let pid = slots(&stats)[victim_slot].pid;
        if pid != victim {
            break pid;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(1),
            "no new worker in slot {victim_slot} 1 s after SIGKILL of pid {victim}: {}",
            server.stderr_text()
        );
        thread::sleep(Duration::from_millis(20));
    };
    assert!(proc_stat(replacement).is_some_and(|p| p.ppid == server.pid()));
    // Steady load carries on.
    load.wait_served(served_before + 20 * clients as u64);
    let report = load.stop();

    let mut per_port: HashMap<u16, usize> = HashMap::new();
    for f in &report.failures {
        *per_port.entry(f.port).or_default() += 1;
    }
    let stray: Vec<&Failure> = report
        .failures
        .iter()
        .filter(|f| !victims_clients.contains(&f.port) || per_port[&f.port] > 1)
        .collect();
    assert!(
        stray.is_empty(),
        "requests failed that were not in flight on the killed worker (pid {victim}, client \
         ports {victims_clients:?}; /stats before: {text}):\n{}",
        describe(stray)
    );
    assert_eq!(
        slots(&fetch_stats(server.addr()).0)[victim_slot].spawns,
        2,
        "slot {victim_slot} should have had exactly one respawn"
    );
    assert_no_zombies(server.pid());
}

// ---- SIGHUP: rolling restart -------------------------------------------------------------------

#[test]
fn sighup_rolling_restart_under_load_event() {
    sighup_rolling_restart_under_load("event", 3, 6);
}

#[test]
fn sighup_rolling_restart_under_load_blocking() {
    sighup_rolling_restart_under_load("blocking", 6, 4);
}

/// SIGHUP under load: every worker is replaced, the master stays, no request fails and no
/// connect is refused (the socket stays open throughout), and no zombie is left.
fn sighup_rolling_restart_under_load(mode: &str, workers: usize, clients: usize) {
    let workers_arg = workers.to_string();
    let server = Server::start(BIN, &["--mode", mode, "--workers", &workers_arg]);
    let load = Load::start(server.addr(), clients, Retry::ClosedBeforeReply);
    load.wait_served(20 * clients as u64);
    let (stats, _) = fetch_stats(server.addr());
    let old: HashSet<u32> = slots(&stats).iter().map(|s| s.pid).collect();

    kill(server.pid(), libc::SIGHUP);
    let sent = Instant::now();
    let new = loop {
        let (stats, text) = fetch_stats(server.addr());
        let pids: Vec<u32> = slots(&stats).iter().map(|s| s.pid).collect();
        let replaced = pids.iter().all(|p| !old.contains(p));
        // Replaced, and the old workers have exited: the restart is over.
        if replaced && children(server.pid()).len() == workers {
            break pids;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(20),
            "20 s after SIGHUP the workers are {pids:?} (before: {old:?}): {text}\n{}",
            server.stderr_text()
        );
        thread::sleep(Duration::from_millis(50));
    };
    let served_after = load.served();
    load.wait_served(served_after + 20 * clients as u64);
    let report = load.stop();
    assert!(
        report.failures.is_empty(),
        "requests failed during the rolling restart ({} retried after a keep-alive close):\n{}",
        report.retries,
        describe(&report.failures)
    );
    assert_eq!(
        new.iter().collect::<HashSet<_>>().len(),
        workers,
        "distinct new pids"
    );
    let (stats, text) = fetch_stats(server.addr());
    assert_eq!(
        stats.get("pid").and_then(Value::as_u64),
        Some(u64::from(server.pid())),
        "the master stays: {text}"
    );
    assert!(
        server.stderr_text().contains("rolling restart done"),
        "{}",
        server.stderr_text()
    );
    assert_no_zombies(server.pid());
}

// ---- stopping ----------------------------------------------------------------------------------

#[test]
fn sigterm_under_load_leaves_no_process_event() {
    sigterm_under_load_leaves_no_process("event", 3, 6);
}

#[test]
fn sigterm_under_load_leaves_no_process_blocking() {
    sigterm_under_load_leaves_no_process("blocking", 8, 4);
}

/// SIGTERM under load: every reply received is whole, an in-flight slow request is answered,
/// the master exits 0, and no worker outlives it (none left in its process group).
fn sigterm_under_load_leaves_no_process(mode: &str, workers: usize, clients: usize) {
    let workers_arg = workers.to_string();
    let mut server = Server::start(BIN, &["--mode", mode, "--workers", &workers_arg]);
    let master = server.pid();
    let load = Load::start(server.addr(), clients, Retry::ClosedBeforeReply);
    load.wait_served(20 * clients as u64);
    let mut slow = Client::connect(server.addr());
    slow.request(GET_HELLO).assert_status(200);
    slow.send(get("/block?ms=500"));
    wait_until_read(&slow);

    load.expect_close();
    server.signal(libc::SIGTERM);
    slow.set_timeout(Duration::from_secs(10));
    match slow.try_read_response(Expect::Body) {
        Ok(r) => {
            r.assert_status(200);
        }
        Err(e) => panic!("the in-flight /block got no whole reply after SIGTERM: {e}"),
    }
    let exit = server.wait_exit(Duration::from_secs(10));
    let report = load.stop();
    assert!(
        report.failures.is_empty(),
        "replies cut or wrong during the graceful stop:\n{}",
        describe(&report.failures)
    );
    match exit {
        Some(status) if status.code() == Some(0) => {}
        Some(status) => panic!("after SIGTERM the master {}", describe_exit(status)),
        None => panic!("the master was still running 10 s after SIGTERM"),
    }
    assert_eq!(in_group(master), Vec::<u32>::new(), "processes left behind");
}

/// A worker that cannot finish within `--shutdown-timeout` (its loop is stuck in an 8 s
/// `/block`) is SIGKILLed by the master a second after that timeout; the master exits 0.
#[test]
fn sigterm_kills_stragglers_after_the_shutdown_timeout() {
    let mut server = Server::start(BIN, &["--workers", "2", "--shutdown-timeout", "500ms"]);
    let master = server.pid();
    let mut stuck = Client::connect(server.addr());
    stuck.request(GET_HELLO).assert_status(200);
    stuck.send(get("/block?ms=8000"));
    wait_until_read(&stuck);
    server.signal(libc::SIGTERM);
    match server.wait_exit(Duration::from_secs(6)) {
        Some(status) if status.code() == Some(0) => {}
        Some(status) => panic!("after SIGTERM the master {}", describe_exit(status)),
        None => panic!("the master was still running 6 s after SIGTERM"),
    }
    assert!(
        server.stderr_text().contains("did not stop in"),
        "{}",
        server.stderr_text()
    );
    stuck.set_timeout(Duration::from_secs(4));
    match stuck.try_read_response(Expect::Body) {
        Err(ReadError::Closed) => {}
        other => panic!("the stuck /block should have been cut off, got {other:?}"),
    }
    assert_eq!(in_group(master), Vec::<u32>::new(), "processes left behind");
}

#[test]
fn sigquit_kills_workers_at_once() {
    fast_stop(&[libc::SIGQUIT]);
}

#[test]
fn second_sigint_kills_workers_at_once() {
    fast_stop(&[libc::SIGINT, libc::SIGINT]);
}

/// SIGQUIT (or SIGINT twice) is fast: a request blocking for 8 s is cut off, and the master
/// exits 0 well before it would have finished, leaving no process behind.
fn fast_stop(signals: &[i32]) {
    let mut server = Server::start(BIN, &["--workers", "2"]);
    let master = server.pid();
    let mut slow = Client::connect(server.addr());
    slow.request(GET_HELLO).assert_status(200);
    slow.send(get("/block?ms=8000"));
    wait_until_read(&slow);
    for (i, &signal) in signals.iter().enumerate() {
        server.signal(signal);
        if i + 1 < signals.len() {
            // Two signals of a kind that arrive before the master looks are one: wait until it
            // has acted on this one (only a first SIGINT comes before another here).
            let acted = || server.stderr_text().contains("graceful stop").then_some(());
            wait_for("the master to begin the graceful stop", TIMEOUT, acted);
        }
    }
    let exit = server.wait_exit(Duration::from_secs(4));
    match exit {
        Some(status) if status.code() == Some(0) => {}
        Some(status) => panic!("after {signals:?} the master {}", describe_exit(status)),
        None => panic!("the master was still running 4 s after {signals:?}"),
    }
    slow.set_timeout(Duration::from_secs(4));
    match slow.try_read_response(Expect::Body) {
        Err(ReadError::Closed) => {}
        other => panic!("the in-flight /block should have been cut off, got {other:?}"),
    }
    assert_eq!(in_group(master), Vec::<u32>::new(), "processes left behind");
}

// ---- workers that cannot start -----------------------------------------------------------------

/// A worker that panics at start-up is respawned with a growing delay, not in a tight loop:
/// a handful of forks in 2 s, while the other worker serves on.
#[test]
fn worker_failing_at_start_is_not_respawned_in_a_loop() {
    let server = FailingStart::start("1", &["--workers", "2"]);
    // The 2 s are the measurement: the forks counted in them show the back-off.
    thread::sleep(Duration::from_secs(2));
    let (stats, text) = fetch_stats(server.addr());
    let slots = slots(&stats);
    assert_eq!(
        slots[0].spawns, 1,
        "the healthy worker was never respawned: {text}"
    );
    assert!(
        (2..=8).contains(&slots[1].spawns),
        "the failing worker should be forked a few times in 2 s (back-off from 100 ms), not \
         {} times: {text}",
        slots[1].spawns
    );
    assert!(
        server.stderr_text().contains("respawning it in"),
        "{}",
        server.stderr_text()
    );
    assert_no_zombies(server.pid());
}

/// A worker that exits with the reserved code 2 is not respawned; the others serve on.
#[test]
fn fatal_exit_code_is_not_respawned() {
    let server = FailingStart::start("1:fatal", &["--workers", "2"]);
    let reaped = || {
        let text = server.stderr_text();
        text.contains("not respawning it").then_some(())
    };
    wait_for(
        "the master to reap the worker that exited with 2",
        TIMEOUT,
        reaped,
    );
    // The observation: a respawn would come within 100 ms (the first back-off); none comes in
    // ten times that.
    thread::sleep(Duration::from_secs(1));
    let (stats, text) = fetch_stats(server.addr());
    assert_eq!(slots(&stats)[1].spawns, 1, "slot 1 was respawned: {text}");
    assert_eq!(children(server.pid()).len(), 1, "one worker left");
    assert_no_zombies(server.pid());
}

/// When no worker can start, the master gives up with the same code 2.
#[test]
fn master_exits_2_when_no_worker_can_start() {
    let data_dir = blackbox::server::fresh_data_dir();
    let mut child = Command::new(BIN)
        .args(["--addr", "127.0.0.1:0", "--workers", "1"])
        .arg("--data-dir")
        .arg(&data_dir)
        .env(FAIL_START, "0:fatal")
        .stderr(Stdio::null())
        .spawn()
        .expect("start prefork");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the master was still running 10 s after its only worker exited with 2");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let _ = std::fs::remove_dir_all(&data_dir);
    assert_eq!(status.code(), Some(2), "{}", describe_exit(status));
}

// ---- helpers -----------------------------------------------------------------------------------

/// How long a wait for something the server does at once may take on a loaded machine.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Polls `probe` every few ms until it returns a value, and returns it; fails after `within`.
#[track_caller]
fn wait_for<T>(what: &str, within: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "waited {within:?} for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// prefork with [`FAIL_START`] set to `fail` in its environment. blackbox's `Server` sets no
/// environment, so this starts the process the way `Server` does: port 0, its own process
/// group (all of it killed on drop), the address read from the start-up line, stderr kept.
struct FailingStart {
    child: Child,
    addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
    data_dir: std::path::PathBuf,
}

impl FailingStart {
    #[track_caller]
    fn start(fail: &str, args: &[&str]) -> FailingStart {
        let data_dir = blackbox::server::fresh_data_dir();
        let mut child = Command::new(BIN)
            .args(["--addr", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(&data_dir)
            .args(args)
            .env(FAIL_START, fail)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("start prefork");
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = BufReader::new(child.stderr.take().expect("piped stderr"));
        let text = stderr.clone();
        thread::spawn(move || {
            for line in pipe.lines().map_while(Result::ok) {
                let mut text = text.lock().unwrap_or_else(|e| e.into_inner());
                text.push_str(&line);
                text.push('\n');
            }
        });
        let mut server = FailingStart {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stderr,
            data_dir,
        };
        server.addr = wait_for("the start-up line", TIMEOUT, || {
            let text = server.stderr_text();
            let (_, rest) = text.split_once("listening on http://")?;
            rest.split_whitespace()
                .next()?
                .trim_end_matches('/')
                .parse()
                .ok()
        });
        server
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stderr_text(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for FailingStart {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions; the negative pid names the process
        // group the master leads (process_group(0)): the master and the workers it forked.
        unsafe { libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
        if thread::panicking() {
            eprintln!("--- prefork stderr ---\n{}--- end ---", self.stderr_text());
        }
    }
}

/// `GET /stats` on a new connection, parsed. A worker told to stop may close a connection it
/// has just accepted before the request arrives; like the load, this retries that.
#[track_caller]
fn fetch_stats(addr: SocketAddr) -> (Value, String) {
    let mut last = String::new();
    for _ in 0..5 {
        let mut c = match Client::try_connect(addr, Duration::from_secs(5)) {
            Ok(c) => c,
            Err(e) => panic!("GET /stats: connect: {e}"),
        };
        let sent = c.try_send(get("/stats")).map_err(|_| ReadError::Closed);
        match sent.and_then(|()| c.try_read_response(Expect::Body)) {
            Ok(r) => {
                r.assert_status(200);
                let text = r.body_text();
                match blackbox::json::parse(&text) {
                    Ok(stats) => return (stats, text),
                    Err(e) => panic!("/stats is not JSON ({e}): {text}"),
                }
            }
            Err(ReadError::Closed) => last = "closed before a reply".into(),
            Err(e) => panic!("GET /stats: {e}"),
        }
    }
    panic!("GET /stats: 5 connections in a row were {last}");
}

struct Slot {
    pid: u32,
    open: u64,
    spawns: u64,
}

/// The `workers` array of a `/stats` document.
fn slots(stats: &Value) -> Vec<Slot> {
    let workers = stats.get("workers").and_then(Value::as_array);
    let workers = workers.unwrap_or_else(|| panic!("/stats has no workers: {stats:?}"));
    let field = |w: &Value, name: &str| {
        let n = w.get(name).and_then(Value::as_u64);
        n.unwrap_or_else(|| panic!("a /stats worker has no `{name}`: {w:?}"))
    };
    workers
        .iter()
        .map(|w| Slot {
            pid: u32::try_from(field(w, "pid")).expect("a pid"),
            open: field(w, "open"),
            spawns: field(w, "spawns"),
        })
        .collect()
}

fn kill(pid: u32, signal: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal})");
}

struct ProcStat {
    state: char,
    ppid: u32,
    pgrp: u32,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the parenthesised command name: state, ppid, pgrp, ...
    let mut fields = text[text.rfind(')')? + 1..].split_whitespace();
    Some(ProcStat {
        state: fields.next()?.chars().next()?,
        ppid: fields.next()?.parse().ok()?,
        pgrp: fields.next()?.parse().ok()?,
    })
}

/// Every process whose stat matches `keep`: (pid, stat).
fn processes(keep: impl Fn(&ProcStat) -> bool) -> Vec<(u32, ProcStat)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, proc_stat(pid)?)))
        .filter(|(_, stat)| keep(stat))
        .collect()
}

/// The master's children: (pid, state).
fn children(master: u32) -> Vec<(u32, char)> {
    let mine = processes(|p| p.ppid == master);
    mine.into_iter().map(|(pid, p)| (pid, p.state)).collect()
}

/// The processes still in the server's process group (the harness makes the master its leader).
fn in_group(master: u32) -> Vec<u32> {
    let group = processes(|p| p.pgrp == master);
    group.into_iter().map(|(pid, _)| pid).collect()
}

/// No child of the master is a zombie (one may be for the moment between its death and the
/// master's waitpid, so allow the master a second to reap it).
fn assert_no_zombies(master: u32) {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let zombies: Vec<u32> = children(master)
            .into_iter()
            .filter(|&(_, state)| state == 'Z')
            .map(|(pid, _)| pid)
            .collect();
        if zombies.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "zombie children of the master {master}: {zombies:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// The client ports of the TCP connections process `pid` holds to local port `port`.
fn peer_ports(pid: u32, port: u16) -> HashSet<u16> {
    let mut inodes = HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(link) = std::fs::read_link(fd.path())
            && let Some(inode) = link
                .to_str()
                .and_then(|l| l.strip_prefix("socket:["))
                .and_then(|l| l.strip_suffix(']'))
        {
            inodes.insert(inode.to_string());
        }
    }
    tcp_sockets()
        .into_iter()
        .filter(|s| inodes.contains(&s.inode) && s.local_port == port)
        .map(|s| s.remote_port)
        .collect()
}

/// Waits until the server has read all that `c` sent: first the server's kernel acknowledges
/// the bytes (`c`'s send queue is empty), then they leave its receive queue, read by a worker.
/// A request read is a request in progress, which a graceful stop finishes.
#[track_caller]
fn wait_until_read(c: &Client) {
    let local = c.stream().local_addr().expect("local address").port();
    let server = c.stream().peer_addr().expect("peer address").port();
    let find = |from: u16, to: u16| {
        let is = |s: &TcpSocket| s.local_port == from && s.remote_port == to && s.established;
        tcp_sockets().into_iter().find(is)
    };
    let acked = || find(local, server).filter(|s| s.send_queue == 0);
    wait_for("the server to acknowledge the request", TIMEOUT, acked);
    let read = || find(server, local).filter(|s| s.receive_queue == 0);
    wait_for("a worker to read the request", TIMEOUT, read);
}

/// One line of /proc/net/tcp: a TCP socket of this network namespace (the servers' too).
struct TcpSocket {
    local_port: u16,
    remote_port: u16,
    established: bool,
    /// Bytes sent and not yet acknowledged.
    send_queue: u64,
    /// Bytes received and not yet read.
    receive_queue: u64,
    inode: String,
}

fn tcp_sockets() -> Vec<TcpSocket> {
    let table = std::fs::read_to_string("/proc/self/net/tcp").unwrap_or_default();
    let hex_port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            // sl local_address rem_address st tx_queue:rx_queue tr:when retrnsmt uid timeout inode
            let f: Vec<&str> = line.split_whitespace().collect();
            let (send, receive) = f.get(4)?.split_once(':')?;
            Some(TcpSocket {
                local_port: hex_port(f.get(1)?)?,
                remote_port: hex_port(f.get(2)?)?,
                established: *f.get(3)? == "01",
                send_queue: u64::from_str_radix(send, 16).ok()?,
                receive_queue: u64::from_str_radix(receive, 16).ok()?,
                inode: f.get(9)?.to_string(),
            })
        })
        .collect()
}

/// Whether a request closed unanswered may be retried on a new connection.
#[derive(Clone, Copy, PartialEq)]
enum Retry {
    /// Every error is a failure (a SIGKILL test: only the victim's clients may see one).
    Never,
    /// A close before any byte of the reply is a worker closing an idle keep-alive connection
    /// as it stops: retry (every other error is still a failure).
    ClosedBeforeReply,
}

struct Failure {
    /// The client's local port on the connection that failed (0: the connect failed).
    port: u16,
    error: String,
}

/// One line per failure.
fn describe<'a>(failures: impl IntoIterator<Item = &'a Failure>) -> String {
    let lines = failures
        .into_iter()
        .map(|f| format!("  port {}: {}", f.port, f.error));
    lines.collect::<Vec<_>>().join("\n")
}

struct Report {
    failures: Vec<Failure>,
    retries: u64,
}

/// Keep-alive `GET /` loops, one thread per client.
struct Load {
    stop: Arc<AtomicBool>,
    /// After the server closes: a refused connect ends a client instead of failing it.
    closing: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    retries: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<Failure>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, clients: usize, retry: Retry) -> Load {
        let load = Load {
            stop: Arc::default(),
            closing: Arc::default(),
            served: Arc::default(),
            retries: Arc::default(),
            failures: Arc::default(),
            threads: Vec::new(),
        };
        let threads = (0..clients)
            .map(|i| {
                let (stop, closing) = (load.stop.clone(), load.closing.clone());
                let (served, retries) = (load.served.clone(), load.retries.clone());
                let failures = load.failures.clone();
                let fail =
                    move |port, error| failures.lock().unwrap().push(Failure { port, error });
                thread::Builder::new()
                    .name(format!("load-{i}"))
                    .spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            let mut c = match Client::try_connect(addr, Duration::from_secs(5)) {
                                Ok(c) => c,
                                Err(_) if closing.load(Ordering::Relaxed) => return,
                                Err(e) => {
                                    fail(0, format!("client {i}: connect: {e}"));
                                    // A pause before trying again, not a wait for anything.
                                    thread::sleep(Duration::from_millis(50));
                                    continue;
                                }
                            };
                            let port = c.stream().local_addr().map_or(0, |a| a.port());
                            while !stop.load(Ordering::Relaxed) {
                                let outcome = c.try_send(GET_HELLO).map_err(|_| ReadError::Closed);
                                match outcome.and_then(|()| c.try_read_response(Expect::Body)) {
                                    Ok(r) if r.status == 200 && r.body == HELLO.as_bytes() => {
                                        served.fetch_add(1, Ordering::Relaxed);
                                        continue;
                                    }
                                    Ok(r) => fail(port, format!("client {i}: wrong reply {r:?}")),
                                    Err(ReadError::Closed) if retry == Retry::ClosedBeforeReply => {
                                        retries.fetch_add(1, Ordering::Relaxed);
                                    }
                                    Err(e) => fail(port, format!("client {i}: {e}")),
                                }
                                break;
                            }
                        }
                    })
                    .expect("spawn a load thread")
            })
            .collect();
        Load { threads, ..load }
    }

    fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Waits (up to 10 s) until `n` requests in all have been served.
    #[track_caller]
    fn wait_served(&self, n: u64) {
        let started = Instant::now();
        while self.served() < n {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "load: {} of {n} requests served in 10 s; failures:\n{}",
                self.served(),
                describe(self.failures.lock().unwrap().iter())
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn stop(mut self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().expect("a load thread panicked");
        }
        Report {
            failures: std::mem::take(&mut *self.failures.lock().unwrap()),
            retries: self.retries.load(Ordering::Relaxed),
        }
    }

    /// The server is about to close its socket: a refused connect ends a client from now on.
    fn expect_close(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }
}
