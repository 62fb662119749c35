//! `--subscribe` and `--long-poll` against a small in-test server: every delivery counted,
//! latencies sane, a connection the server cuts reported (and resumed), gaps and duplicates
//! found.
//!
//! The server is a thread per connection with blocking I/O, holding a journal in memory:
//! `POST /messages` appends a message (and, if asked, a job record after it, so message seqs
//! are not consecutive); `GET /messages?after=N&wait=W` is a long poll; `GET /events` is an
//! event stream resuming after `Last-Event-ID`, each event split over two chunks at an odd
//! byte (so lines arrive split). Misbehaviours are switched on per test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use loadgen::delivery::Summary;
use loadgen::spec::Target;
use loadgen::subscribe::{self, Config, Mode};

#[derive(Default)]
struct Behaviour {
    /// Append a job record after each message.
    jobs: bool,
    /// The message with this number (0-based, in POST order) never reaches a stream.
    skip: Option<usize>,
    /// The message with this number is sent twice on every stream.
    repeat: Option<usize>,
    /// Stream connection number C (0-based, in accept order) is cut right after it sends
    /// message number K.
    cut_stream: Option<(usize, usize)>,
    /// Long polls also return the message at `after` again.
    poll_repeats: bool,
    /// Long poll number P (0-based, in arrival order) is cut after 50 ms, unanswered.
    cut_poll: Option<usize>,
}

struct Record {
    seq: u64,
    /// The message's number, or None for a job record.
    message: Option<usize>,
    json: String,
}

struct Server {
    b: Behaviour,
    journal: Mutex<Vec<Record>>,
    appended: Condvar,
    streams: AtomicUsize,
    polls: AtomicUsize,
}

fn start(b: Behaviour) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Arc::new(Server {
        b,
        journal: Mutex::new(Vec::new()),
        appended: Condvar::new(),
        streams: AtomicUsize::new(0),
        polls: AtomicUsize::new(0),
    });
    // Lives as long as the test process. Connection threads end when loadgen closes: a stream
    // writes a keep-alive every 100 ms, which fails once the peer is gone.
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let server = server.clone();
            thread::spawn(move || {
                let _ = serve(conn, &server);
            });
        }
    });
    addr
}

struct Request {
    method: String,
    path: String,
    query: String,
    last_event_id: Option<u64>,
    close: bool,
    body: Vec<u8>,
}

fn read_request(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Request> {
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end);
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (mut length, mut last_event_id, mut close) = (0, None, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.parse().ok()?,
            "last-event-id" => last_event_id = value.parse().ok(),
            "connection" => close = value.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    while buf.len() < length {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = buf.drain(..length).collect();
    Some(Request {
        method,
        path: path.to_string(),
        query: query.to_string(),
        last_event_id,
        close,
        body,
    })
}

fn param(query: &str, name: &str) -> Option<u64> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.trim_end_matches("ms").parse().ok())?
    })
}

