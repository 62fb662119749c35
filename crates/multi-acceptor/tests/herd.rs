//! What makes this the multi-acceptor pattern, and its flaw: four workers sleep on one listening
//! socket, so without `--exclusive` every new connection wakes all of them (the thundering
//! herd). With EPOLLEXCLUSIVE the kernel wakes one.
//!
//! The herd shows in the workers' voluntary context switches, not in `wasted_wakeups`: epoll
//! checks readiness again before it returns, so a worker woken for a connection another worker
//! already took usually goes back to sleep inside the kernel, never reaching `accept()`. Every
//! such wake-up is still a context switch of that worker's thread. Each connection of the
//! burst below finds all four workers asleep: without `--exclusive` it wakes the three that get
//! nothing as well as the one that serves it, with `--exclusive` only the one. The serving
//! worker sleeps one to three times per connection (between accept, request and close,
//! depending on timing), in either mode; the herd is the difference.

use std::thread;
use std::time::{Duration, Instant};

use blackbox::checks::{GET_HELLO, get};
use blackbox::json::{self, Value};
use blackbox::{Client, Server};

const BIN: &str = env!("CARGO_BIN_EXE_multi-acceptor");
const CONNECTIONS: u64 = 300;

#[test]
fn exclusive_wakes_fewer_workers() {
    let herd = burst(&[]);
    let exclusive = burst(&["--exclusive"]);
    eprintln!(
        "{CONNECTIONS} connections over 4 workers: voluntary context switches {} shared vs {} \
         exclusive; wasted wake-ups seen by accept() {} vs {}; accepted per worker {:?} vs {:?}",
        herd.csw, exclusive.csw, herd.wasted, exclusive.wasted, herd.accepted, exclusive.accepted
    );
    // The measurement counts: every connection made a worker sleep at least once.
    for (name, burst) in [("shared", &herd), ("exclusive", &exclusive)] {
        assert!(
            burst.csw >= CONNECTIONS,
            "{name}: {} voluntary context switches for {CONNECTIONS} connections, each served by \
             a worker that then slept: the counts are not the workers' threads'\n{}",
            burst.csw,
            burst.text
        );
    }
    // Three extra wake-ups per connection are expected; half that is far from none.
    assert!(
        herd.csw > exclusive.csw + CONNECTIONS * 3 / 2,
        "without --exclusive each connection should wake the other three workers too (about 3 \
         more context switches per connection, at least 1.5): {} vs {} for {CONNECTIONS} \
         connections\nshared: {}\nexclusive: {}",
        herd.csw,
        exclusive.csw,
        herd.text,
        exclusive.text
    );
}

struct Burst {
    /// Voluntary context switches over all workers during the burst.
    csw: u64,
    /// `wasted_wakeups` over all workers during the burst.
    wasted: u64,
    accepted: Vec<u64>,
    text: String,
}

/// Starts the server with 4 workers and `flags`, makes [`CONNECTIONS`] connections one after
/// another (one request each; each once every worker is asleep, so that each can wake them
/// all), and returns what `/stats` counted meanwhile.
fn burst(flags: &[&str]) -> Burst {
    let mut args = vec!["--workers", "4"];
    args.extend_from_slice(flags);
    let server = Server::start(BIN, &args);
    // One keep-alive connection reads /stats before and after: no new connection of its own.
    let mut asker = Client::connect(server.addr());
    let before = until_every_thread_is_bound(&mut asker);
    let workers = worker_threads(server.pid());
    assert_eq!(workers.len(), 4, "threads named worker-N: {workers:?}");
    for _ in 0..CONNECTIONS {
        until_all_asleep(server.pid(), &workers);
        let mut c = Client::connect(server.addr());
        c.request(GET_HELLO).assert_status(200);
        drop(c);
    }
    let (after, text) = stats(&mut asker);
    let delta = |field: &str| sum(&after, field) - sum(&before, field);
    let accepted = column(&after, "accepted");
    // The readiness probe, the asker, and the burst.
    assert_eq!(
        accepted.iter().sum::<u64>(),
        CONNECTIONS + 2,
        "accepted: {text}"
    );
    Burst {
        csw: delta("voluntary_csw"),
        wasted: delta("wasted_wakeups"),
        accepted,
        text,
    }
}

/// `/stats` once every worker thread has started (and so reports its context switches).
fn until_every_thread_is_bound(asker: &mut Client) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (stats, text) = stats(asker);
        let workers = stats
            .get("workers")
            .and_then(Value::as_array)
            .unwrap_or_default();
        if workers.iter().all(|w| w.get("voluntary_csw").is_some()) {
            return stats;
        }
        assert!(Instant::now() < deadline, "workers never started: {text}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// The thread ids of process `pid`'s threads named `worker-N`.
fn worker_threads(pid: u32) -> Vec<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the server's threads");
    tasks
        .filter_map(|task| {
            let path = task.ok()?.path();
            let name = std::fs::read_to_string(path.join("comm")).ok()?;
            name.starts_with("worker-").then_some(())?;
            path.file_name()?.to_str()?.parse().ok()
        })
        .collect()
}

/// Waits (up to 10 s) until every thread in `tids` is asleep (state S: in epoll_wait, for an
/// idle event loop).
fn until_all_asleep(pid: u32, tids: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let state = |tid: u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
        // After the parenthesised name: the state letter.
        stat[stat.rfind(')')? + 1..]
            .split_whitespace()
            .next()?
            .chars()
            .next()
    };
    while !tids.iter().all(|&tid| state(tid) == Some('S')) {
        let states: Vec<Option<char>> = tids.iter().map(|&tid| state(tid)).collect();
        assert!(
            Instant::now() < deadline,
            "the workers never all slept: states {states:?}"
        );
        thread::sleep(Duration::from_micros(200));
    }
}

fn stats(asker: &mut Client) -> (Value, String) {
    let text = asker.request(get("/stats")).body_text();
    match json::parse(&text) {
        Ok(stats) => (stats, text),
        Err(e) => panic!("/stats: {e}: {text}"),
    }
}

fn column(stats: &Value, field: &str) -> Vec<u64> {
    let column = blackbox::checks::per_worker(stats, field);
    assert_eq!(column.len(), 4, "/stats workers: {stats:?}");
    column
}

fn sum(stats: &Value, field: &str) -> u64 {
    column(stats, field).iter().sum()
}
