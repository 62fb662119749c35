//! The shared black-box suite against the work-stealing server, plus what makes this pattern:
//! work spreads over every worker by itself; inline heavy work stalls a worker and what is
//! queued on it, unless it is offloaded to the blocking pool; `--max-conns` holds connections
//! in the backlog.

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use blackbox::checks::{GET_HELLO, HELLO, fetch_stats, get, heavy_delays_hello};
use blackbox::json::Value;
use blackbox::{Client, Expect, ReadError, Server};

const BIN: &str = env!("CARGO_BIN_EXE_work-stealing");

blackbox::suite!(BIN, ["--workers", "2"]);

/// With one worker, `/work` runs on it and every other task waits: a concurrent `GET /` is
/// delayed by the whole 200 ms.
#[test]
fn inline_work_stalls_the_worker() {
    // The worst of up to three: the claim is that the stall happens, and one run on a busy
    // machine may see the GET parsed before the work starts.
    let mut seen = Vec::new();
    for _ in 0..3 {
        let latency = heavy_delays_hello(BIN, &["--workers", "1"], "/work?us=200000");
        seen.push(latency);
        if latency > Duration::from_millis(150) {
            return;
        }
    }
    panic!(
        "GET / took {seen:?} while the only worker burned 200 ms of CPU inline: expected it to \
         wait (> 150 ms)"
    );
}

/// With `--offload`, `/work` runs on tokio's blocking pool and the worker stays free.
#[test]
fn offloaded_work_leaves_the_worker_free() {
    // Best of three, so one scheduling hiccup on a busy 2-core machine does not fail the test.
    let best = (0..3)
        .map(|_| heavy_delays_hello(BIN, &["--workers", "1", "--offload"], "/work?us=200000"))
        .min()
        .expect("three measurements");
    assert!(
        best < Duration::from_millis(50),
        "GET / took {best:?} (best of 3) with --offload: expected the worker to stay free (< 50 ms)"
    );
}

/// Many concurrent keep-alive connections on two workers: both workers serve requests (the
/// runtime spreads the tasks; nobody assigns them), and the per-worker counts add up.
#[test]
fn both_workers_serve_requests() {
    const CLIENTS: usize = 64;
    const REQUESTS: usize = 100;
    let server = Server::start(BIN, &["--workers", "2"]);
    let addr = server.addr();
    let start = Arc::new(Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let start = Arc::clone(&start);
            thread::spawn(move || -> Result<(), String> {
                let connected = Client::try_connect(addr, Duration::from_secs(10));
                start.wait();
                let mut c = connected.map_err(|e| format!("client {i}: connect: {e}"))?;
                for j in 0..REQUESTS {
                    c.try_send(GET_HELLO)
                        .map_err(|e| format!("client {i} #{j}: send: {e}"))?;
                    let r = c
                        .try_read_response(Expect::Body)
                        .map_err(|e| format!("client {i} #{j}: {e}"))?;
                    if r.status != 200 || r.body != HELLO.as_bytes() {
                        return Err(format!("client {i} #{j}:\n{r:?}"));
                    }
                }
                Ok(())
            })
        })
        .collect();
    for t in clients {
        if let Err(e) = t.join().expect("client thread") {
            panic!("{e}");
        }
    }

    let (stats, text) = fetch_stats(addr);
    let workers = stats
        .get("workers")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("/stats has no workers: {text}"));
    assert_eq!(workers.len(), 2, "two workers in /stats: {text}");
    let field = |w: &Value, name: &str| {
        w.get(name)
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("a worker has no `{name}`: {text}"))
    };
    let requests: Vec<u64> = workers.iter().map(|w| field(w, "requests")).collect();
    assert!(
        requests.iter().all(|&n| n > 0),
        "both workers should have served requests, got {requests:?}: {text}"
    );
    assert_eq!(
        requests.iter().sum::<u64>(),
        (CLIENTS * REQUESTS + 1) as u64,
        "each request counted once, on one worker: {text}"
    );
    // `open` is decremented in the slot it was incremented in: no slot can wrap below zero.
    let accepted: u64 = workers.iter().map(|w| field(w, "accepted")).sum();
    for w in workers {
        assert!(
            field(w, "open") <= accepted,
            "a worker's open wrapped: {text}"
        );
    }
    let migrated: u64 = workers.iter().map(|w| field(w, "migrated_in")).sum();
    assert!(migrated <= requests.iter().sum::<u64>(), "{text}");
}

/// `ps -T` shows the pattern: `worker-N` threads, and with `--offload`, `offload-N` threads
/// once tokio's blocking pool ran a job.
#[test]
fn threads_are_named_by_role() {
    let server = Server::start(BIN, &["--workers", "2", "--offload"]);
    let mut c = Client::connect(server.addr());
    c.request(get("/work?us=1000")).assert_status(200);
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", server.pid()))
        .expect("read /proc/PID/task")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect();
    names.sort();
    for want in ["worker-0", "worker-1", "offload-0"] {
        assert!(
            names.iter().any(|n| n == want),
            "no thread named {want}: {names:?}"
        );
    }
    assert!(
        !names.iter().any(|n| n == "worker-2"),
        "--workers 2 but a third worker thread: {names:?}"
    );
}

/// At `--max-conns`, a new connection waits in the kernel's accept queue, unanswered, until
/// an open one closes; then it is served.
#[test]
fn max_conns_holds_new_connections_in_the_backlog() {
    let server = Server::start(BIN, &["--workers", "2", "--max-conns", "1"]);
    let mut first = Client::connect(server.addr());
    first.request(GET_HELLO).assert_status(200);

    let mut second = Client::connect(server.addr());
    second.send(GET_HELLO);
    second.set_timeout(Duration::from_millis(500));
    match second.try_read_response(Expect::Body) {
        Err(ReadError::Timeout { received }) if received.is_empty() => {}
        other => panic!("at --max-conns 1 a second connection should wait unanswered: {other:?}"),
    }

    drop(first);
    let freed = Instant::now();
    second.set_timeout(Duration::from_secs(5));
    match second.try_read_response(Expect::Body) {
        Ok(r) => {
            r.assert_status(200).assert_body(HELLO);
        }
        Err(e) => panic!(
            "the waiting connection was not served {:?} after the first closed: {e}",
            freed.elapsed()
        ),
    }
}
