//! The journal across processes: a prefork server's workers share nothing but the journal's
//! files and mapping, yet a long poll held by one process is answered by a POST served by
//! another, and a job whose worker dies is taken over by another worker.

use std::thread;
use std::time::{Duration, Instant};

use blackbox::checks::{fetch_stats, get, json_body, per_worker, post_message, request_with_body};
use blackbox::json::Value;
use blackbox::{Client, Expect, ReadError, Server};

const BIN: &str = env!("CARGO_BIN_EXE_prefork");

/// Polls `probe` every few ms until it returns a value; fails after 10 s.
#[track_caller]
fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "waited 10 s for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// Long polls spread over three worker processes are all answered within 100 ms of a POST
/// served by one of them: an append wakes every process through the kernel (a futex in the
/// journal's shared mapping), not a timer. Best of three tries, for a loaded machine.
#[test]
fn a_long_poll_in_one_process_is_answered_by_a_post_in_another() {
    let server = Server::start(BIN, &["--workers", "3"]);
    let mut poster = Client::connect(server.addr());
    let mut worst = Vec::new();
    for _ in 0..3 {
        let seq = post_message(&mut poster, "warm-up");
        // Batches connected from several threads at once, until more than one worker holds
        // some (an idle server's connections tend to go to whichever worker is on a CPU).
        let addr = server.addr();
        let mut waiters: Vec<Client> = Vec::new();
        let mut spread = Vec::new();
        while waiters.len() < 96 && spread.iter().filter(|&&h| h > 0).count() < 2 {
            let connecting: Vec<_> = (0..12)
                .map(|_| {
                    thread::spawn(move || {
                        let mut c = Client::connect(addr);
                        c.send(get(&format!("/messages?after={seq}&wait=30s")));
                        c
                    })
                })
                .collect();
            waiters.extend(connecting.into_iter().map(|t| t.join().unwrap()));
            let want = waiters.len() as u64;
            spread = wait_for("the long polls held", || {
                let (stats, _) = fetch_stats(server.addr());
                let held = per_worker(&stats, "held");
                (held.iter().sum::<u64>() == want).then_some(held)
            });
        }
        assert!(
            spread.iter().filter(|&&h| h > 0).count() >= 2,
            "the long polls should be held by more than one process: {spread:?}"
        );
        poster.request(request_with_body("POST", "/messages", "", b"news"));
        let posted = Instant::now();
        let mut latest = Duration::ZERO;
        for c in &mut waiters {
            c.set_timeout(Duration::from_secs(5));
            let r = c.read_response();
            r.assert_status(200);
            latest = latest.max(posted.elapsed());
        }
        if latest < Duration::from_millis(100) {
            return;
        }
        worst.push(latest);
    }
    panic!("the last long poll was answered {worst:?} after the POST: expected < 100 ms");
}

/// A job runs in the worker that accepted it. SIGKILL that worker mid-job: after its lease
/// runs out, another worker takes the job over and runs it to the end (at least once), and
/// every worker answers for it.
#[test]
fn a_job_survives_the_death_of_its_worker() {
    let server = Server::start(BIN, &["--workers", "3", "--job-lease", "1s"]);
    let mut c = Client::connect(server.addr());
    let r = c.request(request_with_body("POST", "/jobs?sleep_ms=3000", "", b"x"));
    r.assert_status(202);
    let location = r.header("Location").unwrap_or_default().to_string();
    let owner = wait_for("the job to start", || {
        let job = json_body(&Client::connect(server.addr()).request(get(&location)));
        let running = job.get("status").and_then(Value::as_str) == Some("running");
        running
            .then(|| job.get("pid").and_then(Value::as_u64))
            .flatten()
    });
    // SAFETY: kill has no memory-safety preconditions; the pid is a worker of our server.
    unsafe { libc::kill(owner as libc::pid_t, libc::SIGKILL) };
    let started = Instant::now();
    let done = wait_for("the job to finish after its worker died", || {
        let job = json_body(&Client::connect(server.addr()).request(get(&location)));
        (job.get("status").and_then(Value::as_str) == Some("succeeded")).then_some(job)
    });
    let pid = done.get("pid").and_then(Value::as_u64);
    assert!(
        pid.is_some_and(|p| p != owner),
        "another process ran it: {done:?}"
    );
    assert_eq!(
        done.get("attempts").and_then(Value::as_u64),
        Some(2),
        "{done:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "taken over only after the 1 s lease ran out"
    );
    // Every worker answers for it: ask on many connections.
    for _ in 0..12 {
        let job = json_body(&Client::connect(server.addr()).request(get(&location)));
        assert_eq!(
            job.get("status").and_then(Value::as_str),
            Some("succeeded"),
            "{job:?}"
        );
    }
}

