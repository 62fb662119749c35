//! What makes this the reuseport pattern: the kernel spreads connections over the workers'
//! listening sockets by a hash of each connection's addresses and ports, without asking anyone.

use std::collections::HashSet;
use std::io::ErrorKind;
use std::thread;
use std::time::{Duration, Instant};

use blackbox::checks::{GET_HELLO, fetch_stats, get};
use blackbox::json::Value;
use blackbox::{Client, Server};

const BIN: &str = env!("CARGO_BIN_EXE_reuseport");

/// 1000 short connections, each from its own source port, reach all 4 listening sockets, and
/// every one is counted once: the per-worker `accepted` add up to 1000, plus the `/stats`
/// connection and the harness's readiness probe.
#[test]
fn a_thousand_connections_reach_every_listener() {
    const N: u64 = 1000;
    let server = Server::start(BIN, &["--workers", "4"]);
    let mut ports = HashSet::new();
    for _ in 0..N {
        let mut c = Client::connect(server.addr());
        let port = c.stream().local_addr().expect("local address").port();
        ports.insert(port);
        c.request(GET_HELLO).assert_status(200);
        // The client closes first: its side keeps the port in TIME_WAIT, so the next
        // connection gets another one, and another hash.
    }
    assert_eq!(ports.len() as u64, N, "source ports should all differ");

    let (stats, text) = fetch_stats(server.addr());
    let accepted = column(&stats, "accepted");
    eprintln!("{N} connections: accepted per worker {accepted:?}");
    assert!(
        accepted.iter().all(|&a| a > 0),
        "every listener should get some of {N} connections: accepted {accepted:?}: {text}"
    );
    assert_eq!(
        accepted.iter().sum::<u64>(),
        N + 1 + Server::PROBE_CONNECTIONS,
        "accepted should add up to {N} + the /stats connection + the readiness probe: {text}"
    );
    assert_eq!(
        column(&stats, "requests").iter().sum::<u64>(),
        N + 1,
        "requests: {text}"
    );
}

/// The hash ignores load: while one worker is stuck in a 5 s `/block`, new connections hashed
/// to its socket wait in its queue, unanswered, while the other workers answer theirs at once.
/// Once the block ends, the waiting ones are served: queued, not lost.
#[test]
fn a_stalled_worker_stalls_its_share() {
    let server = Server::start(BIN, &["--workers", "4"]);
    let mut slow = Client::connect(server.addr());
    slow.request(GET_HELLO).assert_status(200);
    slow.send(get("/block?ms=5000"));
    wait_until_read(&slow);

    // With 40 connections, the chance that none hashes to the stalled worker is (3/4)^40, 1e-5.
    let sent = Instant::now();
    let mut conns: Vec<Client> = (0..40)
        .map(|_| {
            let mut c = Client::connect(server.addr());
            c.send(GET_HELLO);
            c
        })
        .collect();
    wait_for("a first reply from an idle worker", || {
        conns.iter().any(has_reply).then_some(())
    });
    // The observation itself: a second in, the stalled worker's share is still unanswered.
    thread::sleep(Duration::from_secs(1).saturating_sub(sent.elapsed()));
    let (answered, waiting): (Vec<usize>, Vec<usize>) =
        (0..conns.len()).partition(|&i| has_reply(&conns[i]));
    eprintln!(
        "one worker blocked: {} of {} connections answered, {} waiting",
        answered.len(),
        conns.len(),
        waiting.len()
    );
    assert!(
        !has_reply(&slow),
        "the /block?ms=5000 reply has come already: the test's premise failed"
    );
    assert!(
        !answered.is_empty() && !waiting.is_empty(),
        "during the block, expected some connections answered (the idle workers') and some \
         waiting (the blocked worker's share); answered {}, waiting {}",
        answered.len(),
        waiting.len()
    );

    slow.set_timeout(Duration::from_secs(10));
    slow.read_response().assert_status(200);
    for i in waiting {
        conns[i].set_timeout(Duration::from_secs(10));
        conns[i]
            .read_response()
            .assert_status(200)
            .assert_body("Hello, World!");
    }
}

/// Polls `probe` every few ms until it returns a value; fails after 3 s (well inside the 5 s
/// block, so that what follows still sees it).
#[track_caller]
fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "waited 3 s for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until the server has read all that `c` sent, so that the request is being handled:
/// first the server's kernel acknowledges the bytes (`c`'s send queue is empty), then they
/// leave its receive queue. Both queues are in /proc/net/tcp.
#[track_caller]
fn wait_until_read(c: &Client) {
    let me = c.stream().local_addr().expect("local address").port();
    let server = c.stream().peer_addr().expect("peer address").port();
    // (send queue, receive queue) of the established socket from port `from` to port `to`.
    let queues = |from: u16, to: u16| -> Option<(u64, u64)> {
        let table = std::fs::read_to_string("/proc/self/net/tcp").ok()?;
        let hex = |field: &str| u64::from_str_radix(field, 16).ok();
        let port = |addr: &str| hex(addr.rsplit(':').next()?);
        table.lines().skip(1).find_map(|line| {
            // sl local_address rem_address st tx_queue:rx_queue ...
            let f: Vec<&str> = line.split_whitespace().collect();
            let ends = (port(f.get(1)?)?, port(f.get(2)?)?);
            if ends != (u64::from(from), u64::from(to)) || *f.get(3)? != "01" {
                return None;
            }
            let (tx, rx) = f.get(4)?.split_once(':')?;
            Some((hex(tx)?, hex(rx)?))
        })
    };
    wait_for("the server to acknowledge the request", || {
        queues(me, server).filter(|&(sent, _)| sent == 0)
    });
    wait_for("a worker to read the request", || {
        queues(server, me).filter(|&(_, received)| received == 0)
    });
}

/// Whether a reply (any byte of one) has arrived, without waiting.
fn has_reply(c: &Client) -> bool {
    let stream = c.stream();
    stream.set_nonblocking(true).expect("set_nonblocking");
    let peeked = stream.peek(&mut [0u8; 1]);
    stream.set_nonblocking(false).expect("set_nonblocking");
    match peeked {
        Ok(n) => n > 0,
        Err(e) if e.kind() == ErrorKind::WouldBlock => false,
        Err(e) => panic!("peek: {e}"),
    }
}

fn column(stats: &Value, field: &str) -> Vec<u64> {
    let column = blackbox::checks::per_worker(stats, field);
    assert_eq!(column.len(), 4, "/stats workers: {stats:?}");
    column
}
