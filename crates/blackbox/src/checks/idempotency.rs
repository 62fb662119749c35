//! Idempotency keys on `POST /messages` and `POST /jobs`: a retry gets the first reply again
//! and nothing is done twice; a different request with the same key is 422, one while the
//! first still runs 409, a malformed key 400.

use std::thread;
use std::time::Duration;

use super::app::{json_body, request_with_body};
use super::{get, with};
use crate::client::{Client, Response};
use crate::json::Value;
use crate::server::{Server, describe_exit, fresh_data_dir};

fn keyed(method: &str, target: &str, key: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    request_with_body(
        method,
        target,
        &format!("Idempotency-Key: {key}\r\n{extra}"),
        body,
    )
}

#[track_caller]
fn assert_replay_of(first: &Response, retry: &Response) {
    assert_eq!(
        (
            retry.status,
            &retry.body,
            retry.header("Location"),
            retry.header("Content-Type")
        ),
        (
            first.status,
            &first.body,
            first.header("Location"),
            first.header("Content-Type")
        ),
        "a retry gets the first reply again:\nfirst {first:?}\nretry {retry:?}"
    );
    assert_eq!(
        retry.header("Idempotent-Replayed"),
        Some("true"),
        "{retry:?}"
    );
    assert_eq!(first.header("Idempotent-Replayed"), None, "{first:?}");
}

/// The number of messages with this body.
fn count_messages(c: &mut Client, body: &str) -> usize {
    let v = json_body(&c.request(get("/messages?after=0&limit=1000")));
    let list = v.get("messages").and_then(Value::as_array).unwrap_or(&[]);
    list.iter()
        .filter(|m| m.get("body").and_then(Value::as_str) == Some(body))
        .count()
}

/// A retry with the same key and request gets the first reply (status, body, Location,
/// Content-Type) and `Idempotent-Replayed: true`; the message or the job exists once.
pub fn idempotency_replays_the_first_reply(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut c = Client::connect(server.addr());
    let post = keyed("POST", "/messages", "\"msg-key-1\"", "", b"only once");
    let first = c.request(&post);
    first.assert_status(201);
    let retry = c.request(&post);
    assert_replay_of(&first, &retry);
    assert_eq!(count_messages(&mut c, "only once"), 1);

    let post = keyed("POST", "/jobs?sleep_ms=1", "job-key:1", "", b"in");
    let first = c.request(&post);
    first.assert_status(202);
    let retry = Client::connect(server.addr()).request(&post);
    assert_replay_of(&first, &retry);
}

/// The same key with a different request: 422, as `application/problem+json`, and nothing done.
pub fn idempotency_different_request_is_422(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut c = Client::connect(server.addr());
    c.request(keyed("POST", "/messages", "\"k\"", "", b"first"))
        .assert_status(201);
    let r = c.request(keyed("POST", "/messages", "\"k\"", "", b"second"));
    r.assert_status(422);
    assert_eq!(
        r.header("Content-Type"),
        Some("application/problem+json"),
        "{r:?}"
    );
    assert_eq!(count_messages(&mut c, "second"), 0);
    let r = c.request(keyed("POST", "/jobs?sleep_ms=1", "\"k\"", "", b""));
    r.assert_status(422);
}

/// The same key while the first request still waits (`Prefer: wait`): 409; once it has its
/// reply, a retry gets that reply.
pub fn idempotency_in_flight_is_409(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let post = keyed(
        "POST",
        "/jobs?sleep_ms=1500",
        "\"slow\"",
        "Prefer: wait=20\r\n",
        b"",
    );
    let addr = server.addr();
    let first_post = post.clone();
    let first = thread::spawn(move || {
        let mut c = Client::connect(addr);
        c.set_timeout(Duration::from_secs(20));
        c.request(&first_post)
    });
    // Until the first request holds the key: its job exists.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (stats, text) = super::fetch_stats(addr);
        let jobs = stats.get("jobs");
        let n = |k| {
            jobs.and_then(|j| j.get(k))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        if n("queued") + n("running") > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no job after 10 s: {text}"
        );
        thread::sleep(Duration::from_millis(10));
    }
    let mut c = Client::connect(addr);
    let conflict = c.request(&post);
    conflict.assert_status(409);
    assert_eq!(
        conflict.header("Content-Type"),
        Some("application/problem+json"),
        "{conflict:?}"
    );
    let first = first.join().expect("the first request");
    first.assert_status(200);
    let retry = c.request(&post);
    assert_replay_of(&first, &retry);
}

/// A malformed key is 400; with `--require-idempotency-key`, so is a missing one.
pub fn idempotency_bad_or_missing_key_is_400(bin: &str, args: &[&str]) {
    let server = Server::start(bin, &with(args, &["--require-idempotency-key"]));
    let mut c = Client::connect(server.addr());
    let long = format!("\"{}\"", "x".repeat(256));
    for key in [
        "1starts-with-a-digit",
        "\"unterminated",
        "\"bad \\n escape\"",
        &long,
    ] {
        let r = c.request(keyed("POST", "/messages", key, "", b"x"));
        assert_eq!(r.status, 400, "key {key:?}: {r:?}");
        assert_eq!(
            r.header("Content-Type"),
            Some("application/problem+json"),
            "{r:?}"
        );
    }
    let r = c.request(request_with_body("POST", "/messages", "", b"x"));
    assert_eq!(
        r.status, 400,
        "no key with --require-idempotency-key: {r:?}"
    );
    c.request(keyed("POST", "/messages", "ok-key", "", b"x"))
        .assert_status(201);
    // Other routes do not need one.
    c.request(get("/messages")).assert_status(200);
}

/// A retry after the server restarted (same journal) still gets the first reply, and the
/// message exists once.
pub fn idempotency_survives_a_restart(bin: &str, args: &[&str]) {
    let dir = fresh_data_dir();
    let dir_arg = dir.display().to_string();
    let args = with(args, &["--data-dir", &dir_arg]);
    let post = keyed("POST", "/messages", "\"across-restarts\"", "", b"kept once");
    let first = {
        let mut server = Server::start(bin, &args);
        let first = Client::connect(server.addr()).request(&post);
        first.assert_status(201);
        server.signal(libc::SIGTERM);
        let status = server.wait_exit(Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "{}",
            status.map_or("still running".into(), describe_exit)
        );
        first
    };
    let server = Server::start(bin, &args);
    let mut c = Client::connect(server.addr());
    let retry = c.request(&post);
    assert_replay_of(&first, &retry);
    assert_eq!(count_messages(&mut c, "kept once"), 1);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
