//! The connection policy, driven by a fake clock: every deadline `poll_timeout` names, and what
//! `handle_timeout` does when it passes. No sleeps: time is whatever the test says it is.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{common, t0};
use proto::{Config, Conn, Response, Timeouts};

const TIMEOUTS: Timeouts = Timeouts {
    header: Duration::from_secs(10),
    body: Duration::from_secs(20),
    idle: Duration::from_secs(60),
    send: Duration::from_secs(30),
    shutdown_grace: Duration::from_secs(1),
    linger: Duration::from_secs(2),
};

fn at(secs: f64) -> Instant {
    t0() + Duration::from_secs_f64(secs)
}

fn conn() -> Conn {
    let config = Config {
        timeouts: TIMEOUTS,
        ..Config::default()
    };
    Conn::new(Arc::new(config), at(0.0))
}

fn feed(conn: &mut Conn, bytes: &[u8], secs: f64) {
    conn.read_buf()[..bytes.len()].copy_from_slice(bytes);
    conn.filled(bytes.len(), at(secs));
}

/// Answers every complete request with 200 `ok`.
fn answer_all(conn: &mut Conn) -> usize {
    let mut n = 0;
    while let Some(req) = conn.next_request() {
        let id = req.id;
        conn.respond(id, Response::text(200, "ok"));
        n += 1;
    }
    n
}

/// Everything the connection has to say, as if the socket took all of it at `secs`.
fn flush(conn: &mut Conn, secs: f64) -> String {
    let out = String::from_utf8_lossy(conn.output(&common(), at(secs))).into_owned();
    conn.written(out.len(), at(secs));
    out
}

#[test]
fn an_idle_connection_closes_after_the_idle_timeout() {
    let mut c = conn();
    assert_eq!(c.poll_timeout(), Some(at(60.0)), "idle from the accept");
    feed(&mut c, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 5.0);
    assert_eq!(answer_all(&mut c), 1);
    assert!(flush(&mut c, 6.0).starts_with("HTTP/1.1 200"));
    assert_eq!(c.poll_timeout(), Some(at(66.0)), "idle from the last reply");
    c.handle_timeout(at(65.9));
    assert!(!c.is_finished());
    c.handle_timeout(at(66.0));
    assert!(c.is_finished() && !c.should_linger());
    assert_eq!(flush(&mut c, 66.0), "", "an idle close says nothing");
}

#[test]
fn a_head_must_arrive_within_the_header_timeout_of_its_first_byte() {
    let mut c = conn();
    feed(&mut c, b"GET / HTTP/1.1\r\n", 1.0);
    assert_eq!(c.poll_timeout(), Some(at(11.0)));
    // A header line every few seconds does not move the deadline (slowloris).
    for (i, secs) in [4.0, 7.0, 10.0].into_iter().enumerate() {
        feed(&mut c, format!("X-{i}: y\r\n").as_bytes(), secs);
        assert_eq!(c.poll_timeout(), Some(at(11.0)));
        c.handle_timeout(at(secs));
    }
    assert!(c.next_request().is_none());
    c.handle_timeout(at(11.0));
    assert!(flush(&mut c, 11.0).starts_with("HTTP/1.1 408"));
    assert!(c.is_finished() && c.should_linger());
}

#[test]
fn blank_lines_before_a_request_do_not_start_the_header_clock() {
    let mut c = conn();
    feed(&mut c, b"\r\n", 3.0);
    assert_eq!(c.poll_timeout(), Some(at(60.0)));
}

#[test]
fn a_body_must_keep_making_progress() {
    let mut c = conn();
    feed(
        &mut c,
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nab",
        1.0,
    );
    assert!(c.next_request().is_none());
    assert_eq!(c.poll_timeout(), Some(at(21.0)));
    feed(&mut c, b"cd", 15.0);
    assert_eq!(
        c.poll_timeout(),
        Some(at(35.0)),
        "progress moves the deadline"
    );
    c.handle_timeout(at(34.0));
    assert!(!c.is_finished());
    c.handle_timeout(at(35.0));
    assert!(flush(&mut c, 35.0).starts_with("HTTP/1.1 408"));
    assert!(c.is_finished());
}

#[test]
fn no_deadline_while_a_handler_works() {
    let mut c = conn();
    feed(&mut c, b"GET /work HTTP/1.1\r\nHost: a\r\n\r\n", 1.0);
    let id = c.next_request().unwrap().id;
    assert_eq!(
        c.poll_timeout(),
        None,
        "the application bounds its own work"
    );
    c.handle_timeout(at(1000.0));
    assert!(!c.is_finished());
    c.respond(id, Response::text(200, "done"));
    assert!(flush(&mut c, 1000.0).contains("done"));
    assert_eq!(c.poll_timeout(), Some(at(1060.0)));
}

#[test]
fn a_peer_that_stops_reading_is_closed_after_the_send_timeout() {
    let mut c = conn();
    feed(&mut c, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 1.0);
    answer_all(&mut c);
    let out = c.output(&common(), at(2.0)).len();
    assert!(out > 10);
    assert_eq!(c.poll_timeout(), Some(at(32.0)));
    c.written(5, at(20.0));
    assert_eq!(
        c.poll_timeout(),
        Some(at(50.0)),
        "the socket took some: progress"
    );
    c.handle_timeout(at(50.0));
    assert!(
        c.is_finished() && !c.should_linger(),
        "aborted: nothing can reach the peer"
    );
}

