//! The application's requests that do not finish at once, on the shared journal: messages with
//! short and long polling, async jobs, held requests at shutdown, and the journal across a
//! restart. Every pattern must hold a waiting request and answer it when the journal moves.

use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{CLOSE_WITHIN, get, with};
use crate::client::{Client, Expect, ReadError, Response};
use crate::json::{self, Value};
use crate::server::{Server, describe_exit, fresh_data_dir};

/// An HTTP/1.1 request with a body.
pub fn request_with_body(method: &str, target: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "{method} {target} HTTP/1.1\r\nHost: blackbox\r\nContent-Length: {}\r\n{headers}\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// `POST /messages` with `text`; returns its seq (asserting 201).
pub fn post_message(c: &mut Client, text: &str) -> u64 {
    let r = c.request(request_with_body("POST", "/messages", "", text.as_bytes()));
    r.assert_status(201);
    let v = json_body(&r);
    v.get("seq")
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("POST /messages should answer {{\"seq\": N}}:\n{r:?}"))
}

/// The reply's body as JSON (panics, showing the reply, if it is not).
pub fn json_body(r: &Response) -> Value {
    json::parse(&r.body_text()).unwrap_or_else(|e| panic!("not JSON ({e}):\n{r:?}"))
}

/// The bodies of the `messages` of a `GET /messages` reply, and its `head`.
fn messages(r: &Response) -> (u64, Vec<String>) {
    let v = json_body(r);
    let head = v.get("head").and_then(Value::as_u64);
    let list = v.get("messages").and_then(Value::as_array);
    let (Some(head), Some(list)) = (head, list) else {
        panic!("GET /messages should answer {{\"head\": H, \"messages\": [...]}}:\n{r:?}");
    };
    let bodies = list
        .iter()
        .map(|m| {
            let body = m.get("body").and_then(Value::as_str);
            body.unwrap_or_else(|| panic!("a message without a body: {r:?}"))
                .to_string()
        })
        .collect();
    (head, bodies)
}

#[track_caller]
fn assert_no_store(r: &Response) {
    assert_eq!(
        r.header("Cache-Control"),
        Some("no-store"),
        "replies about the journal must not be cached:\n{r:?}"
    );
}

/// Waits `wait` for a reply that must not come; panics if one does.
#[track_caller]
fn assert_held(c: &mut Client, wait: Duration, what: &str) {
    c.set_timeout(wait);
    match c.try_read_response(Expect::Body) {
        Err(ReadError::Timeout { received }) if received.is_empty() => {}
        other => panic!("{what} should be held, got: {other:?}"),
    }
}

/// Messages are appended and read back after a seq, in order, with `limit`: short polling.
pub fn messages_short_poll(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut c = Client::connect(server.addr());
    let seqs: Vec<u64> = ["first", "second", "third ünïcödé"]
        .iter()
        .map(|t| post_message(&mut c, t))
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "seqs grow: {seqs:?}");
    let r = c.request(get("/messages?after=0"));
    r.assert_status(200);
    assert_no_store(&r);
    let (head, bodies) = messages(&r);
    assert_eq!(bodies, ["first", "second", "third ünïcödé"], "{r:?}");
    assert!(
        head >= seqs[2],
        "head {head} is at least the last seq {seqs:?}"
    );
    let r = c.request(get(&format!("/messages?after={}&limit=1", seqs[0])));
    assert_eq!(messages(&r).1, ["second"], "{r:?}");
}

/// A long poll is held while there is nothing after its seq, counted as held in `/stats`, and
/// answered with the message as soon as another connection posts one.
pub fn messages_long_poll(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut poster = Client::connect(server.addr());
    let before = post_message(&mut poster, "before");
    let mut waiter = Client::connect(server.addr());
    waiter.send(get(&format!("/messages?after={before}&wait=30s")));
    assert_held(
        &mut waiter,
        Duration::from_millis(300),
        "a long poll with nothing new",
    );
    let (stats, text) = super::fetch_stats(server.addr());
    let held = stats.get("total").and_then(|t| t.get("held"));
    assert!(
        held.and_then(Value::as_u64).unwrap_or(0) >= 1,
        "/stats should count the long poll as held: {text}"
    );
    let posted = Instant::now();
    post_message(&mut poster, "news");
    waiter.set_timeout(Duration::from_secs(5));
    let r = waiter.read_response();
    r.assert_status(200);
    assert_no_store(&r);
    assert_eq!(messages(&r).1, ["news"], "{r:?}");
    assert!(
        posted.elapsed() < Duration::from_secs(5),
        "the long poll took {:?} after the POST",
        posted.elapsed()
    );
    r.assert_keeps_alive();
}

