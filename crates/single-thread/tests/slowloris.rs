//! Slowloris against the event loop: 1,000 connections each send a request line, then one more
//! header line every second, never finishing the head. `--header-timeout` runs from a head's
//! first byte, not its last, so each gets 408 and is closed once the timeout has passed since
//! it began, however busily it trickles; meanwhile an ordinary client is served at once.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use blackbox::checks::GET_HELLO;
use blackbox::{Client, Server};

const BIN: &str = env!("CARGO_BIN_EXE_single-thread");
const SLOW: usize = 1000;
const HEADER_TIMEOUT: Duration = Duration::from_secs(3);

/// Reads what has arrived without waiting: `None` if nothing yet, else the bytes and whether
/// the server closed after them.
fn poll_reply(s: &mut TcpStream) -> Option<(Vec<u8>, bool)> {
    s.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
            Err(_) => break true,
        }
    };
    (!got.is_empty() || closed).then_some((got, closed))
}

#[test]
fn trickled_heads_get_408_at_the_header_timeout_while_others_are_served() {
    let server = Server::start(BIN, &["--header-timeout", "3s"]);
    let mut slow = Vec::with_capacity(SLOW);
    for _ in 0..SLOW {
        let mut s = TcpStream::connect(server.addr()).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: slowloris\r\n")
            .unwrap();
        slow.push(s);
    }
    // The last head began now; the first a little earlier.
    let began = Instant::now();
    let mut normal = Client::connect(server.addr());
    let mut worst = Duration::ZERO;
    let mut line = 0;
    // Trickle a header line per connection every second until just before the timeout, and
    // serve an ordinary client all the while.
    let stop_at = HEADER_TIMEOUT - Duration::from_millis(300);
    while began.elapsed() < stop_at {
        line += 1;
        for s in &mut slow {
            // A connection the server already closed would show up in the checks below.
            let _ = s.write_all(format!("X-Line-{line}: still here\r\n").as_bytes());
        }
        let next_line = Instant::now() + Duration::from_secs(1);
        while Instant::now() < next_line && began.elapsed() < stop_at {
            let t = Instant::now();
            let r = normal.request(GET_HELLO);
            r.assert_status(200);
            worst = worst.max(t.elapsed());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert!(
        worst < Duration::from_millis(500),
        "an ordinary request waited {worst:?} behind {SLOW} trickling connections"
    );
    // Before the timeout, no trickling connection has an answer.
    let early = slow.iter_mut().filter_map(poll_reply).count();
    assert_eq!(early, 0, "connections answered before --header-timeout");
    // After it: each got 408 and was closed, though it sent a line less than a second ago
    // (a timeout counted from the last byte would close them about a second later still).
    let deadline = began + HEADER_TIMEOUT + Duration::from_secs(5);
    let mut pending: Vec<usize> = (0..SLOW).collect();
    let mut replies = vec![Vec::new(); SLOW];
    while !pending.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        pending.retain(|&i| match poll_reply(&mut slow[i]) {
            Some((bytes, closed)) => {
                replies[i].extend_from_slice(&bytes);
                !closed
            }
            None => true,
        });
    }
    let all_closed = began.elapsed();
    assert!(
        pending.is_empty(),
        "{} trickling connections still open {all_closed:?} after their heads began",
        pending.len()
    );
    assert!(
        all_closed < HEADER_TIMEOUT + Duration::from_millis(1500),
        "the last trickling connection was closed {all_closed:?} after its head began: the \
         header timeout runs from the head's first byte"
    );
    for (i, reply) in replies.iter().enumerate() {
        assert!(
            reply.starts_with(b"HTTP/1.1 408 "),
            "connection {i} got {:?}",
            String::from_utf8_lossy(reply)
        );
    }
    // And ordinary clients are still served.
    Client::connect(server.addr())
        .request(GET_HELLO)
        .assert_status(200);
}
