//! The load engine against a tiny in-test server: pacing, coordinated-omission correction,
//! request counts, churn, pipelining, idle connections, and errors by kind.
//!
//! The server is a thread per connection with blocking I/O: slow, but exact. It answers
//! `Hello, World!` to every request; `GET /silent` gets no reply; the request numbered
//! `stall_at` (counting from 0 over all connections) is answered only after `stall`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use loadgen::engine::{self, Close, Config, Stop};
use loadgen::spec::{Mix, RequestSpec, Target};
use loadgen::stats::Summary;

#[derive(Default)]
struct Behaviour {
    stall_at: Option<u64>,
    stall: Duration,
}

struct TestServer {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
}

fn server(behaviour: Behaviour) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let behaviour = Arc::new(behaviour);
    let (r, a) = (requests.clone(), accepted.clone());
    // The accept thread lives as long as the test process; nothing waits for it.
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            a.fetch_add(1, Ordering::Relaxed);
            let (r, b) = (r.clone(), behaviour.clone());
            thread::spawn(move || serve(conn, &r, &b));
        }
    });
    TestServer {
        addr,
        requests,
        accepted,
    }
}

fn serve(mut conn: TcpStream, count: &AtomicU64, b: &Behaviour) {
    conn.set_nodelay(true).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).to_ascii_lowercase();
            buf.drain(..end + 4);
            let n = count.fetch_add(1, Ordering::SeqCst);
            if head.starts_with("get /silent ") {
                continue;
            }
            if b.stall_at == Some(n) {
                thread::sleep(b.stall);
            }
            let close = head.contains("\r\nconnection: close\r\n");
            let reply: &[u8] = if close {
                b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nConnection: close\r\n\r\nHello, World!"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\nHello, World!"
            };
            if conn.write_all(reply).is_err() || close {
                return;
            }
        }
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn config(addr: SocketAddr, requests: &[&str]) -> Config {
    Config {
        target: Target::parse(&format!("http://{addr}/")).unwrap(),
        mix: Mix::new(
            requests
                .iter()
                .map(|r| RequestSpec::parse(r).unwrap())
                .collect(),
        ),
        headers: Vec::new(),
        threads: 1,
        connections: 4,
        pipeline: 1,
        rate: None,
        stop: Stop::Duration(Duration::from_secs(1)),
        warmup: Duration::ZERO,
        close: None,
        slow_read: None,
        idle: 0,
        idle_request: false,
        timeout: Duration::from_secs(5),
    }
}

fn run(cfg: &Config) -> Summary {
    engine::run(cfg, |_, _, _| {}).unwrap()
}

fn errors(s: &Summary) -> u64 {
    s.error_total()
}

/// At a fixed rate over a few seconds, the replies counted match rate x window within 10%,
/// whatever the server could do (a closed loop against this server does far more).
#[test]
fn open_loop_keeps_the_rate() {
    let srv = server(Behaviour::default());
    let mut cfg = config(srv.addr, &["GET /"]);
    cfg.rate = Some(500.0);
    cfg.connections = 8;
    cfg.threads = 2;
    cfg.warmup = Duration::from_millis(500);
    cfg.stop = Stop::Duration(Duration::from_secs(4));
    let s = run(&cfg);
    assert_eq!(errors(&s), 0, "{s:?}");
    assert!(
        (1800..=2200).contains(&s.requests),
        "{} replies in 4 s at 500/s",
        s.requests
    );
    // Warm-up replies are counted apart.
    assert!(
        s.all_responses >= s.requests + 200,
        "{} all, {} counted",
        s.all_responses,
        s.requests
    );
    assert_eq!(s.mode, "open");
}

/// wrk2's correction: one reply held back for a second makes every request that fell due
/// meanwhile wait too, and their latency counts from when they fell due. A closed loop
/// would record one slow reply; the open loop records about rate x stall of them.
#[test]
fn open_loop_latency_counts_from_the_due_time() {
    let srv = server(Behaviour {
        stall_at: Some(100),
        stall: Duration::from_secs(1),
    });
    let mut cfg = config(srv.addr, &["GET /"]);
    cfg.rate = Some(200.0);
    cfg.connections = 1;
    cfg.stop = Stop::Duration(Duration::from_secs(3));
    let s = run(&cfg);
    assert_eq!(errors(&s), 0, "{s:?}");
    // ~200 requests fell due during the stall, waiting 1 s down to 0: over 10% of the
    // 600 sent waited at least 200 ms.
    assert!(s.latency_us.p90 >= 200_000.0, "p90 {} us", s.latency_us.p90);
    assert!(s.latency_us.max >= 900_000.0, "max {} us", s.latency_us.max);
    // The backlog was sent once the stall ended: nothing was skipped.
    assert!(s.requests >= 500, "{} replies", s.requests);
}

/// --requests: exactly that many replies are counted, warm-up aside, and per class and per
/// status they add up.
#[test]
fn request_count_and_mix_accounting() {
    let srv = server(Behaviour::default());
    let mut cfg = config(srv.addr, &["3:GET /", "1:GET /other"]);
    cfg.stop = Stop::Requests(2000);
    cfg.threads = 2;
    cfg.warmup = Duration::from_millis(200);
    let s = run(&cfg);
    assert_eq!(s.requests, 2000);
    assert_eq!(s.status.get("200"), Some(&2000));
    assert_eq!(s.classes.iter().map(|c| c.requests).sum::<u64>(), 2000);
    let other = s.classes[1].requests;
    assert!(
        (350..=650).contains(&other),
        "{other} of 2000 for weight 1/4"
    );
    assert_eq!(errors(&s), 0);
    assert!(srv.requests.load(Ordering::SeqCst) >= 2000);
}

