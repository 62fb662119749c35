//! What makes this pattern: one dispatch thread does the I/O, and each request goes to an idle
//! worker, so a light request never waits behind a heavy one while a worker is free.
//!
//! The other side of the contrast, that `single-thread` without `--offload` makes the same
//! requests wait, is asserted in `crates/single-thread/tests/blackbox.rs` with the same
//! measurement ([`blackbox::checks::heavy_delays_hello`], > 150 ms there). Here the contrast is
//! made inside this server: with `--workers 1` there is no idle worker, and `GET /` queues
//! behind the work, which is the same lesson without depending on another crate's build.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use blackbox::checks::{GET_HELLO, HELLO, fetch_stats, get, post_echo};
use blackbox::json::Value;
use blackbox::{Client, Server};

const BIN: &str = env!("CARGO_BIN_EXE_load-balanced");

const HEAVY: &str = "/work?us=100000";

/// The same measurement single-thread's tests make (> 150 ms there without `--offload`).
#[test]
fn a_heavy_request_does_not_delay_hello() {
    // Best of three, so one scheduling hiccup on a busy machine does not fail the test.
    let best = (0..3)
        .map(|_| blackbox::checks::heavy_delays_hello(BIN, &["--workers", "2"], "/work?us=200000"))
        .min()
        .expect("three measurements");
    assert!(
        best < Duration::from_millis(50),
        "GET / took {best:?} (best of 3) while one worker burned 200 ms: expected the idle \
         worker to answer it (< 50 ms)"
    );
}

/// The pattern's defining test: with 2 workers, while one connection keeps `/work?us=100000`
/// running back to back, `GET /` on other connections keeps completing well under 50 ms.
#[test]
fn idle_worker_answers_hello_while_another_works_back_to_back() {
    let server = Server::start(BIN, &["--workers", "2"]);
    let run = light_during_heavy(server.addr(), 40);
    run.assert_heavy_kept_running();
    let (median, under_50) = (run.median(), run.share_under(Duration::from_millis(50)));
    assert!(
        median < Duration::from_millis(10) && under_50 >= 0.9,
        "GET / next to back-to-back 100 ms jobs: median {median:?}, {:.0}% under 50 ms; \
         expected the idle worker to answer (median < 10 ms, ≥ 90% under 50 ms).\n{run:?}",
        under_50 * 100.0
    );
    // Both workers ran requests (the work moves between them: the next job, heavy or light,
    // goes to whichever went idle last).
    let (stats, text) = fetch_stats(server.addr());
    let executed: Vec<u64> = workers(&stats)[1..]
        .iter()
        .map(|w| field(w, "executed"))
        .collect();
    assert!(
        executed.iter().all(|&n| n > 0),
        "every worker should have run requests: {text}"
    );
}

/// The contrast: with one worker, busy with the work, `GET /` has no idle worker and waits in
/// the queue for the job in front of it, as it would on single-thread.
#[test]
fn with_no_idle_worker_hello_waits_in_the_queue() {
    let server = Server::start(BIN, &["--workers", "1"]);
    // Each waits about 100 ms: a dozen make the point.
    let run = light_during_heavy(server.addr(), 12);
    run.assert_heavy_kept_running();
    let median = run.median();
    assert!(
        median > Duration::from_millis(30),
        "with its one worker busy, GET / should wait for the work (median > 30 ms), but the \
         median was {median:?}.\n{run:?}"
    );
    let (stats, text) = fetch_stats(server.addr());
    assert!(
        field(&workers(&stats)[0], "queued") > 0,
        "the dispatch thread should have queued requests: {text}"
    );
}

/// `--inline-cheap`: the dispatch thread answers `GET /` itself (as RAMCloud answers ping), so
/// even the one worker being busy does not delay it; only the work reaches the worker.
#[test]
fn inline_cheap_answers_hello_on_the_dispatch_thread() {
    let server = Server::start(BIN, &["--workers", "1", "--inline-cheap"]);
    let run = light_during_heavy(server.addr(), 40);
    run.assert_heavy_kept_running();
    let (median, under_50) = (run.median(), run.share_under(Duration::from_millis(50)));
    assert!(
        median < Duration::from_millis(10) && under_50 >= 0.9,
        "with --inline-cheap, GET / next to 100 ms jobs: median {median:?}, {:.0}% under 50 ms; \
         expected the dispatch thread to answer (median < 10 ms, ≥ 90% under 50 ms).\n{run:?}",
        under_50 * 100.0
    );
    let (stats, text) = fetch_stats(server.addr());
    let slots = workers(&stats);
    let light = run.light.len() as u64 + LIGHT_CONNECTIONS as u64; // + the warm-up GETs
    assert_eq!(
        field(&slots[0], "executed"),
        light,
        "the dispatch slot should have answered every GET /: {text}"
    );
    assert_eq!(
        field(&slots[1], "executed"),
        run.heavy_total,
        "worker-1 should have run the work, and only the work: {text}"
    );
}

