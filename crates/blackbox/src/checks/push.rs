//! Server push: `GET /events`, the journal as Server-Sent Events, on every pattern.

use std::time::{Duration, Instant};

use super::app::{post_message, request_with_body};
use super::{CLOSE_WITHIN, with};
use crate::client::Client;
use crate::json::{self, Value};
use crate::server::{Server, describe_exit};
use crate::sse::{End, Event, Subscriber};

/// How long an event may take to reach a subscriber on a loaded machine.
const DELIVERY: Duration = Duration::from_secs(5);

/// The `body` of a message event's data.
fn body_of(e: &Event) -> String {
    let v =
        json::parse(&e.data).unwrap_or_else(|err| panic!("event data is not JSON ({err}): {e:?}"));
    v.get("body")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("a message event without a body: {e:?}"))
        .to_string()
}

#[track_caller]
fn next_message(s: &mut Subscriber) -> Event {
    let e = s
        .next_event(DELIVERY)
        .unwrap_or_else(|end| panic!("expected an event, the stream says {end:?}"));
    assert_eq!(e.event.as_deref(), Some("message"), "{e:?}");
    e
}

/// `GET /events`: 200, `text/event-stream`, not cached, chunked; `retry:` first; then each
/// message posted afterwards as an event whose id is its seq, in order.
pub fn sse_streams_new_messages(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut s = Subscriber::connect(server.addr(), "/events", "");
    assert_eq!(s.status, 200, "{}", s.head);
    assert!(
        s.header("Content-Type")
            .is_some_and(|t| t.starts_with("text/event-stream"))
            && s.header("Cache-Control") == Some("no-store")
            && s.header("Transfer-Encoding") == Some("chunked"),
        "{}",
        s.head
    );
    let first = s.next(DELIVERY).expect("the first thing sent");
    assert_eq!(
        first.retry,
        Some(2000),
        "the stream starts with `retry: 2000`: {first:?}"
    );
    let mut poster = Client::connect(server.addr());
    let seqs: Vec<u64> = ["a", "b", "c"]
        .iter()
        .map(|t| post_message(&mut poster, t))
        .collect();
    for (seq, text) in seqs.iter().zip(["a", "b", "c"]) {
        let e = next_message(&mut s);
        assert_eq!(e.id, Some(seq.to_string()), "{e:?}");
        assert_eq!(body_of(&e), text);
    }
}

/// A reconnecting client sends `Last-Event-ID` (or `?after=`) and gets every record after it,
/// then the live ones: no gap and no duplicate.
pub fn sse_resumes_after_last_event_id(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut poster = Client::connect(server.addr());
    let seqs: Vec<u64> = (0..5)
        .map(|i| post_message(&mut poster, &format!("m{i}")))
        .collect();
    let header = format!("Last-Event-ID: {}\r\n", seqs[1]);
    let mut s = Subscriber::connect(server.addr(), "/events?type=message", &header);
    for (i, seq) in seqs.iter().enumerate().skip(2) {
        let e = next_message(&mut s);
        assert_eq!(
            (e.id.clone(), body_of(&e)),
            (Some(seq.to_string()), format!("m{i}"))
        );
    }
    let live = post_message(&mut poster, "live");
    let e = next_message(&mut s);
    assert_eq!(
        (e.id.clone(), body_of(&e)),
        (Some(live.to_string()), "live".to_string())
    );
    let mut s = Subscriber::connect(
        server.addr(),
        &format!("/events?type=message&after={}", seqs[3]),
        "",
    );
    let got: Vec<String> = (0..2).map(|_| body_of(&next_message(&mut s))).collect();
    assert_eq!(got, ["m4", "live"]);
}

/// `?type=message` and `?type=job` filter; a job's changes are `event: job` events.
pub fn sse_filters_by_type(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut messages = Subscriber::connect(server.addr(), "/events?type=message", "");
    let mut jobs = Subscriber::connect(server.addr(), "/events?type=job", "");
    let mut c = Client::connect(server.addr());
    c.set_timeout(Duration::from_secs(15));
    let r = c.request(request_with_body(
        "POST",
        "/jobs?sleep_ms=1",
        "Prefer: wait=10\r\n",
        b"",
    ));
    r.assert_status(200);
    post_message(&mut c, "after the job");
    assert_eq!(body_of(&next_message(&mut messages)), "after the job");
    let mut statuses = Vec::new();
    while statuses.last().map(String::as_str) != Some("succeeded") {
        let e = jobs
            .next_event(DELIVERY)
            .unwrap_or_else(|end| panic!("job events so far {statuses:?}, then {end:?}"));
        assert_eq!(e.event.as_deref(), Some("job"), "{e:?}");
        let v = json::parse(&e.data).expect("job event data is JSON");
        statuses.push(
            v.get("status")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        );
    }
    assert_eq!(statuses, ["queued", "running", "succeeded"]);
}

/// Asking to resume after records retention deleted gets 410 (a browser then stops retrying).
pub fn sse_gone_after_retention(bin: &str, args: &[&str]) {
    let server = Server::start(
        bin,
        &with(
            args,
            &["--segment-mb", "1", "--retain-mb", "1", "--commit", "async"],
        ),
    );
    let mut poster = Client::connect(server.addr());
    let body = "x".repeat(60 * 1024);
    for _ in 0..48 {
        post_message(&mut poster, &body);
    }
    let s = Subscriber::connect(server.addr(), "/events", "Last-Event-ID: 1\r\n");
    assert_eq!(s.status, 410, "{}", s.head);
}