/// A long poll that nothing answers returns an empty list when its wait runs out; one for a
/// seq beyond the head (a client ahead of a restarted server) is answered at once.
pub fn messages_long_poll_times_out(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut c = Client::connect(server.addr());
    let seq = post_message(&mut c, "only");
    let asked = Instant::now();
    c.set_timeout(Duration::from_secs(10));
    let r = c.request(get(&format!("/messages?after={seq}&wait=1s")));
    let took = asked.elapsed();
    assert!(messages(&r).1.is_empty(), "{r:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(8),
        "a 1 s long poll answered after {took:?}"
    );
    let asked = Instant::now();
    let r = c.request(get(&format!("/messages?after={}&wait=30s", seq + 1000)));
    let (head, bodies) = messages(&r);
    assert!(bodies.is_empty() && head >= seq, "{r:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "after beyond the head should answer at once, took {:?}",
        asked.elapsed()
    );
}

/// Bad input on the message routes gets a status saying what is wrong.
pub fn messages_reject_bad_input(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut c = Client::connect(server.addr());
    let big = vec![b'x'; 64 * 1024 + 1];
    for (request, status) in [
        (request_with_body("POST", "/messages", "", &big), 413),
        (request_with_body("POST", "/messages", "", b"\xff\xfe"), 400),
        (get("/messages?after=abc").into_bytes(), 400),
        (get("/messages?limit=0").into_bytes(), 400),
        (get("/messages?wait=forever").into_bytes(), 400),
        (request_with_body("PUT", "/messages", "", b""), 405),
    ] {
        let r = c.request(&request);
        assert_eq!(
            r.status,
            status,
            "{}\n{r:?}",
            String::from_utf8_lossy(&request[..request.len().min(60)])
        );
    }
}

/// `POST /jobs` answers 202 with `Location` and `Retry-After`; the job runs on a job worker and
/// a long poll of its `Location` returns its final state with the result.
pub fn job_runs_and_is_polled(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut c = Client::connect(server.addr());
    let r = c.request(request_with_body(
        "POST",
        "/jobs?work_us=2000",
        "",
        b"input",
    ));
    r.assert_status(202);
    assert!(
        r.header("Retry-After").is_some(),
        "202 says when to poll:\n{r:?}"
    );
    let location = r
        .header("Location")
        .unwrap_or_else(|| panic!("202 has a Location:\n{r:?}"))
        .to_string();
    let v = json_body(&r);
    let id = v.get("id").and_then(Value::as_str).unwrap_or_default();
    assert!(
        location == format!("/jobs/{id}")
            && v.get("status").and_then(Value::as_str) == Some("queued"),
        "{r:?}"
    );
    c.set_timeout(Duration::from_secs(15));
    let r = c.request(get(&format!("{location}?wait=10s")));
    r.assert_status(200);
    assert_no_store(&r);
    let v = json_body(&r);
    assert_eq!(
        v.get("status").and_then(Value::as_str),
        Some("succeeded"),
        "{r:?}"
    );
    let times: Vec<u64> = ["created_ms", "started_ms", "finished_ms"]
        .iter()
        .map(|k| v.get(k).and_then(Value::as_u64).unwrap_or(0))
        .collect();
    assert!(
        times[0] > 0 && times[0] <= times[1] && times[1] <= times[2],
        "created <= started <= finished: {r:?}"
    );
    let result = v.get("result");
    assert_eq!(
        result
            .and_then(|r| r.get("input_bytes"))
            .and_then(Value::as_u64),
        Some(5),
        "the result says the job read its 5-byte input: {r:?}"
    );
    assert!(
        r.header("Retry-After").is_none(),
        "a finished job: no Retry-After\n{r:?}"
    );
}

