//! What makes this the dispatcher pattern: one acceptor decides where each connection goes, so
//! the spread over workers is exactly what the policy says.

use std::thread;
use std::time::{Duration, Instant};

use blackbox::checks::{GET_HELLO, get};
use blackbox::json::{self, Value};
use blackbox::{Client, Server};

const BIN: &str = env!("CARGO_BIN_EXE_dispatcher");
const WORKERS: usize = 4;

/// Round-robin, 4 workers, 400 connections held open: 100 per worker.
///
/// Counting every connection the server sees, in the order the acceptor takes them (the
/// kernel's accept queue is FIFO, and each connect below returns before the next begins):
/// - #0 is the harness's readiness probe (opened and closed at start): worker 0;
/// - #1..=#400 are the held connections: workers 1, 2, 3, 0, 1, ... so 100 each;
/// - #401 is the connection that asks for `/stats`: worker 401 % 4 = 1, open while it asks.
///
/// So `open` must read exactly [100, 101, 100, 100] and `accepted` [101, 101, 100, 100]. The
/// acceptor may still be handing out, and worker 0 may not yet have seen the probe close,
/// when the first `/stats` is answered: the test asks again on the same connection (which
/// changes nothing) until the numbers are exact, or fails after 10 s showing the last answer.
#[test]
fn round_robin_holds_exactly_100_per_worker() {
    let server = Server::start(BIN, &["--workers", "4"]);
    let held: Vec<Client> = (0..400).map(|_| Client::connect(server.addr())).collect();
    let mut asker = Client::connect(server.addr());
    let (open, accepted, text) = wait_for(&mut asker, |s| {
        per_worker(s, "open") == [100, 101, 100, 100]
    });
    assert_eq!(open, [100, 101, 100, 100], "open per worker: {text}");
    assert_eq!(
        accepted,
        [101, 101, 100, 100],
        "accepted per worker: {text}"
    );
    drop(held);
}

/// Least-connections: after one worker's connections all close, new connections go to it.
/// Round-robin, under the same steps, keeps spreading them evenly.
#[test]
fn least_connections_refills_the_emptied_worker() {
    let (emptied, owners) = empty_one_worker_then_connect(&["--policy", "least-connections"], 8);
    assert!(
        owners.iter().all(|&w| w == emptied),
        "least-connections: the 8 new connections went to workers {owners:?}; expected all to \
         worker {emptied}, whose connections had all closed"
    );
}

#[test]
fn round_robin_ignores_the_emptied_worker() {
    let (emptied, owners) = empty_one_worker_then_connect(&[], 8);
    let mut counts = [0; WORKERS];
    owners.iter().for_each(|&w| counts[w] += 1);
    assert_eq!(
        counts, [2; WORKERS],
        "round-robin: the 8 new connections went to workers {owners:?} (worker {emptied} was \
         empty); expected 2 each"
    );
}

/// At `--max-conns` the acceptor stops accepting: the next connection waits in the kernel's
/// accept queue, unanswered, and is served as soon as an open one closes.
#[test]
fn max_conns_leaves_the_rest_in_the_backlog() {
    let server = Server::start(BIN, &["--workers", "2", "--max-conns", "4"]);
    let mut held: Vec<Client> = (0..4)
        .map(|_| {
            let mut c = Client::connect(server.addr());
            c.request(GET_HELLO).assert_status(200);
            c
        })
        .collect();
    // The handshake completes in the kernel; the acceptor must not take it.
    let mut waiting = Client::connect(server.addr());
    waiting.send(GET_HELLO);
    waiting.set_timeout(Duration::from_millis(500));
    match waiting.try_read_response(blackbox::Expect::Body) {
        Err(blackbox::ReadError::Timeout { .. }) => {}
        other => panic!("a 5th connection at --max-conns 4 should wait unanswered: {other:?}"),
    }
    held.pop();
    waiting.set_timeout(Duration::from_secs(10));
    waiting
        .read_response()
        .assert_status(200)
        .assert_body("Hello, World!");
}

