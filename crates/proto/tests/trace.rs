//! `Config::trace`: every request's timeline reaches the hook once its reply is fully written,
//! in order, with its method, target, status and reply size; nothing when off.

mod common;

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use common::{common, t0};
use proto::{Config, Conn, Response, Trace};

thread_local! {
    static SEEN: RefCell<Vec<Trace>> = const { RefCell::new(Vec::new()) };
}

fn record(t: &Trace) {
    SEEN.with_borrow_mut(|seen| seen.push(t.clone()));
}

fn taken() -> Vec<Trace> {
    SEEN.with_borrow_mut(std::mem::take)
}

fn feed(c: &mut Conn, input: &[u8]) {
    c.read_buf()[..input.len()].copy_from_slice(input);
    c.filled(input.len(), std::time::Instant::now());
}

#[test]
fn each_reply_written_reports_its_timeline() {
    let config = Config {
        trace: Some(record),
        ..Config::default()
    };
    let mut c = Conn::new(Arc::new(config), t0());
    feed(
        &mut c,
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
    );
    let a = c.next_request().unwrap().id;
    let b = c.next_request().unwrap().id;
    std::thread::sleep(Duration::from_millis(2));
    c.respond(b, Response::text(201, "bee"));
    c.respond(a, Response::text(200, "a"));
    let out = c.output(&common(), t0()).to_vec();
    let first_len = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4 + 1;
    // The first reply all but its last byte: nothing reported yet.
    c.written(first_len - 1, std::time::Instant::now());
    assert!(taken().is_empty());
    c.written(1, std::time::Instant::now());
    let first = taken();
    assert_eq!(first.len(), 1);
    assert_eq!(
        (
            first[0].method.as_str(),
            first[0].target.as_str(),
            first[0].status
        ),
        ("GET", "/a", 200)
    );
    assert_eq!(first[0].bytes_out, first_len as u64);
    c.written(out.len() - first_len, std::time::Instant::now());
    let second = taken();
    assert_eq!(second.len(), 1);
    let t = &second[0];
    assert_eq!(
        (t.method.as_str(), t.target.as_str(), t.status, t.request),
        ("POST", "/b", 201, 1)
    );
    assert_eq!(t.bytes_out, (out.len() - first_len) as u64);
    assert_eq!(t.conn, first[0].conn);
    let handled = t.handled.expect("filed");
    assert!(
        t.accepted <= t.first_byte && t.first_byte <= t.parsed,
        "{t:?}"
    );
    assert!(
        t.parsed <= t.received && t.received <= handled && handled <= t.written,
        "{t:?}"
    );
    assert!(handled - t.received >= Duration::from_millis(2), "{t:?}");
}

#[test]
fn off_by_default_and_errors_are_traced_when_on() {
    let mut c = Conn::new(Arc::new(Config::default()), t0());
    feed(&mut c, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let id = c.next_request().unwrap().id;
    c.respond(id, Response::text(200, "ok"));
    let n = c.output(&common(), t0()).len();
    c.written(n, t0());
    assert!(taken().is_empty());

    let config = Config {
        trace: Some(record),
        ..Config::default()
    };
    let mut c = Conn::new(Arc::new(config), t0());
    feed(&mut c, b"GET / HTTP/9.9\r\nHost: x\r\n\r\n");
    assert!(c.next_request().is_none());
    let n = c.output(&common(), t0()).len();
    c.written(n, std::time::Instant::now());
    let seen = taken();
    assert_eq!(seen.len(), 1);
    assert_eq!((seen[0].method.as_str(), seen[0].status), ("", 505));
}