/// A subscriber is fed as fast as it reads: the server holds at most half of
/// `--stream-backlog` of its events beyond the kernel's socket buffers (the rest stay in the
/// journal, not in memory). One that stops reading is cut off after `--send-timeout`; it
/// resumes with `Last-Event-ID` and gets every message exactly once.
pub fn sse_slow_subscriber_is_cut_off_and_resumes(bin: &str, args: &[&str]) {
    const MESSAGES: usize = 40;
    let extra = [
        "--stream-backlog",
        "256K",
        "--send-timeout",
        "2s",
        "--sndbuf",
        "64K",
        "--commit",
        "async",
    ];
    let server = Server::start(bin, &with(args, &extra));
    let mut stalled =
        Subscriber::connect_with(server.addr(), "/events?type=message", "", Some(4096));
    let first = stalled.next(DELIVERY).expect("retry line");
    assert_eq!(first.retry, Some(2000));
    let mut poster = Client::connect(server.addr());
    let body = "y".repeat(48 * 1024);
    let seqs: Vec<u64> = (0..MESSAGES)
        .map(|i| post_message(&mut poster, &format!("{i:03}{body}")))
        .collect();
    // It reads nothing: after --send-timeout, the server drops it (the poster's connection and
    // /stats' own are the only ones left open).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (stats, text) = super::fetch_stats(server.addr());
        let open = stats
            .get("total")
            .and_then(|t| t.get("open"))
            .and_then(Value::as_u64);
        if open.is_some_and(|n| n <= 2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a subscriber that reads nothing should be cut off after --send-timeout 2s: {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // What the kernel had buffered still arrives, then the end of the connection.
    let mut got = Vec::new();
    let end = loop {
        match stalled.next_event(Duration::from_secs(10)) {
            Ok(e) => got.push(e),
            Err(end) => break end,
        }
    };
    assert_eq!(end, End::Closed, "got {} of {MESSAGES} events", got.len());
    assert!(
        got.len() < MESSAGES,
        "cut off before the end: {} events",
        got.len()
    );
    let last = got
        .last()
        .and_then(|e| e.id.clone())
        .unwrap_or_else(|| "0".into());
    let mut resumed = Subscriber::connect(
        server.addr(),
        "/events?type=message",
        &format!("Last-Event-ID: {last}\r\n"),
    );
    while got.len() < MESSAGES {
        got.push(next_message(&mut resumed));
    }
    let ids: Vec<String> = got
        .iter()
        .map(|e| e.id.clone().unwrap_or_default())
        .collect();
    let want: Vec<String> = seqs.iter().map(u64::to_string).collect();
    assert_eq!(
        ids, want,
        "every message exactly once, in order, across the two connections"
    );
}

/// A replay longer than the stream backlog flows at the reader's pace: a subscriber resuming
/// from the start of 40 big messages gets them all without being cut off.
pub fn sse_long_replay_is_paced_not_cut_off(bin: &str, args: &[&str]) {
    let extra = [
        "--stream-backlog",
        "256K",
        "--sndbuf",
        "64K",
        "--commit",
        "async",
    ];
    let server = Server::start(bin, &with(args, &extra));
    let mut poster = Client::connect(server.addr());
    let body = "z".repeat(48 * 1024);
    let first = post_message(&mut poster, &body);
    for _ in 1..40 {
        post_message(&mut poster, &body);
    }
    let header = format!("Last-Event-ID: {}\r\n", first - 1);
    let mut s =
        Subscriber::connect_with(server.addr(), "/events?type=message", &header, Some(4096));
    for i in 0..40 {
        let e = s
            .next_event(DELIVERY)
            .unwrap_or_else(|end| panic!("replayed event {i}: the stream says {end:?}"));
        assert_eq!(e.id, Some((first + i).to_string()));
    }
}

/// A silent stream sends a comment every `--sse-keep-alive`, so that proxies keep it open.
pub fn sse_keep_alive_comment(bin: &str, args: &[&str]) {
    let server = Server::start(bin, &with(args, &["--sse-keep-alive", "500ms"]));
    let mut s = Subscriber::connect(server.addr(), "/events", "");
    assert_eq!(s.next(DELIVERY).expect("retry").retry, Some(2000));
    let e = s
        .next(Duration::from_secs(5))
        .expect("a keep-alive comment");
    assert_eq!(e.comment.as_deref(), Some("keep-alive"), "{e:?}");
}

/// SIGTERM ends every stream cleanly, with the last chunk of its chunked reply, and the
/// server exits 0.
pub fn sse_ends_cleanly_at_sigterm(bin: &str, args: &[&str]) {
    let mut server = Server::start(bin, args);
    let mut streams: Vec<Subscriber> = (0..3)
        .map(|_| Subscriber::connect(server.addr(), "/events", ""))
        .collect();
    for s in &mut streams {
        assert_eq!(s.next(DELIVERY).expect("retry").retry, Some(2000));
    }
    server.signal(libc::SIGTERM);
    for (i, s) in streams.iter_mut().enumerate() {
        match s.next(CLOSE_WITHIN) {
            Err(End::Finished) => {}
            other => panic!("stream {i} at SIGTERM: expected the last chunk, got {other:?}"),
        }
    }
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit after SIGTERM: {}",
        status.map_or("still running".into(), describe_exit)
    );
}