/// Replies leave in request order though the workers finish them out of order: behind a slow
/// job, pipelined light requests finish first on the other workers, and wait their turn.
#[test]
fn pipelined_replies_leave_in_order_though_workers_finish_out_of_order() {
    let server = Server::start(BIN, &["--workers", "3"]);
    let mut c = Client::connect(server.addr());
    for round in 0..5 {
        let mut batch = get("/work?us=20000").into_bytes();
        batch.extend_from_slice(GET_HELLO);
        batch.extend(post_echo(format!("echo {round}").as_bytes()));
        batch.extend(get("/nope").into_bytes());
        batch.extend(get("/work?us=1000").into_bytes());
        c.send(&batch);
        c.read_response().assert_status(200);
        c.read_response().assert_status(200).assert_body(HELLO);
        c.read_response()
            .assert_status(200)
            .assert_body(format!("echo {round}"));
        c.read_response().assert_status(404);
        let last = c.read_response();
        last.assert_status(200);
        assert!(
            last.body_text().starts_with("worked 1000 us"),
            "round {round}: the fifth reply should answer /work?us=1000:\n{last:?}"
        );
    }
}

/// The hand-off under stress over HTTP: many tiny requests, workers that sleep at once
/// (`--spin-us 0`, so nearly every hand-off races a worker going to sleep), pipelined batches
/// that overflow into the queue. Every reply arrives and is right, and `/stats` accounts for
/// every request exactly once.
#[test]
fn many_tiny_requests_with_spin_0_all_complete_and_add_up() {
    const CLIENTS: usize = 8;
    const BATCHES: usize = 300;
    const PIPELINED: usize = 8;
    let server = Server::start(BIN, &["--workers", "4", "--spin-us", "0"]);
    let addr = server.addr();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            thread::spawn(move || {
                let mut c = Client::connect(addr);
                c.set_timeout(Duration::from_secs(10));
                for b in 0..BATCHES {
                    // One request alone (a worker must be woken for it), then a pipelined batch.
                    c.request(GET_HELLO).assert_status(200).assert_body(HELLO);
                    let mut batch = Vec::new();
                    for k in 0..PIPELINED {
                        batch.extend(post_echo(format!("{i}/{b}/{k}").as_bytes()));
                    }
                    c.send(&batch);
                    for k in 0..PIPELINED {
                        c.read_response()
                            .assert_status(200)
                            .assert_body(format!("{i}/{b}/{k}"));
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.join()
            .expect("a client failed (its panic is printed above)");
    }
    let (stats, text) = fetch_stats(addr);
    let slots = workers(&stats);
    let sent = (CLIENTS * BATCHES * (1 + PIPELINED)) as u64;
    let requests = field(&slots[0], "requests");
    assert_eq!(
        requests,
        sent + 1,
        "the dispatch thread should count every request, /stats included: {text}"
    );
    // The /stats request is counted as executed only after its document was made.
    let executed: u64 = slots.iter().map(|w| field(w, "executed")).sum();
    assert_eq!(
        executed, sent,
        "each request should have run exactly once: {text}"
    );
    let woken: u64 = slots.iter().map(|w| field(w, "woken")).sum();
    assert!(
        woken > 0,
        "with --spin-us 0 workers sleep and are woken: {text}"
    );
    assert!(
        field(&slots[0], "queued") > 0,
        "pipelined batches of 8 over 4 workers should have queued some: {text}"
    );
    let used = slots[1..]
        .iter()
        .filter(|w| field(w, "executed") > 0)
        .count();
    assert!(
        used >= 2,
        "8 busy clients should keep several workers busy: {text}"
    );
}

/// `ps -T` shows the pattern: a `dispatch` thread and `worker-1..N`.
#[test]
fn threads_are_named_by_role() {
    let server = Server::start(BIN, &["--workers", "3"]);
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", server.pid()))
        .expect("list the server's threads")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect();
    names.sort();
    for role in ["dispatch", "worker-1", "worker-2", "worker-3"] {
        assert!(
            names.iter().any(|n| n == role),
            "no thread named {role}: {names:?}"
        );
    }
}

// ---- helpers -----------------------------------------------------------------------------------

const LIGHT_CONNECTIONS: usize = 3;

/// What [`light_during_heavy`] saw.
#[derive(Debug)]
struct Run {
    /// Each `GET /`'s latency, in the order sent.
    light: Vec<Duration>,
    /// Heavy requests completed while the light ones ran.
    heavy_done: u64,
    /// Heavy requests completed in all.
    heavy_total: u64,
    window: Duration,
}

impl Run {
    fn median(&self) -> Duration {
        let mut sorted = self.light.clone();
        sorted.sort();
        sorted[sorted.len() / 2]
    }

    fn share_under(&self, limit: Duration) -> f64 {
        let under = self.light.iter().filter(|&&d| d < limit).count();
        under as f64 / self.light.len() as f64
    }

    /// The light requests really ran next to the work: from before one job ended to after the
    /// next one did.
    fn assert_heavy_kept_running(&self) {
        assert!(
            self.heavy_done >= 2,
            "only {} heavy requests completed in {:?}: the measurement did not overlap the work",
            self.heavy_done,
            self.window
        );
    }
}

/// One connection sends `HEAVY` back to back; once its first job is done, `GET /` goes out on
/// the other connections, one at a time, a few ms apart (so each lands at a different point of
/// a job), for at least 1.2 s, `at_least` requests and two more completed jobs (a loaded
/// machine stretches the jobs; 30 s at most).
fn light_during_heavy(addr: SocketAddr, at_least: usize) -> Run {
    let mut light: Vec<Client> = (0..LIGHT_CONNECTIONS)
        .map(|_| {
            let mut c = Client::connect(addr);
            // Accepted and served once, so the timed requests pay no first-connection costs.
            c.request(GET_HELLO).assert_status(200).assert_body(HELLO);
            c.set_timeout(Duration::from_secs(10));
            c
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let heavy_done = Arc::new(AtomicU64::new(0));
    let heavy = {
        let (stop, done) = (stop.clone(), heavy_done.clone());
        let mut c = Client::connect(addr);
        c.set_timeout(Duration::from_secs(20));
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                c.request(get(HEAVY)).assert_status(200);
                done.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // Measure from the end of the first job on: from then on a job is always running (the
    // heavy client sends the next as soon as a reply arrives).
    let deadline = Instant::now() + Duration::from_secs(10);
    while heavy_done.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "the first {HEAVY} took over 10 s"
        );
        thread::sleep(Duration::from_millis(1));
    }
    let start = Instant::now();
    let done_before = heavy_done.load(Ordering::Relaxed);
    let mut latencies = Vec::new();
    let jobs_done = || heavy_done.load(Ordering::Relaxed) - done_before;
    while (latencies.len() < at_least
        || start.elapsed() < Duration::from_millis(1200)
        || jobs_done() < 2)
        && start.elapsed() < Duration::from_secs(30)
    {
        let c = &mut light[latencies.len() % LIGHT_CONNECTIONS];
        let sent = Instant::now();
        let r = c.request(GET_HELLO);
        latencies.push(sent.elapsed());
        r.assert_status(200).assert_body(HELLO);
        // Pacing, not synchronization: the next request lands at another point of a job.
        thread::sleep(Duration::from_millis(7));
    }
    let window = start.elapsed();
    let done = jobs_done();
    stop.store(true, Ordering::Relaxed);
    heavy.join().expect("the heavy client failed");
    Run {
        light: latencies,
        heavy_done: done,
        heavy_total: heavy_done.load(Ordering::Relaxed),
        window,
    }
}

fn workers(stats: &Value) -> &[Value] {
    let slots = stats.get("workers").and_then(Value::as_array);
    slots.unwrap_or_else(|| panic!("/stats has no workers array: {stats:?}"))
}

fn field(slot: &Value, name: &str) -> u64 {
    let n = slot.get(name).and_then(Value::as_u64);
    n.unwrap_or_else(|| panic!("a /stats slot has no numeric {name}: {slot:?}"))
}
