//! What makes this pattern: a child process per connection, named `conn-N` after its `/stats`
//! slot and gone (reaped) once its connection closes; the bound, at which new connections wait
//! in the backlog; a crash that takes down one connection only; the `jobs` process that runs
//! every child's jobs and is respawned when it dies; long polls held by separate processes,
//! all woken by one POST; the stops.

use std::thread;
use std::time::{Duration, Instant};

use blackbox::checks::{
    GET_HELLO, HELLO, fetch_stats, get, json_body, post_message, request_with_body,
};
use blackbox::json::Value;
use blackbox::server::describe_exit;
use blackbox::{Client, Expect, ReadError, Server};

const BIN: &str = env!("CARGO_BIN_EXE_process-per-connection");
const TIMEOUT: Duration = Duration::from_secs(10);

/// Three keep-alive connections are served by three `conn-N` children of the master, each in
/// the `/stats` slot N; the `jobs` process is in slot 0; the master has one thread. A closed
/// connection's child exits and is reaped (no zombie), and its slot is free again.
#[test]
fn each_connection_has_a_child_process_of_its_own() {
    let server = Server::start(BIN, &["--max-children", "8"]);
    let master = server.pid();
    let mut clients: Vec<Client> = (0..3).map(|_| Client::connect(server.addr())).collect();
    for c in &mut clients {
        c.request(GET_HELLO).assert_status(200).assert_body(HELLO);
    }
    // The readiness probe's child may still be exiting.
    let children = wait_for("three conn-N children", || {
        let children = conn_children(master);
        (children.len() == 3).then_some(children)
    });

    let (stats, text) = fetch_stats(server.addr());
    let slots = slots(&stats);
    // The jobs process and 8 children's slots; those that never served are left out.
    assert!(
        slots.len() <= 9 && slots.iter().all(|s| s.id <= 8),
        "the jobs process and at most 8 children: {text}"
    );
    for (pid, name) in &children {
        let slot = slots.iter().find(|s| s.pid == *pid);
        let slot = slot.unwrap_or_else(|| panic!("{name} (pid {pid}) has no slot: {text}"));
        assert_eq!(*name, format!("conn-{}", slot.id), "{text}");
        assert!(slot.id > 0 && slot.open == 1, "{text}");
    }
    let jobs = slots[0].pid;
    assert_eq!(proc_name(jobs).as_deref(), Some("jobs"), "slot 0: {text}");
    assert_eq!(proc_stat(jobs).map(|p| p.ppid), Some(master), "{text}");
    let threads = std::fs::read_dir(format!("/proc/{master}/task")).map(|d| d.count());
    assert_eq!(threads.ok(), Some(1), "the master has one thread");

    // Close one connection: its child exits and the master reaps it.
    let (gone, _) = children[0].clone();
    let slot = slots.iter().find(|s| s.pid == gone).map(|s| s.id);
    drop(clients.remove(0));
    wait_for("the child of the closed connection to be reaped", || {
        proc_stat(gone).is_none().then_some(())
    });
    let (stats, text) = fetch_stats(server.addr());
    let slots = self::slots(&stats);
    assert!(slots.iter().all(|s| s.pid != gone), "{text}");
    let total_open = stats.get("total").and_then(|t| t.get("open"));
    // The two clients left, and the /stats connection.
    assert_eq!(total_open.and_then(Value::as_u64), Some(3), "{text}");
    let forks = slots.iter().find(|s| Some(s.id) == slot).map(|s| s.forks);
    assert!(forks.is_some_and(|f| f >= 1), "{text}");
    for c in &mut clients {
        c.request(GET_HELLO).assert_status(200);
    }
}

/// `--max-conns 2`: two connections held open take both children; a third completes its
/// handshake but is not served until one of them closes (it waits in the listen queue).
#[test]
fn at_the_bound_the_next_connection_waits_in_the_backlog() {
    let server = Server::start(BIN, &["--max-conns", "2"]);
    // Until the readiness probe's child has exited, the bound would be one lower.
    wait_for("the probe's child to exit", || {
        conn_children(server.pid()).is_empty().then_some(())
    });
    let open = blackbox::checks::next_connection_waits_at_the_bound(&server, 2);
    drop(open);
    let (stats, text) = fetch_stats(server.addr());
    assert_eq!(
        slots(&stats).len(),
        3,
        "the jobs process and 2 children: {text}"
    );
}