/// A blocking worker holds one connection at a time: two long polls take both workers, and the
/// next client waits in the accept queue until a long poll's wait runs out (and its
/// connection closes: a blocking worker is held by a connection, not only by a request).
#[test]
fn blocking_workers_each_hold_one_long_poll() {
    let server = Server::start(BIN, &["--mode", "blocking", "--workers", "2"]);
    let mut waiters: Vec<Client> = (0..2)
        .map(|_| {
            let mut c = Client::connect(server.addr());
            c.request(get("/")).assert_status(200);
            c.send(
                "GET /messages?after=0&wait=2s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            );
            c
        })
        .collect();
    let mut late = Client::connect(server.addr());
    late.send(get("/"));
    late.set_timeout(Duration::from_millis(700));
    match late.try_read_response(Expect::Body) {
        Err(ReadError::Timeout { received }) if received.is_empty() => {}
        other => panic!("both workers hold a long poll: the next client should wait: {other:?}"),
    }
    late.set_timeout(Duration::from_secs(10));
    late.read_response().assert_status(200);
    for c in &mut waiters {
        c.read_response().assert_status(200);
    }
}

/// A message posted to one process reaches the Server-Sent Events subscribers held by every
/// process.
#[test]
fn a_message_reaches_subscribers_in_every_process() {
    use blackbox::sse::Subscriber;
    let server = Server::start(BIN, &["--workers", "3"]);
    let addr = server.addr();
    let mut subscribers: Vec<Subscriber> = Vec::new();
    let mut spread = Vec::new();
    while subscribers.len() < 96 && spread.iter().filter(|&&h| h > 0).count() < 2 {
        let connecting: Vec<_> = (0..12)
            .map(|_| thread::spawn(move || Subscriber::connect(addr, "/events?type=message", "")))
            .collect();
        subscribers.extend(connecting.into_iter().map(|t| t.join().unwrap()));
        let want = subscribers.len() as u64;
        spread = wait_for("the subscribers held", || {
            let (stats, _) = fetch_stats(addr);
            let held = per_worker(&stats, "held");
            (held.iter().sum::<u64>() == want).then_some(held)
        });
    }
    assert!(
        spread.iter().filter(|&&h| h > 0).count() >= 2,
        "the subscribers should be held by more than one process: {spread:?}"
    );
    let seq = post_message(&mut Client::connect(addr), "to every process");
    for (i, s) in subscribers.iter_mut().enumerate() {
        let e = s
            .next_event(Duration::from_secs(5))
            .unwrap_or_else(|end| panic!("subscriber {i}: {end:?}"));
        assert_eq!(e.id, Some(seq.to_string()), "subscriber {i}: {e:?}");
    }
}

/// Exactly once across processes: 100 concurrent requests with one Idempotency-Key, spread
/// over three worker processes, create one job; every other reply is a 409 (the first still
/// waits) or a replay of the first reply.
#[test]
fn one_key_one_job_under_100_concurrent_requests() {
    use blackbox::checks::request_with_body;
    let server = Server::start(BIN, &["--workers", "3"]);
    let addr = server.addr();
    let post = request_with_body(
        "POST",
        "/jobs?sleep_ms=300",
        "Idempotency-Key: \"one-job\"\r\nPrefer: wait=5\r\n",
        b"",
    );
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(100));
    let replies: Vec<blackbox::Response> = (0..100)
        .map(|_| {
            let (post, barrier) = (post.clone(), barrier.clone());
            thread::spawn(move || {
                let mut c = Client::connect(addr);
                c.set_timeout(Duration::from_secs(20));
                barrier.wait();
                c.request(&post)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let mut ids = std::collections::HashSet::new();
    let (mut conflicts, mut replays, mut firsts) = (0, 0, 0);
    for r in &replies {
        match r.status {
            409 => conflicts += 1,
            200 | 202 => {
                ids.insert(
                    json_body(r)
                        .get("id")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                );
                match r.header("Idempotent-Replayed") {
                    Some("true") => replays += 1,
                    _ => firsts += 1,
                }
            }
            _ => panic!("unexpected reply: {r:?}"),
        }
    }
    assert_eq!(
        firsts, 1,
        "exactly one first reply ({conflicts} conflicts, {replays} replays)"
    );
    assert_eq!(ids.len(), 1, "one job: {ids:?}");
    // And the journal holds one job: replay every job event from the start.
    let mut events = blackbox::sse::Subscriber::connect(addr, "/events?type=job&after=0", "");
    let mut in_journal = std::collections::HashSet::new();
    while let Ok(e) = events.next_event(Duration::from_millis(500)) {
        let v = blackbox::json::parse(&e.data).expect("job event data");
        in_journal.insert(
            v.get("id")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        );
    }
    assert_eq!(in_journal, ids, "the journal's jobs");
}
