//! The shared black-box suite against the thread-per-connection server, plus the tests of what
//! makes it this pattern: every open connection holds a thread of its own, and at the thread
//! bound new connections wait in the backlog until a thread frees up.

use std::time::Duration;

use blackbox::checks::{GET_HELLO, HELLO, fetch_stats, sum_over_workers};
use blackbox::{Client, Server};

const BIN: &str = env!("CARGO_BIN_EXE_thread-per-connection");

blackbox::suite!(BIN);

/// 500 keep-alive connections open at once each get three requests answered, round by round,
/// so all 500 are served concurrently; the server runs a `conn-N` thread for each of them.
#[test]
fn serves_500_concurrent_keep_alive_connections() {
    const CONNECTIONS: usize = 500;
    const ROUNDS: usize = 3;
    let server = Server::start(BIN, &[]);
    let mut clients: Vec<Client> = (0..CONNECTIONS)
        .map(|_| {
            let mut c = Client::connect(server.addr());
            c.set_timeout(Duration::from_secs(20));
            c
        })
        .collect();
    for round in 0..ROUNDS {
        // Every request is sent before any reply is read: a connection whose thread is not
        // serving it yet would make this round wait, and time out.
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
    let threads = conn_threads(server.pid());
    assert!(
        threads >= CONNECTIONS,
        "{threads} conn-N threads with {CONNECTIONS} connections open: expected one each"
    );

    let (stats, text) = fetch_stats(server.addr());
    assert_eq!(
        sum_over_workers(&stats, "requests"),
        (CONNECTIONS * ROUNDS + 1) as u64,
        "{text}"
    );
    assert!(
        sum_over_workers(&stats, "threads") >= CONNECTIONS as u64,
        "/stats should count a thread per connection: {text}"
    );
}

/// With `--max-threads 2` and two connections held open, a third connection is not served: it
/// waits in the backlog. It is served once one of the two closes.
#[test]
fn at_the_bound_a_connection_waits_for_a_free_thread() {
    let server = Server::start(BIN, &["--max-threads", "2"]);
    // Both held connections served, so both threads are taken (the probe's is done).
    let mut open = blackbox::checks::next_connection_waits_at_the_bound(&server, 2);
    // The other held connection is still served; then both close.
    open[0].request(GET_HELLO).assert_status(200);
    drop(open);

    let (stats, text) = fetch_stats(server.addr());
    assert_eq!(sum_over_workers(&stats, "threads"), 2, "{text}");
}

/// How many threads of process `pid` are pool threads (`conn-N`), as `ps -T` would list them.
fn conn_threads(pid: u32) -> usize {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the server's /proc");
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("conn-"))
        .count()
}

/// A long poll holds its thread for as long as it waits: `--max-threads 3` long polls take
/// every thread, and the next client waits in the backlog until a long poll's wait runs out and
/// its connection closes. (An event loop holds 10,000 for a few MB: this pattern's lesson.)
#[test]
fn held_long_polls_take_every_thread() {
    let server = Server::start(BIN, &["--max-threads", "3"]);
    let mut waiters: Vec<Client> = (0..3)
        .map(|_| {
            let mut c = Client::connect(server.addr());
            c.request(GET_HELLO).assert_status(200);
            c.send(
                "GET /messages?after=0&wait=2s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            );
            c
        })
        .collect();
    let mut late = Client::connect(server.addr());
    late.send(GET_HELLO);
    late.set_timeout(Duration::from_millis(700));
    match late.try_read_response(blackbox::Expect::Body) {
        Err(blackbox::ReadError::Timeout { received }) if received.is_empty() => {}
        other => panic!(
            "three long polls hold all three threads: the next client should wait: {other:?}"
        ),
    }
    late.set_timeout(Duration::from_secs(10));
    late.read_response().assert_status(200).assert_body(HELLO);
    for c in &mut waiters {
        c.read_response().assert_status(200);
    }
}