/// A child that crashes (SIGABRT: what a panic is in the release profile) takes down its own
/// connection and nothing else: the other connection is served on, the master logs the crash,
/// reaps the child and frees its slot. (Not SIGSEGV: a kill(2)ed SIGSEGV meets Rust's stack
/// overflow handler, which lets a signal that is not a fault pass once.)
#[test]
fn a_crashed_child_takes_down_only_its_connection() {
    let server = Server::start(BIN, &[]);
    let master = server.pid();
    let mut doomed = Client::connect(server.addr());
    doomed.request(GET_HELLO).assert_status(200);
    let victim = wait_for("one conn-N child", || match conn_children(master)[..] {
        [(pid, _)] => Some(pid),
        _ => None,
    });
    let mut other = Client::connect(server.addr());
    other.request(GET_HELLO).assert_status(200);

    // SAFETY: kill has no memory-safety preconditions; the pid is a child of our server.
    unsafe { libc::kill(victim as libc::pid_t, libc::SIGABRT) };
    doomed.set_timeout(Duration::from_secs(5));
    let lost = doomed
        .try_send(GET_HELLO)
        .map_err(|e| e.to_string())
        .and_then(|()| match doomed.try_read_response(Expect::Body) {
            Ok(r) => Ok(r),
            Err(e) => Err(e.to_string()),
        });
    assert!(lost.is_err(), "the crashed child's connection: {lost:?}");
    for _ in 0..3 {
        other
            .request(GET_HELLO)
            .assert_status(200)
            .assert_body(HELLO);
    }
    wait_for("the crash in the master's log", || {
        let log = server.stderr_text();
        (log.contains(&format!("(pid {victim}) was killed by SIGABRT"))).then_some(())
    });
    assert!(proc_stat(victim).is_none(), "the crashed child was reaped");
    let (stats, text) = fetch_stats(server.addr());
    let total_open = stats.get("total").and_then(|t| t.get("open"));
    // `other` and the /stats connection: the crashed child's count was reset with its slot.
    assert_eq!(total_open.and_then(Value::as_u64), Some(2), "{text}");
}

/// Jobs run in the `jobs` process, whichever child accepted them. Killed mid-job, it is
/// respawned; the new one takes the job over once its lease runs out and runs it to the end,
/// and runs the jobs posted afterwards.
#[test]
fn jobs_run_in_the_jobs_process_which_is_respawned() {
    let server = Server::start(BIN, &["--job-lease", "1s"]);
    let jobs_pid = |server: &Server| {
        let (stats, _) = fetch_stats(server.addr());
        let slot = slots(&stats).into_iter().next().expect("slot 0");
        (slot.pid, slot.forks)
    };
    let (first, forks) = jobs_pid(&server);
    assert_eq!(forks, 1);
    assert_eq!(job_pid_after_prefer_wait(&server), first);

    let mut c = Client::connect(server.addr());
    let r = c.request(request_with_body("POST", "/jobs?sleep_ms=1500", "", b""));
    r.assert_status(202);
    let location = r.header("Location").unwrap_or_default().to_string();
    wait_for("the job to run", || {
        let job = json_body(&Client::connect(server.addr()).request(get(&location)));
        (job.get("status").and_then(Value::as_str) == Some("running")).then_some(())
    });
    // SAFETY: kill has no memory-safety preconditions; the pid is our server's jobs process.
    unsafe { libc::kill(first as libc::pid_t, libc::SIGKILL) };
    let second = wait_for("a new jobs process", || {
        let (pid, forks) = jobs_pid(&server);
        (pid != 0 && pid != first && forks == 2).then_some(pid)
    });
    assert_eq!(proc_name(second).as_deref(), Some("jobs"));
    let done = wait_for("the job to finish in the new jobs process", || {
        let job = json_body(&Client::connect(server.addr()).request(get(&location)));
        (job.get("status").and_then(Value::as_str) == Some("succeeded")).then_some(job)
    });
    assert_eq!(
        done.get("pid").and_then(Value::as_u64),
        Some(u64::from(second))
    );
    assert_eq!(
        done.get("attempts").and_then(Value::as_u64),
        Some(2),
        "{done:?}"
    );
    assert_eq!(job_pid_after_prefer_wait(&server), second);
}

/// Long polls held by eight child processes are all answered within 100 ms of one POST, made
/// by a ninth: the journal's futex wakes every process (best of three, for a loaded machine).
#[test]
fn long_polls_in_eight_processes_answered_by_one_post() {
    let server = Server::start(BIN, &[]);
    let mut poster = Client::connect(server.addr());
    let mut worst = Vec::new();
    for _ in 0..3 {
        let seq = post_message(&mut poster, "warm-up");
        let mut waiters: Vec<Client> = (0..8)
            .map(|_| {
                let mut c = Client::connect(server.addr());
                c.send(get(&format!("/messages?after={seq}&wait=30s")));
                c
            })
            .collect();
        wait_for("8 long polls held", || {
            let (stats, _) = fetch_stats(server.addr());
            let held = stats.get("total").and_then(|t| t.get("held"));
            (held.and_then(Value::as_u64) == Some(8)).then_some(())
        });
        poster.request(request_with_body("POST", "/messages", "", b"news"));
        let posted = Instant::now();
        let mut latest = Duration::ZERO;
        for c in &mut waiters {
            c.set_timeout(Duration::from_secs(5));
            c.read_response().assert_status(200);
            latest = latest.max(posted.elapsed());
        }
        if latest < Duration::from_millis(100) {
            return;
        }
        worst.push(latest);
    }
    panic!("the last long poll was answered {worst:?} after the POST: expected < 100 ms");
}