/// `Prefer: wait=N` (RFC 7240): 200 with the final state if the job finishes in time, else 202
/// when the wait runs out. A queued or running job can be canceled once; then 409.
pub fn job_prefer_wait_and_cancel(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut c = Client::connect(server.addr());
    c.set_timeout(Duration::from_secs(15));
    let r = c.request(request_with_body(
        "POST",
        "/jobs?sleep_ms=10",
        "Prefer: wait=10\r\n",
        b"",
    ));
    r.assert_status(200);
    assert_eq!(
        json_body(&r).get("status").and_then(Value::as_str),
        Some("succeeded"),
        "{r:?}"
    );

    let asked = Instant::now();
    let r = c.request(request_with_body(
        "POST",
        "/jobs?sleep_ms=60000",
        "Prefer: wait=1\r\n",
        b"",
    ));
    r.assert_status(202);
    assert!(
        asked.elapsed() >= Duration::from_millis(900),
        "Prefer: wait=1 on a 60 s job answers 202 after about 1 s, not {:?}",
        asked.elapsed()
    );
    let location = r.header("Location").unwrap_or_default().to_string();
    let delete = format!("DELETE {location} HTTP/1.1\r\nHost: blackbox\r\n\r\n");
    let r = c.request(&delete);
    r.assert_status(200);
    assert_eq!(
        json_body(&r).get("status").and_then(Value::as_str),
        Some("canceled"),
        "{r:?}"
    );
    let r = c.request(&delete);
    r.assert_status(409);
    let r = c.request(get(&location));
    assert_eq!(
        json_body(&r).get("status").and_then(Value::as_str),
        Some("canceled"),
        "{r:?}"
    );
}

/// Bad job requests: what is wrong, as `application/problem+json`.
pub fn job_rejects_bad_input(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut c = Client::connect(server.addr());
    for (request, status) in [
        (request_with_body("POST", "/jobs", "", b""), 400),
        (
            request_with_body("POST", "/jobs?work_us=1&sleep_ms=1", "", b""),
            400,
        ),
        (request_with_body("POST", "/jobs?work_us=-3", "", b""), 400),
        (
            request_with_body("POST", "/jobs?sleep_ms=1", "Prefer: wait=soon\r\n", b""),
            400,
        ),
        (get("/jobs/999999").into_bytes(), 404),
        (get("/jobs/not-a-job").into_bytes(), 404),
        (request_with_body("DELETE", "/jobs/999999", "", b""), 404),
    ] {
        let r = c.request(&request);
        assert_eq!(
            r.status,
            status,
            "{}\n{r:?}",
            String::from_utf8_lossy(&request)
        );
        assert_eq!(
            r.header("Content-Type"),
            Some("application/problem+json"),
            "{r:?}"
        );
    }
    c.request(get("/jobs")).assert_status(405);
}

/// Long polls held on 8 connections are all answered by one POST. (8: prefork's blocking
/// workers hold one connection each, and its suite runs 16; scale is measured by
/// scripts/hold.sh, not here.)
pub fn one_post_answers_many_long_polls(bin: &str, args: &[&str]) {
    const WAITERS: usize = 8;
    let server = Server::start(bin, &with(args, &["--max-conns", "1000"]));
    let mut poster = Client::connect(server.addr());
    let seq = post_message(&mut poster, "warm-up");
    let mut waiters: Vec<Client> = (0..WAITERS)
        .map(|_| {
            let mut c = Client::connect(server.addr());
            c.send(get(&format!("/messages?after={seq}&wait=30s")));
            c
        })
        .collect();
    // Until every one is held (a pattern with a bounded number of threads holds only as many).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (stats, text) = super::fetch_stats(server.addr());
        let held = stats.get("total").and_then(|t| t.get("held"));
        if held.and_then(Value::as_u64).unwrap_or(0) >= WAITERS as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{WAITERS} long polls not held after 10 s: {text}"
        );
        thread::sleep(Duration::from_millis(10));
    }
    post_message(&mut poster, "to everyone");
    for (i, c) in waiters.iter_mut().enumerate() {
        c.set_timeout(Duration::from_secs(10));
        let r = c.read_response();
        assert_eq!(messages(&r).1, ["to everyone"], "waiter {i}: {r:?}");
    }
}