/// Starts the server with `--workers 4` and `policy`, holds 40 connections (10 per worker),
/// closes every connection of one worker, then opens `n` new ones. Returns that worker and the
/// worker each new connection went to.
///
/// One keep-alive connection (the "asker", one of the 40) fetches every `/stats`, so no other
/// connection comes and goes. Each new connection makes one request, so its worker has taken
/// it by then; the worker whose `accepted` grew by one is the one it went to.
fn empty_one_worker_then_connect(policy: &[&str], n: usize) -> (usize, Vec<usize>) {
    let mut args = vec!["--workers", "4"];
    args.extend_from_slice(policy);
    let server = Server::start(BIN, &args);
    let addr = server.addr();
    let mut asker = Client::connect(addr);
    // Wait until the readiness probe has been taken and its close seen: then only the asker
    // is open.
    let (open, mut accepted, _) = wait_for(&mut asker, |s| {
        total(s, "accepted") == 2 && total(s, "open") == 1
    });
    let asker_on = open
        .iter()
        .position(|&o| o == 1)
        .expect("the asker's worker");

    let mut held: Vec<(Client, usize)> = Vec::new();
    for _ in 1..40 {
        held.push(connect_and_locate(addr, &mut asker, &mut accepted));
    }
    let (open, _, text) = fetch(&mut asker);
    assert_eq!(
        open, [10; WORKERS],
        "40 connections should be 10 per worker: {text}"
    );

    // Close every connection of a worker other than the asker's.
    let emptied = (asker_on + 1) % WORKERS;
    held.retain(|(_, w)| *w != emptied);
    let (_, after, _) = wait_for(&mut asker, |s| per_worker(s, "open")[emptied] == 0);
    accepted = after;

    let mut owners = Vec::new();
    for _ in 0..n {
        let (c, w) = connect_and_locate(addr, &mut asker, &mut accepted);
        held.push((c, w));
        owners.push(w);
    }
    (emptied, owners)
}

/// Opens a connection, makes one request on it, and finds its worker from `/stats`.
fn connect_and_locate(
    addr: std::net::SocketAddr,
    asker: &mut Client,
    accepted: &mut [u64; WORKERS],
) -> (Client, usize) {
    let mut c = Client::connect(addr);
    c.request(GET_HELLO).assert_status(200);
    let (_, now, text) = fetch(asker);
    let grew: Vec<usize> = (0..WORKERS).filter(|&i| now[i] != accepted[i]).collect();
    assert!(
        grew.len() == 1 && now[grew[0]] == accepted[grew[0]] + 1,
        "one new connection should add one `accepted` to one worker; before {accepted:?}: {text}"
    );
    *accepted = now;
    (c, grew[0])
}

/// Asks for `/stats` on `asker` until `done` holds (or 10 s pass); returns the last answer's
/// open and accepted per worker, and its text.
fn wait_for(
    asker: &mut Client,
    done: impl Fn(&Value) -> bool,
) -> ([u64; WORKERS], [u64; WORKERS], String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = asker.request(get("/stats"));
        let text = r.body_text();
        let stats = json::parse(&text).unwrap_or_else(|e| panic!("/stats: {e}: {text}"));
        if done(&stats) || Instant::now() > deadline {
            return (
                per_worker(&stats, "open"),
                per_worker(&stats, "accepted"),
                text,
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn fetch(asker: &mut Client) -> ([u64; WORKERS], [u64; WORKERS], String) {
    wait_for(asker, |_| true)
}

fn per_worker(stats: &Value, field: &str) -> [u64; WORKERS] {
    let workers = stats
        .get("workers")
        .and_then(Value::as_array)
        .unwrap_or_default();
    assert_eq!(workers.len(), WORKERS, "/stats workers: {stats:?}");
    std::array::from_fn(|i| {
        workers[i]
            .get(field)
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("worker {i} has no `{field}`: {stats:?}"))
    })
}

fn total(stats: &Value, field: &str) -> u64 {
    per_worker(stats, field).iter().sum()
}