#[test]
fn pipelining_keeps_many_requests_in_flight() {
    let srv = server(Behaviour::default());
    let mut cfg = config(srv.addr, &["GET /"]);
    cfg.pipeline = 8;
    cfg.connections = 2;
    cfg.stop = Stop::Requests(4000);
    let s = run(&cfg);
    assert_eq!((s.requests, errors(&s)), (4000, 0));
    assert_eq!(s.connects, 2);
}

/// Connection per request, either side closing: one connection per request.
#[test]
fn churn_opens_a_connection_per_request() {
    for close in [Close::Client, Close::Server] {
        let srv = server(Behaviour::default());
        let mut cfg = config(srv.addr, &["GET /"]);
        cfg.close = Some(close);
        cfg.stop = Stop::Requests(300);
        let s = run(&cfg);
        assert_eq!((s.requests, errors(&s)), (300, 0), "{close:?}: {s:?}");
        assert!(s.connects >= 300, "{close:?}: {} connects", s.connects);
        assert!(srv.accepted.load(Ordering::SeqCst) >= 300);
    }
}

#[test]
fn churn_at_a_rate() {
    let srv = server(Behaviour::default());
    let mut cfg = config(srv.addr, &["GET /"]);
    cfg.close = Some(Close::Client);
    cfg.rate = Some(200.0);
    cfg.stop = Stop::Duration(Duration::from_secs(2));
    let s = run(&cfg);
    assert_eq!(errors(&s), 0);
    assert!(
        (320..=480).contains(&s.requests),
        "{} replies in 2 s at 200/s",
        s.requests
    );
}

#[test]
fn idle_connections_stay_open_beside_the_load() {
    let srv = server(Behaviour::default());
    let mut cfg = config(srv.addr, &["GET /"]);
    cfg.idle = 300;
    cfg.threads = 2;
    cfg.stop = Stop::Requests(500);
    let s = run(&cfg);
    assert_eq!((s.requests, errors(&s)), (500, 0));
    assert_eq!((s.idle_open, s.idle_closed), (300, 0));
    assert!(srv.accepted.load(Ordering::SeqCst) >= 304);
}

/// --idle-request with no other connections: each idle connection sends one request, reads its
/// reply and stays open; a request never answered leaves its connection open, not answered.
#[test]
fn idle_connections_after_one_request_each() {
    let srv = server(Behaviour::default());
    let mut cfg = config(srv.addr, &["GET /"]);
    cfg.connections = 0;
    cfg.idle = 600;
    cfg.idle_request = true;
    cfg.threads = 2;
    cfg.stop = Stop::Duration(Duration::from_millis(300));
    let s = run(&cfg);
    assert_eq!(errors(&s), 0, "{s:?}");
    assert_eq!(
        (s.idle_open, s.idle_answered, s.idle_rejected, s.idle_closed),
        (600, 600, 0, 0)
    );
    assert_eq!(s.requests, 0);
    assert_eq!(srv.requests.load(Ordering::SeqCst), 600);
    assert_eq!(srv.accepted.load(Ordering::SeqCst), 600);

    let srv = server(Behaviour::default());
    let mut cfg = config(srv.addr, &["GET /silent"]);
    cfg.connections = 0;
    cfg.idle = 50;
    cfg.idle_request = true;
    cfg.stop = Stop::Duration(Duration::from_millis(300));
    let s = run(&cfg);
    assert_eq!((s.idle_open, s.idle_answered, s.idle_closed), (50, 0, 0));
    assert_eq!(srv.requests.load(Ordering::SeqCst), 50);
}

#[test]
fn a_refused_connect_is_a_connect_error() {
    // Bind, note the port, close: nothing listens there now.
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut cfg = config(addr, &["GET /"]);
    cfg.stop = Stop::Duration(Duration::from_millis(300));
    let s = run(&cfg);
    assert_eq!(s.requests, 0);
    assert!(s.errors["connect"] > 0, "{:?}", s.errors);
}

#[test]
fn a_missing_reply_is_a_timeout() {
    let srv = server(Behaviour::default());
    let mut cfg = config(srv.addr, &["GET /silent"]);
    cfg.connections = 2;
    cfg.timeout = Duration::from_millis(300);
    cfg.stop = Stop::Duration(Duration::from_millis(1500));
    let s = run(&cfg);
    assert_eq!(s.requests, 0);
    assert!(s.errors["timeout"] >= 2, "{:?}", s.errors);
}

/// A slow reader takes about --slow-read bytes per second, not what the server would send.
#[test]
fn slow_reader_reads_at_its_rate() {
    let srv = server(Behaviour::default());
    let mut cfg = config(srv.addr, &["GET /"]);
    cfg.connections = 1;
    cfg.pipeline = 100;
    cfg.slow_read = Some(2000);
    cfg.stop = Stop::Duration(Duration::from_secs(2));
    let s = run(&cfg);
    // 2000 B/s for 2 s, replies of 52 bytes: about 77 replies; allow the first burst.
    assert!(
        (1000..=6000).contains(&s.bytes),
        "{} bytes in 2 s at 2000 B/s",
        s.bytes
    );
    assert!(s.requests >= 20, "{} replies", s.requests);
}
