//! The application without a server: routes and replies, held requests, the journal.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::{Body, Conn, Response};

use super::*;

/// A request copied out of its connection, as a pattern that handles requests on another
/// thread would make one.
struct Copied {
    method: String,
    target: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl Routable for Copied {
    fn method(&self) -> &str {
        &self.method
    }
    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }
    fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }
    fn query_param(&self, name: &str) -> Option<&str> {
        proto::query_param(self.query()?, name)
    }
    fn header(&self, name: &str) -> Option<&[u8]> {
        let found = self
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name));
        found.map(|(_, v)| v.as_slice())
    }
    fn body(&self) -> &[u8] {
        &self.body
    }
}

/// An app on a fresh journal in a temporary directory (removed when dropped).
pub(crate) struct TestApp {
    pub app: App,
    dir: std::path::PathBuf,
}

impl TestApp {
    /// Closes this app (it has no threads, so the journal is released) and opens a new one on
    /// the same directory with `extra` flags; the directory is still removed when it drops.
    pub(crate) fn reopen(mut self, extra: &[&str]) -> TestApp {
        let dir = std::mem::take(&mut self.dir);
        drop(self);
        open_at(dir, extra)
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub(crate) fn test_app(extra: &[&str]) -> TestApp {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("app-test-{}-{n}", std::process::id()));
    open_at(dir, extra)
}

fn open_at(dir: std::path::PathBuf, extra: &[&str]) -> TestApp {
    use clap::Parser;
    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        app: AppArgs,
    }
    let mut argv = vec![
        "test".to_string(),
        "--data-dir".into(),
        dir.display().to_string(),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    let args = Args::parse_from(argv);
    let app = App::open("test", Arc::new(Stats::new("test", 1)), &args.app).unwrap();
    TestApp { app, dir }
}

/// Parses `input` (one request) and routes it.
fn route(app: &App, input: &[u8]) -> Route {
    let now = Instant::now();
    let mut conn = Conn::new(Arc::new(proto::Config::default()), now);
    let mut rest = input;
    while !rest.is_empty() {
        let buf = conn.read_buf();
        let n = buf.len().min(rest.len());
        buf[..n].copy_from_slice(&rest[..n]);
        conn.filled(n, now);
        rest = &rest[n..];
    }
    let req = conn.next_request().expect("a complete request");
    app.route(&req)
}

/// Status, content type, extra headers, body, or the heavy task.
fn summary(route: Route) -> String {
    match route {
        Route::Heavy(task) => format!("{task:?}"),
        Route::Ready(Reply::Now(r)) => describe(&r),
        Route::Ready(Reply::Later(_)) => "<later>".into(),
        Route::Ready(Reply::Stream(head, _)) => format!("<stream> {}", describe(&head)),
        Route::Ready(Reply::Body(_)) => "<takes the body>".into(),
    }
}

fn describe(r: &Response) -> String {
    let body = match &r.body {
        Body::Static(b) => b.to_vec(),
        Body::Owned(b) => b.clone(),
        Body::Stream | Body::Sized(_) => b"<stream>".to_vec(),
    };
    format!(
        "{} {} {:?} {}",
        r.status,
        r.content_type,
        r.headers,
        String::from_utf8_lossy(&body)
    )
}

fn now_reply(route: Route) -> Response {
    match route {
        Route::Ready(Reply::Now(r)) => r,
        other => panic!("expected a reply now, got {}", summary(other)),
    }
}

fn body_json(r: &Response) -> serde_json::Value {
    let Body::Owned(b) = &r.body else {
        panic!("no owned body: {}", describe(r))
    };
    serde_json::from_slice(b).unwrap_or_else(|e| panic!("{e}: {}", describe(r)))
}

#[test]
fn a_copied_request_routes_like_the_parsed_one() {
    let t = test_app(&["--commit", "async"]);
    let cases: [&[u8]; 12] = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /work?us=5 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /work?us=abc HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /block?x=1&ms=99999 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: a/b\r\nContent-Length: 3\r\n\r\nabc",
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi",
        b"DELETE / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"FOO /nope HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /messages?after=0&limit=0 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /jobs/12345 HTTP/1.1\r\nHost: x\r\n\r\n",
    ];
    for input in cases {
        let now = Instant::now();
        let mut conn = Conn::new(Arc::new(proto::Config::default()), now);
        conn.read_buf()[..input.len()].copy_from_slice(input);
        conn.filled(input.len(), now);
        let req = conn.next_request().expect("a complete request");
        let copied = Copied {
            method: req.method.to_string(),
            target: req.target.to_string(),
            headers: req
                .headers()
                .map(|(n, v)| (n.to_string(), v.to_vec()))
                .collect(),
            body: req.body.to_vec(),
        };
        assert_eq!(
            summary(t.app.route(&req)),
            summary(t.app.route(&copied)),
            "{}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn messages_are_appended_and_read_after_a_seq() {
    let t = test_app(&["--commit", "async"]);
    for text in ["one", "two", "three"] {
        let req = format!(
            "POST /messages HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        );
        let r = now_reply(route(&t.app, req.as_bytes()));
        assert_eq!(r.status, 201, "{}", describe(&r));
    }
    let r = now_reply(route(
        &t.app,
        b"GET /messages?after=1 HTTP/1.1\r\nHost: x\r\n\r\n",
    ));
    let v = body_json(&r);
    assert_eq!(v["head"], 3);
    let bodies: Vec<&str> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["two", "three"]);
    assert!(
        r.headers
            .iter()
            .any(|(n, v)| *n == "Cache-Control" && v == "no-store")
    );
}

#[test]
fn a_long_poll_is_held_until_a_message_comes() {
    let t = test_app(&["--commit", "async"]);
    let Route::Ready(Reply::Later(mut pending)) = route(
        &t.app,
        b"GET /messages?after=0&wait=30s HTTP/1.1\r\nHost: x\r\n\r\n",
    ) else {
        panic!("an empty log: the long poll should be held");
    };
    assert!(pending.poll(Instant::now()).is_none());
    t.app
        .journal()
        .append(records::MESSAGE, br#"{"ts_ms":1,"body":"hi"}"#)
        .unwrap();
    let r = pending
        .poll(Instant::now())
        .expect("answered once a message exists");
    assert_eq!(body_json(&r)["messages"][0]["body"], "hi");

    // With nothing new, the deadline answers with an empty list.
    let Route::Ready(Reply::Later(mut pending)) = route(
        &t.app,
        b"GET /messages?after=1&wait=1s HTTP/1.1\r\nHost: x\r\n\r\n",
    ) else {
        panic!("held");
    };
    let late = pending.deadline().unwrap() + Duration::from_millis(1);
    let r = pending.poll(late).expect("answered at the deadline");
    assert_eq!(body_json(&r)["messages"], serde_json::json!([]));
}

#[test]
fn sync_commit_answers_once_durable() {
    let t = test_app(&["--commit", "sync"]);
    let reply = route(
        &t.app,
        b"POST /messages HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi",
    );
    let Route::Ready(Reply::Later(mut pending)) = reply else {
        panic!("sync commit: the reply waits for fdatasync");
    };
    assert!(pending.poll(Instant::now()).is_none());
    t.app.journal().sync_to(t.app.journal().head()).unwrap();
    let r = pending.poll(Instant::now()).expect("durable now");
    assert_eq!(r.status, 201);
}

#[test]
fn bad_requests_get_a_problem() {
    let t = test_app(&[]);
    for (input, status) in [
        (&b"POST /jobs HTTP/1.1\r\nHost: x\r\n\r\n"[..], 400),
        (
            b"POST /jobs?work_us=1&sleep_ms=1 HTTP/1.1\r\nHost: x\r\n\r\n",
            400,
        ),
        (
            b"POST /jobs?sleep_ms=999999999 HTTP/1.1\r\nHost: x\r\n\r\n",
            400,
        ),
        (b"GET /jobs/nope HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"GET /messages?after=x HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /messages?wait=5d HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (
            b"POST /messages HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n\xff",
            400,
        ),
        (b"PUT /messages HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    ] {
        let r = now_reply(route(&t.app, input));
        assert_eq!(r.status, status, "{}", String::from_utf8_lossy(input));
        if status != 405 {
            assert_eq!(r.content_type, "application/problem+json");
        }
    }
}

/// Posts `n` messages of `size` bytes; returns the last seq.
fn fill(app: &App, n: usize, size: usize) -> u64 {
    let body = "m".repeat(size);
    let mut seq = 0;
    for _ in 0..n {
        let req =
            format!("POST /messages HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n{body}");
        let r = now_reply(route(app, req.as_bytes()));
        assert_eq!(r.status, 201);
        seq = body_json(&r)["seq"].as_u64().unwrap();
    }
    seq
}

/// Retention deletes old segments: a reader asking for what was deleted gets 410; a live job
/// survives because every roll carries live state into the new segment.
#[test]
fn retention_gives_410_and_keeps_live_jobs() {
    let flags = ["--commit", "async", "--segment-mb", "1", "--retain-mb", "1"];
    let t = test_app(&flags);
    let r = now_reply(route(
        &t.app,
        b"POST /jobs?sleep_ms=5 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\ninput",
    ));
    assert_eq!(r.status, 202);
    let id: u64 = body_json(&r)["id"].as_str().unwrap().parse().unwrap();
    // 48 messages of 60 KiB: about 3 MiB, three rolls.
    let last = fill(&t.app, 48, 60 * 1024);
    let stats = t.app.journal().stats();
    assert!(stats.segments_deleted > 0, "{stats:?}");
    let r = now_reply(route(
        &t.app,
        b"GET /messages?after=0 HTTP/1.1\r\nHost: x\r\n\r\n",
    ));
    assert_eq!(r.status, 410, "{}", describe(&r));
    let r = now_reply(route(
        &t.app,
        format!(
            "GET /messages?after={} HTTP/1.1\r\nHost: x\r\n\r\n",
            last - 1
        )
        .as_bytes(),
    ));
    assert_eq!(body_json(&r)["messages"].as_array().unwrap().len(), 1);

    // After a restart, the job is still there, with its input, though its first records are gone.
    let t = t.reopen(&flags);
    let app = &t.app;
    let r = now_reply(route(
        app,
        format!("GET /jobs/{id} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    ));
    assert_eq!(body_json(&r)["status"], "queued", "{}", describe(&r));
    let input_seq = app.view().jobs[&id].job.input_seq.unwrap();
    assert!(input_seq > id, "the input was carried forward: {input_seq}");
    assert_eq!(app.read_input(input_seq).unwrap(), b"input");
}