/// At SIGTERM, held requests are answered with what there is now (an empty list), and the
/// server exits 0.
pub fn held_requests_answered_at_sigterm(bin: &str, args: &[&str]) {
    let mut server = Server::start(bin, args);
    let mut poster = Client::connect(server.addr());
    let seq = post_message(&mut poster, "before");
    drop(poster);
    let mut waiters: Vec<Client> = (0..3)
        .map(|_| {
            let mut c = Client::connect(server.addr());
            c.send(get(&format!("/messages?after={seq}&wait=30s")));
            c
        })
        .collect();
    for c in &mut waiters {
        assert_held(
            c,
            Duration::from_millis(200),
            "a long poll with nothing new",
        );
    }
    server.signal(libc::SIGTERM);
    for (i, c) in waiters.iter_mut().enumerate() {
        c.set_timeout(Duration::from_secs(5));
        let r = c.read_response();
        let (_, bodies) = messages(&r);
        assert!(bodies.is_empty(), "waiter {i}: {r:?}");
        if let Err(e) = c.try_expect_closed(CLOSE_WITHIN) {
            panic!("waiter {i}: the connection should close after its reply at shutdown: {e}");
        }
    }
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit after SIGTERM: {}",
        status.map_or("still running".into(), describe_exit)
    );
}

/// The journal outlives the process: messages and jobs posted before a restart are there
/// after it, on the same `--data-dir`.
pub fn journal_survives_a_restart(bin: &str, args: &[&str]) {
    let dir = fresh_data_dir();
    let dir_arg = dir.display().to_string();
    let args = with(args, &["--data-dir", &dir_arg]);
    let (seq, job) = {
        let mut server = Server::start(bin, &args);
        let mut c = Client::connect(server.addr());
        let seq = post_message(&mut c, "kept");
        let r = c.request(request_with_body(
            "POST",
            "/jobs?sleep_ms=1",
            "Prefer: wait=10\r\n",
            b"",
        ));
        r.assert_status(200);
        let id = json_body(&r)
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        drop(c);
        server.signal(libc::SIGTERM);
        let status = server.wait_exit(Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "first run's exit: {status:?}"
        );
        (seq, id)
    };
    let server = Server::start(bin, &args);
    let mut c = Client::connect(server.addr());
    let r = c.request(get(&format!("/messages?after={}", seq - 1)));
    assert_eq!(messages(&r).1, ["kept"], "after a restart: {r:?}");
    let r = c.request(get(&format!("/jobs/{job}")));
    assert_eq!(
        json_body(&r).get("status").and_then(Value::as_str),
        Some("succeeded"),
        "{r:?}"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two servers cannot use one data directory: the second stops at start-up, saying so.
pub fn data_dir_in_use_is_refused(bin: &str, args: &[&str]) {
    let dir = fresh_data_dir();
    let dir_arg = dir.display().to_string();
    let args = with(args, &["--data-dir", &dir_arg]);
    let first = Server::start(bin, &args);
    let mut second = Command::new(bin)
        .args(["--addr", "127.0.0.1:0"])
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the second server");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = second.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = second.kill();
            let _ = second.wait();
            panic!("a second server on the same --data-dir was still running after 10 s");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = second.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    assert!(
        !status.success() && stderr.contains("in use") && stderr.contains(&dir_arg),
        "the second server should fail, naming the directory in use; {}: {stderr}",
        describe_exit(status)
    );
    // The first one serves on.
    let mut c = Client::connect(first.addr());
    post_message(&mut c, "still here");
    drop(first);
    let _ = std::fs::remove_dir_all(&dir);
}