/// A child that cannot finish within `--shutdown-timeout` (stuck in an 8 s `/block`) is
/// SIGKILLed a second after it; the master exits 0 and leaves no process behind.
#[test]
fn sigterm_kills_stragglers_after_the_shutdown_timeout() {
    let server = Server::start(BIN, &["--shutdown-timeout", "500ms"]);
    let log = stop_cuts_off_a_block(server, libc::SIGTERM, Duration::from_secs(6));
    assert!(log.contains("after the stop; killing them"), "{log}");
}

/// SIGQUIT is the fast stop: an 8 s `/block` is cut off and the master exits 0 at once,
/// leaving no process behind.
#[test]
fn sigquit_kills_every_child_at_once() {
    let server = Server::start(BIN, &[]);
    let log = stop_cuts_off_a_block(server, libc::SIGQUIT, Duration::from_secs(3));
    assert!(log.contains("fast stop"), "{log}");
}

/// Sends `signal` while a child is in an 8 s `/block`: the master exits 0 `within`, the
/// `/block` is cut off, and no process is left in the group. The master's log.
fn stop_cuts_off_a_block(mut server: Server, signal: i32, within: Duration) -> String {
    let mut stuck = block_in_flight(&server, 8000);
    server.signal(signal);
    match server.wait_exit(within) {
        Some(status) if status.code() == Some(0) => {}
        Some(status) => panic!("after signal {signal} the master {}", describe_exit(status)),
        None => panic!("the master was still running {within:?} after signal {signal}"),
    }
    stuck.set_timeout(Duration::from_secs(4));
    match stuck.try_read_response(Expect::Body) {
        Err(ReadError::Closed) => {}
        other => panic!("the in-flight /block should have been cut off, got {other:?}"),
    }
    let left = in_group(server.pid());
    assert_eq!(left, Vec::<u32>::new(), "processes left behind");
    server.stderr_text()
}

/// Ctrl-C in a terminal sends SIGINT to the whole process group: the children ignore it and
/// the master makes it one graceful stop. A `/block` in flight is answered, an idle
/// keep-alive connection is closed, and the master exits 0.
#[test]
fn sigint_to_the_whole_group_is_one_graceful_stop() {
    let mut server = Server::start(BIN, &[]);
    let mut idle = Client::connect(server.addr());
    idle.request(GET_HELLO).assert_status(200);
    let mut busy = block_in_flight(&server, 1000);
    // SAFETY: kill has no memory-safety preconditions; the harness made the server the leader
    // of a process group of its own, which holds only it and its children.
    let rc = unsafe { libc::kill(-(server.pid() as libc::pid_t), libc::SIGINT) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    busy.set_timeout(TIMEOUT);
    busy.read_response().assert_status(200);
    idle.expect_closed(TIMEOUT);
    match server.wait_exit(TIMEOUT) {
        Some(status) if status.code() == Some(0) => {}
        Some(status) => panic!(
            "after SIGINT to the group the master {}",
            describe_exit(status)
        ),
        None => panic!("the master was still running {TIMEOUT:?} after SIGINT"),
    }
}

// ---- helpers -----------------------------------------------------------------------------------

/// A connection whose child is inside a `/block?ms=MS` (its slot counts the request).
fn block_in_flight(server: &Server, ms: u64) -> Client {
    let others = conn_children(server.pid());
    let mut c = Client::connect(server.addr());
    c.request(GET_HELLO).assert_status(200);
    let child = wait_for("its conn-N child", || {
        let mut new = conn_children(server.pid());
        new.retain(|c| !others.contains(c));
        match new[..] {
            [(pid, _)] => Some(pid),
            _ => None,
        }
    });
    let requests = || {
        let (stats, text) = fetch_stats(server.addr());
        let slot = slots(&stats).into_iter().find(|s| s.pid == child);
        slot.unwrap_or_else(|| panic!("no slot for pid {child}: {text}"))
            .requests
    };
    let before = requests();
    c.send(get(&format!("/block?ms={ms}")));
    wait_for("the /block to be read", || {
        (requests() > before).then_some(())
    });
    c
}

/// Posts a short job with `Prefer: wait`; the pid of the process that ran it.
fn job_pid_after_prefer_wait(server: &Server) -> u32 {
    let mut c = Client::connect(server.addr());
    c.set_timeout(TIMEOUT);
    let r = c.request(request_with_body(
        "POST",
        "/jobs?sleep_ms=1",
        "Prefer: wait=10\r\n",
        b"",
    ));
    r.assert_status(200);
    let job = json_body(&r);
    let pid = job.get("pid").and_then(Value::as_u64);
    pid.and_then(|p| u32::try_from(p).ok())
        .unwrap_or_else(|| panic!("a finished job names its process: {job:?}"))
}

/// Polls `probe` every few ms until it returns a value; fails after TIMEOUT.
#[track_caller]
fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "waited {TIMEOUT:?} for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// A `/stats` slot.
struct Slot {
    id: u64,
    pid: u32,
    open: u64,
    requests: u64,
    forks: u64,
}

fn slots(stats: &Value) -> Vec<Slot> {
    let workers = stats.get("workers").and_then(Value::as_array);
    let workers = workers.unwrap_or_else(|| panic!("/stats has no workers: {stats:?}"));
    workers
        .iter()
        .map(|w| {
            let n = |k: &str| {
                w.get(k)
                    .and_then(Value::as_u64)
                    .unwrap_or_else(|| panic!("a slot without `{k}`: {w:?}"))
            };
            Slot {
                id: n("id"),
                pid: u32::try_from(n("pid")).unwrap_or(0),
                open: n("open"),
                requests: n("requests"),
                forks: n("forks"),
            }
        })
        .collect()
}

struct ProcStat {
    state: char,
    ppid: u32,
    pgrp: u32,
}

/// A live (or zombie) process's state, parent and group; None once it is reaped.
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

fn proc_name(pid: u32) -> Option<String> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(comm.trim_end().to_string())
}

