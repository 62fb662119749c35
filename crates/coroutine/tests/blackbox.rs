//! The shared black-box suite against the coroutine server, plus the tests of what makes it
//! this pattern: many connections on few threads, and its caveat, a blocking call inside a
//! coroutine blocks the carrier thread with every coroutine queued on it.

use std::time::Duration;

use blackbox::checks::{GET_HELLO, HELLO, fetch_stats, sum_over_workers};
use blackbox::json::Value;
use blackbox::{Client, Server};

const BIN: &str = env!("CARGO_BIN_EXE_coroutine");

blackbox::suite!(BIN);

/// may's known caveat, shown rather than hidden: `/block` sleeps in `std::thread::sleep`,
/// which parks the worker thread itself, so with one worker a `GET /` on another connection
/// waits for the sleep to end.
#[test]
fn block_stalls_the_carrier_thread() {
    let latency = blackbox::checks::heavy_delays_hello(BIN, &["--workers", "1"], "/block?ms=300");
    assert!(
        latency > Duration::from_millis(200),
        "GET / took {latency:?} while /block?ms=300 slept on the only worker thread: \
         expected it to wait (> 200 ms)"
    );
}

/// 500 keep-alive connections open at once on one worker thread each get three requests
/// answered, round by round: 500 coroutines, not 500 threads.
#[test]
fn serves_500_connections_on_one_worker_thread() {
    const CONNECTIONS: usize = 500;
    const ROUNDS: usize = 3;
    let server = Server::start(BIN, &["--workers", "1"]);
    let mut clients: Vec<Client> = (0..CONNECTIONS)
        .map(|_| {
            let mut c = Client::connect(server.addr());
            c.set_timeout(Duration::from_secs(20));
            c
        })
        .collect();
    for round in 0..ROUNDS {
        // Every request is sent before any reply is read, so all 500 are served concurrently.
        for c in &mut clients {
            c.send(GET_HELLO);
        }
        for (i, c) in clients.iter_mut().enumerate() {
            let r = c.read_response();
            assert!(
                r.status == 200 && r.body == HELLO.as_bytes(),
                "connection {i}, round {round}:\n{r:?}"
            );
            r.assert_keeps_alive();
        }
    }
    let threads = thread_names(server.pid()).len();
    assert!(
        threads < 20,
        "{threads} threads serve {CONNECTIONS} connections: expected a handful (main, may's \
         worker and timer), not one per connection"
    );
    let (stats, text) = fetch_stats(server.addr());
    let workers = stats
        .get("workers")
        .and_then(Value::as_array)
        .unwrap_or_default();
    assert_eq!(workers.len(), 1, "one may worker, one /stats slot: {text}");
    assert_eq!(
        sum_over_workers(&stats, "requests"),
        (CONNECTIONS * ROUNDS + 1) as u64,
        "{text}"
    );
}

/// With two workers, connections spread over both: each has a home worker (the one whose epoll
/// watches its socket), and /stats counts them there.
#[test]
fn connections_spread_over_the_workers() {
    const CONNECTIONS: usize = 100;
    let server = Server::start(BIN, &["--workers", "2"]);
    let mut clients: Vec<Client> = (0..CONNECTIONS)
        .map(|_| Client::connect(server.addr()))
        .collect();
    for c in &mut clients {
        c.request(GET_HELLO).assert_status(200);
    }
    let (stats, text) = fetch_stats(server.addr());
    let workers = stats
        .get("workers")
        .and_then(Value::as_array)
        .unwrap_or_default();
    assert_eq!(workers.len(), 2, "{text}");
    for w in workers {
        let accepted = w.get("accepted").and_then(Value::as_u64).unwrap_or(0);
        assert!(
            accepted >= CONNECTIONS as u64 / 4,
            "each of 2 workers should be home to a fair share of {CONNECTIONS} connections: {text}"
        );
    }
}

/// With `--max-conns 2` and two connections open, a third waits in the backlog, unanswered,
/// until one of the two closes.
#[test]
fn at_max_conns_a_connection_waits_in_the_backlog() {
    let server = Server::start(BIN, &["--max-conns", "2"]);
    blackbox::checks::next_connection_waits_at_the_bound(&server, 2);
}

/// may pins its workers to cores by default; this server pins them only with `--pin`. Either
/// way the workers are named `may-worker-N`.
#[test]
fn workers_pinned_only_with_pin() {
    for (args, pinned) in [
        (&["--workers", "2"][..], false),
        (&["--workers", "2", "--pin"], true),
    ] {
        let server = Server::start(BIN, args);
        let pid = server.pid();
        let process_cpus = cpus_allowed(pid, pid);
        let workers: Vec<(u32, String)> = thread_names(pid)
            .into_iter()
            .filter(|(_, name)| name.starts_with("may-worker-"))
            .collect();
        assert_eq!(workers.len(), 2, "threads named may-worker-N with {args:?}");
        for (tid, name) in workers {
            let cpus = cpus_allowed(pid, tid);
            if pinned {
                assert!(
                    !cpus.contains(['-', ',']),
                    "{name} with --pin may run on CPUs {cpus}: expected one"
                );
            } else {
                assert_eq!(
                    cpus, process_cpus,
                    "{name} without --pin should run wherever the process may"
                );
            }
        }
    }
}

/// The threads of process `pid`: id and name, as `ps -T` lists them.
fn thread_names(pid: u32) -> Vec<(u32, String)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the server's /proc");
    tasks
        .filter_map(|task| {
            let path = task.ok()?.path();
            let tid = path.file_name()?.to_str()?.parse().ok()?;
            let name = std::fs::read_to_string(path.join("comm")).ok()?;
            Some((tid, name.trim_end().to_string()))
        })
        .collect()
}

/// The CPUs thread `tid` of `pid` may run on, e.g. `0-1` or `1`.
fn cpus_allowed(pid: u32, tid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
        .expect("the thread's status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list")
        .trim()
        .to_string()
}
