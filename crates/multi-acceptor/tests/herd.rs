//! What makes this the multi-acceptor pattern, and its flaw: four workers sleep on one listening
//! socket, so without `--exclusive` every new connection wakes all of them (the thundering
//! herd). With EPOLLEXCLUSIVE the kernel wakes one.
//!
//! The herd shows in the workers' voluntary context switches, not in `wasted_wakeups`: epoll
//! checks readiness again before it returns, so a worker woken for a connection another worker
//! already took usually goes back to sleep inside the kernel, never reaching `accept()`. Every
//! such wake-up is still a context switch of that worker's thread (crates/runtime/tests/herd.rs
//! measured ~1000 vs ~207 for 200 connections over 4 loops).

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
    assert!(
        herd.csw >= 2 * exclusive.csw,
        "without --exclusive the workers should switch context at least twice as often as with \
         it: {} vs {}\nshared: {}\nexclusive: {}",
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
/// another (one request each, a short gap between them so that every woken worker has gone
/// back to sleep before the next), and returns what `/stats` counted meanwhile.
fn burst(flags: &[&str]) -> Burst {
    let mut args = vec!["--workers", "4"];
    args.extend_from_slice(flags);
    let server = Server::start(BIN, &args);
    // One keep-alive connection reads /stats before and after: no new connection of its own.
    let mut asker = Client::connect(server.addr());
    let before = until_every_thread_is_bound(&mut asker);
    for _ in 0..CONNECTIONS {
        let mut c = Client::connect(server.addr());
        c.request(GET_HELLO).assert_status(200);
        drop(c);
        thread::sleep(Duration::from_millis(2));
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