#[test]
fn shutdown_gives_a_silent_connection_a_grace_to_send_its_first_request() {
    // Nothing arrives: closed at the end of the grace.
    let mut c = conn();
    c.stop_reading(at(5.0));
    assert_eq!(c.poll_timeout(), Some(at(6.0)));
    c.handle_timeout(at(5.5));
    assert!(!c.is_finished());
    c.handle_timeout(at(6.0));
    assert!(c.is_finished());

    // The request arrives within the grace: answered, with `Connection: close`.
    let mut c = conn();
    c.stop_reading(at(5.0));
    feed(&mut c, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 5.5);
    assert_eq!(answer_all(&mut c), 1);
    let out = flush(&mut c, 5.6);
    assert!(out.contains("Connection: close\r\n"), "{out}");
    assert!(c.is_finished());
}

#[test]
fn shutdown_closes_a_connection_idle_between_requests_at_once() {
    let mut c = conn();
    feed(&mut c, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 1.0);
    answer_all(&mut c);
    flush(&mut c, 1.0);
    c.stop_reading(at(2.0));
    assert!(c.is_finished());
}

#[test]
fn a_lingering_close_drains_until_eof_or_the_linger_timeout() {
    let mut c = conn();
    feed(&mut c, b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HT", 1.0);
    let first = c.next_request().unwrap().id;
    // A bad second request, with bytes after it that will never be read.
    feed(&mut c, b"TP/2.0\r\nHost: a\r\n\r\nleftover", 1.0);
    assert!(c.next_request().is_none());
    c.respond(first, Response::text(200, "ok"));
    let out = flush(&mut c, 2.0);
    assert!(out.contains("505"), "{out}");
    assert!(c.is_finished() && c.should_linger());
    c.begin_linger(at(2.0));
    assert!(!c.is_finished() && c.wants_read() && !c.should_linger());
    assert_eq!(c.poll_timeout(), Some(at(4.0)));
    feed(&mut c, b"more bytes nobody reads", 3.0);
    assert!(c.next_request().is_none());
    c.handle_timeout(at(4.0));
    assert!(c.is_finished());

    // The peer closing ends the lingering early.
    let mut c = conn();
    feed(&mut c, b"GET / HTTP/2.0\r\n\r\n", 1.0);
    assert!(c.next_request().is_none());
    flush(&mut c, 1.0);
    c.begin_linger(at(1.0));
    c.read_eof();
    assert!(c.is_finished());
}

/// The blocking driver's way between requests: no buffer held while waiting, the bytes read
/// elsewhere copied in, with the time they came (a head's timeout runs from its first byte).
#[test]
fn bytes_read_elsewhere_are_copied_in() {
    let mut c = conn();
    assert!(!c.holds_input(), "no buffer before the first byte");
    c.fill_from(b"GET /a HTTP/1.1\r\nHo", at(1.0));
    assert!(c.holds_input() && c.next_request().is_none());
    assert_eq!(
        c.poll_timeout(),
        Some(at(11.0)),
        "header timeout from the first byte"
    );
    // A head bigger than the pool's buffer: copied in as the buffer grows.
    let big = format!("st: a\r\nX-Big: {}\r\n\r\n", "b".repeat(9000));
    c.fill_from(big.as_bytes(), at(2.0));
    let req = c.next_request().expect("the whole head");
    assert_eq!(req.target, "/a");
    assert_eq!(req.header("x-big").map(<[u8]>::len), Some(9000));
    let id = req.id;
    c.respond(id, Response::text(200, "ok"));
    flush(&mut c, 2.0);
    c.release_buffers();
    assert!(!c.holds_input() && c.buffer_bytes() == 0);
    c.fill_from(b"", at(3.0));
    assert!(!c.holds_input(), "nothing read, nothing taken");
}

#[test]
fn an_idle_connection_holds_no_buffer() {
    let mut c = conn();
    assert_eq!(c.buffer_bytes(), 0, "nothing before the first byte");
    feed(
        &mut c,
        b"GET / HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n",
        1.0,
    );
    answer_all(&mut c);
    flush(&mut c, 1.0);
    assert!(c.buffer_bytes() > 0);
    c.release_buffers();
    assert_eq!(c.buffer_bytes(), 0);

    // A head half received keeps its buffer, and so does output the peer has not taken.
    feed(&mut c, b"GET / HTTP/1.1\r\nHo", 2.0);
    c.release_buffers();
    assert!(c.buffer_bytes() >= 4096);
    feed(&mut c, b"st: a\r\n\r\n", 2.0);
    answer_all(&mut c);
    let n = c.output(&common(), at(2.0)).len();
    c.written(n / 2, at(2.0));
    c.release_buffers();
    assert!(c.buffer_bytes() > 0);
    c.written(n - n / 2, at(2.0));
    c.release_buffers();
    assert_eq!(c.buffer_bytes(), 0);
}