/// Every process whose stat matches `keep`.
fn processes(keep: impl Fn(&ProcStat) -> bool) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| proc_stat(pid).is_some_and(|p| keep(&p)))
        .collect()
}

/// The master's connection children not yet exited: (pid, name).
fn conn_children(master: u32) -> Vec<(u32, String)> {
    processes(|p| p.ppid == master && p.state != 'Z')
        .into_iter()
        .filter_map(|pid| Some((pid, proc_name(pid)?)))
        .filter(|(_, name)| name.starts_with("conn-"))
        .collect()
}

/// The processes still in the server's process group (the harness makes the master its leader).
fn in_group(master: u32) -> Vec<u32> {
    processes(|p| p.pgrp == master)
}

/// A child is forked from a master whose view of the journal is current: it does not read
/// again the records appended since the master started. Measured as the children's CPU
/// (the master's cutime + cstime) over 100 connections that each read the messages, before
/// and after 2000 were posted: with every child reading them again, it was many times more.
#[test]
fn children_inherit_a_current_view_of_the_journal() {
    const CONNECTIONS: usize = 100;
    let server = Server::start(BIN, &["--commit", "async"]);
    let idle = |server: &Server| {
        // Zombies included: a child's CPU joins cutime only when it is reaped. The jobs
        // process stays.
        wait_for("every connection child to be reaped", || {
            (processes(|p| p.ppid == server.pid()).len() == 1).then_some(())
        })
    };
    let children_cpu = |server: &Server| {
        // Not counting the children before (the poster's, which did the work of 2000 POSTs).
        idle(server);
        let before = reaped_cpu_ticks(server.pid());
        for _ in 0..CONNECTIONS {
            let mut c = Client::connect(server.addr());
            // A read of the journal: the child's view must be current before it answers.
            c.request("GET /messages?limit=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .assert_status(200);
            c.expect_closed(TIMEOUT);
        }
        idle(server);
        reaped_cpu_ticks(server.pid()) - before
    };
    let fresh = children_cpu(&server);
    let mut poster = Client::connect(server.addr());
    let body = "m".repeat(200);
    for _ in 0..2000 {
        post_message(&mut poster, &body);
    }
    drop(poster);
    let later = children_cpu(&server);
    assert!(
        later < 2 * fresh.max(10),
        "{CONNECTIONS} children used {fresh} ticks on a fresh journal, {later} after 2000 messages"
    );
}

/// The CPU (clock ticks) of the children process `pid` has reaped: cutime + cstime.
fn reaped_cpu_ticks(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the master's stat");
    // After the parenthesised command name, cutime and cstime are fields 16 and 17: words 13, 14.
    let words: Vec<&str> = text[text.rfind(')').unwrap_or(0) + 1..]
        .split_whitespace()
        .collect();
    let field = |i: usize| {
        words
            .get(i)
            .and_then(|w| w.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(13) + field(14)
}