fn serve(mut conn: TcpStream, s: &Server) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut conn, &mut buf) {
        match (req.method.as_str(), req.path.as_str()) {
            ("POST", "/messages") => {
                let body = String::from_utf8(req.body).unwrap();
                let mut j = s.journal.lock().unwrap();
                let seq = j.len() as u64 + 1;
                let number = j.iter().filter(|r| r.message.is_some()).count();
                j.push(Record {
                    seq,
                    message: Some(number),
                    json: format!(r#"{{"body":"{body}","seq":{seq},"ts_ms":1}}"#),
                });
                if s.b.jobs {
                    j.push(Record {
                        seq: seq + 1,
                        message: None,
                        json: format!(r#"{{"id":"j{seq}","state":"queued"}}"#),
                    });
                }
                drop(j);
                s.appended.notify_all();
                reply(&mut conn, 201, &format!("{{\"seq\":{seq}}}"))?;
            }
            ("GET", "/messages") => {
                let after = param(&req.query, "after").unwrap_or(0);
                let wait = Duration::from_millis(param(&req.query, "wait").unwrap_or(0));
                let n = s.polls.fetch_add(1, Ordering::SeqCst);
                if s.b.cut_poll == Some(n) {
                    thread::sleep(Duration::from_millis(50));
                    return Ok(());
                }
                let from = if s.b.poll_repeats {
                    after.saturating_sub(1)
                } else {
                    after
                };
                let deadline = Instant::now() + wait;
                let mut j = s.journal.lock().unwrap();
                let body = loop {
                    let head = j.len() as u64;
                    let new: Vec<&str> = j
                        .iter()
                        .filter(|r| r.seq > after && r.message.is_some())
                        .map(|r| r.json.as_str())
                        .collect();
                    let now = Instant::now();
                    if !new.is_empty() || after > head || now >= deadline {
                        let list: Vec<&str> = j
                            .iter()
                            .filter(|r| r.seq > from && r.message.is_some())
                            .map(|r| r.json.as_str())
                            .collect();
                        break format!(r#"{{"head":{head},"messages":[{}]}}"#, list.join(","));
                    }
                    j = s.appended.wait_timeout(j, deadline - now).unwrap().0;
                };
                drop(j);
                reply(&mut conn, 200, &body)?;
            }
            ("GET", "/events") => return stream(conn, s, req.last_event_id.unwrap_or(0)),
            _ => reply(&mut conn, 404, "{}")?,
        }
        if req.close {
            return Ok(());
        }
    }
    Ok(())
}

fn reply(conn: &mut TcpStream, status: u16, body: &str) -> std::io::Result<()> {
    write!(
        conn,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn chunk(conn: &mut TcpStream, data: &str) -> std::io::Result<()> {
    write!(conn, "{:x}\r\n{data}\r\n", data.len())
}

fn stream(mut conn: TcpStream, s: &Server, mut last: u64) -> std::io::Result<()> {
    let n = s.streams.fetch_add(1, Ordering::SeqCst);
    conn.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
    )?;
    chunk(&mut conn, "retry: 50\n\n")?;
    loop {
        let j = s.journal.lock().unwrap();
        let (j, _) = s
            .appended
            .wait_timeout_while(j, Duration::from_millis(100), |j| j.len() as u64 <= last)
            .unwrap();
        let mut events = Vec::new();
        let from = last;
        for r in j.iter().filter(|r| r.seq > from) {
            last = r.seq;
            let kind = if r.message.is_some() {
                "message"
            } else {
                "job"
            };
            let event = format!("id: {}\nevent: {kind}\ndata: {}\n\n", r.seq, r.json);
            let times = match r.message {
                Some(m) if s.b.skip == Some(m) => 0,
                Some(m) if s.b.repeat == Some(m) => 2,
                _ => 1,
            };
            for _ in 0..times {
                events.push(event.clone());
            }
            if let Some(m) = r.message
                && s.b.cut_stream == Some((n, m))
            {
                events.push(String::new()); // the cut
                break;
            }
        }
        drop(j);
        if events.is_empty() {
            chunk(&mut conn, ": keep-alive\n\n")?;
        }
        for e in events {
            if e.is_empty() {
                // Gone without the last chunk: the client sees the connection end mid-stream.
                return Ok(());
            }
            // Two chunks split at an odd byte, so lines arrive split.
            let (a, b) = e.split_at(e.len() / 2 + 1);
            chunk(&mut conn, a)?;
            chunk(&mut conn, b)?;
        }
    }
}

fn config(addr: SocketAddr, mode: Mode, subscribers: usize) -> Config {
    let path = match mode {
        Mode::Sse => "/events?type=message",
        Mode::LongPoll => "/messages",
    };
    Config {
        target: Target::parse(&format!("http://{addr}{path}")).unwrap(),
        mode,
        subscribers,
        threads: 2,
        rate: 20.0,
        duration: Duration::from_secs(1),
        timeout: Duration::from_secs(3),
        wait: Duration::from_secs(5),
        headers: Vec::new(),
    }
}

fn run(cfg: &Config) -> Summary {
    subscribe::run(cfg, |_| {}).unwrap()
}

/// Every subscriber gets every message once; latencies are positive, under a second, and the
/// last subscriber's time is at least the median delivery's.
fn assert_complete(s: &Summary, subscribers: u64) {
    assert_eq!(s.messages.published, 20, "{s:#?}");
    assert_eq!(s.subscribed, subscribers, "{s:#?}");
    assert_eq!(s.deliveries_expected, subscribers * 20);
    assert_eq!(s.deliveries, s.deliveries_expected, "{s:#?}");
    assert_eq!(
        (
            s.missing,
            s.gaps,
            s.duplicates,
            s.reordered,
            s.incomplete_messages
        ),
        (0, 0, 0, 0, 0),
        "{s:#?}"
    );
    assert_eq!((s.foreign, s.unparsed), (0, 0), "{s:#?}");
    assert!(
        s.latency_us.p50 > 0.0 && s.latency_us.max < 1_000_000.0,
        "{s:#?}"
    );
    assert!(s.last_delivery_us.max >= s.latency_us.p50, "{s:#?}");
    assert!(s.messages.latency_us.max > 0.0);
}

#[test]
fn sse_counts_every_delivery() {
    let addr = start(Behaviour {
        jobs: true,
        ..Behaviour::default()
    });
    let s = run(&config(addr, Mode::Sse, 30));
    assert_complete(&s, 30);
    assert_eq!(s.failure_total(), 0, "{s:#?}");
    assert_eq!(s.status.get("200"), Some(&30));
    assert_eq!(s.connects, 30);
}

#[test]
fn long_poll_counts_every_delivery() {
    let addr = start(Behaviour {
        jobs: true,
        ..Behaviour::default()
    });
    let s = run(&config(addr, Mode::LongPoll, 30));
    assert_complete(&s, 30);
    assert_eq!(s.failure_total(), 0, "{s:#?}");
    // At least one reply per subscriber per message, as each poll is answered at its first
    // message; two messages can share a reply.
    assert!(s.polls >= 30 * 10, "{} polls", s.polls);
    assert_eq!(s.connects, 30);
}

/// The server cuts one stream after message 5: the failure is counted with its time and
/// subscriber, and the subscriber resumes from Last-Event-ID, missing nothing.
#[test]
fn a_cut_stream_is_reported_and_resumed() {
    let addr = start(Behaviour {
        jobs: true,
        cut_stream: Some((3, 5)),
        ..Behaviour::default()
    });
    let s = run(&config(addr, Mode::Sse, 10));
    assert_complete(&s, 10);
    assert_eq!(s.failures["closed"], 1, "{s:#?}");
    assert_eq!(s.failure_total(), 1, "{s:#?}");
    assert_eq!((s.subscribers_failed, s.subscribers_disconnected), (1, 1));
    let e = &s.failure_events[0];
    assert!(e.was_subscribed && e.kind == "closed", "{e:?}");
    // Message 5 falls due 0.3 s into publishing.
    assert!((0.2..1.2).contains(&e.at_s), "{e:?}");
    assert_eq!(s.connects, 11);
}

/// One message never sent, one sent twice: every subscriber has one gap and one duplicate.
#[test]
fn sse_gaps_and_duplicates_are_found() {
    let addr = start(Behaviour {
        skip: Some(4),
        repeat: Some(9),
        ..Behaviour::default()
    });
    let mut cfg = config(addr, Mode::Sse, 10);
    // Nobody ever gets message 4: the wait for it after the last POST can be short.
    cfg.timeout = Duration::from_millis(500);
    let s = run(&cfg);
    assert_eq!(s.messages.published, 20);
    assert_eq!(s.deliveries, 10 * 19, "{s:#?}");
    assert_eq!((s.missing, s.gaps, s.duplicates), (10, 10, 10), "{s:#?}");
    assert_eq!(s.incomplete_messages, 1);
    assert_eq!(s.failure_total(), 0);
}

/// A long poll cut unanswered is a failure of a subscribed client; it reconnects and resumes
/// from its `after`. Replies that repeat the message at `after` are duplicates.
#[test]
fn long_poll_cut_and_repeats() {
    let addr = start(Behaviour {
        cut_poll: Some(3),
        poll_repeats: true,
        ..Behaviour::default()
    });
    let s = run(&config(addr, Mode::LongPoll, 10));
    assert_eq!(s.deliveries, s.deliveries_expected, "{s:#?}");
    assert_eq!((s.missing, s.gaps), (0, 0), "{s:#?}");
    assert!(s.duplicates >= 10 * 10, "{s:#?}");
    assert_eq!(s.failures["closed"], 1, "{s:#?}");
    assert_eq!(s.subscribers_disconnected, 1);
    assert!(s.failure_events[0].was_subscribed);
}

/// A URL that is not an event stream: every subscriber fails with its status, and the run
/// still ends, reporting that nobody subscribed.
#[test]
fn a_wrong_url_is_reported() {
    let addr = start(Behaviour::default());
    let mut cfg = config(addr, Mode::Sse, 4);
    cfg.target = Target::parse(&format!("http://{addr}/nothing")).unwrap();
    cfg.timeout = Duration::from_millis(300);
    let s = run(&cfg);
    assert_eq!(s.subscribed, 0);
    assert_eq!(s.deliveries, 0);
    assert_eq!(s.missing, 4 * 20);
    assert!(s.failures["status"] >= 4, "{s:#?}");
    assert!(s.status["404"] >= 4);
}
