//! Shutdown while the loop is busy: a request that reached the server before shutdown began is
//! answered, even when the loop, stuck in a handler, has not yet seen its readiness event.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use runtime::{App, EventLoop, Inline, ServeConfig, ServerArgs, Shutdown, Stats};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    server: ServerArgs,
}

/// One event loop serving the app on a free port, on its own thread.
fn start() -> (
    SocketAddr,
    Arc<Shutdown>,
    Arc<Stats>,
    thread::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let stats = Arc::new(Stats::new("drain-test", 1));
    let shutdown = Shutdown::new();
    let dir =
        std::env::temp_dir().join(format!("drain-test-{}-{}", std::process::id(), addr.port()));
    let args = Args::parse_from(["test", "--data-dir", &dir.display().to_string()]);
    let config = ServeConfig::new("drain-test", &args.server);
    let app = App::open("drain-test", stats.clone(), &args.server.app).unwrap();
    let mut event_loop = EventLoop::new(config, &app, stats.worker(0), shutdown.clone()).unwrap();
    event_loop.listen(listener).unwrap();
    let server = thread::spawn(move || event_loop.run(&mut Inline(app)).unwrap());
    (addr, shutdown, stats, server)
}

/// Waits (up to 10 s) until `done` holds.
#[track_caller]
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "still waiting after 10 s: {what}"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

/// Requests the loop has read, and connections it holds open.
fn counts(stats: &Stats) -> (u64, u64) {
    let w = stats.worker(0);
    (w.requests.load(Relaxed), w.open.load(Relaxed))
}

/// Shutdown has begun: the loop has closed its listening socket.
fn listener_closed(addr: SocketAddr) -> bool {
    TcpStream::connect(addr).is_err()
}

/// The kernel's queues of the TCP connection from `local` to `remote` (sent and not yet
/// acknowledged, received and not yet read), from /proc/net/tcp.
fn queues(local: SocketAddr, remote: SocketAddr) -> Option<(u64, u64)> {
    let hex = |a: SocketAddr| match a {
        SocketAddr::V4(a) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(a.ip().octets()),
            a.port()
        ),
        SocketAddr::V6(_) => String::new(),
    };
    let (local, remote) = (hex(local), hex(remote));
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(1)? != &local || f.get(2)? != &remote {
            return None;
        }
        let (tx, rx) = f.get(4)?.split_once(':')?;
        Some((
            u64::from_str_radix(tx, 16).ok()?,
            u64::from_str_radix(rx, 16).ok()?,
        ))
    })
}

const HELLO: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

#[test]
fn request_that_arrived_during_a_handler_is_served_after_shutdown() {
    let (addr, shutdown, stats, server) = start();

    // Both connections accepted and served once.
    let mut busy = TcpStream::connect(addr).unwrap();
    let mut late = TcpStream::connect(addr).unwrap();
    for c in [&mut busy, &mut late] {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(HELLO).unwrap();
        assert!(read_reply(c).ends_with("Hello, World!"));
    }

    // The loop sleeps in /block; meanwhile the second request arrives, then shutdown begins.
    busy.write_all(b"GET /block?ms=300 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    wait_until("the loop to take /block", || counts(&stats).0 == 3);
    late.write_all(HELLO).unwrap();
    let (client, server_side) = (late.local_addr().unwrap(), late.peer_addr().unwrap());
    wait_until("the request to reach the server's socket", || {
        queues(server_side, client).is_some_and(|(_, unread)| unread > 0)
    });
    shutdown.trigger();

    assert!(read_reply(&mut busy).contains("blocked 300 ms"));
    let reply = read_reply(&mut late);
    assert!(
        reply.ends_with("Hello, World!"),
        "the request sent before shutdown got: {reply:?}"
    );
    server.join().unwrap();
}

/// A body half-sent when shutdown begins is still read to its end and answered, then the
/// connection closes; the loop then exits. (The reply says `Connection: close` unless the rest
/// arrived before the loop began draining: it first serves what has reached its sockets.)
#[test]
fn request_half_received_at_shutdown_is_finished() {
    let (addr, shutdown, _stats, server) = start();

    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
        .unwrap();
    let (client, server_side) = (c.local_addr().unwrap(), c.peer_addr().unwrap());
    wait_until("the loop to read the first half", || {
        queues(client, server_side).is_some_and(|(unacked, _)| unacked == 0)
            && queues(server_side, client).is_some_and(|(_, unread)| unread == 0)
    });
    shutdown.trigger();
    wait_until("the shutdown to begin", || listener_closed(addr));
    c.write_all(b"world").unwrap();
    let reply = read_reply(&mut c);
    assert!(reply.ends_with("helloworld"), "{reply:?}");
    assert_eq!(
        c.read(&mut [0u8; 16]).unwrap_or(0),
        0,
        "the connection closes after the reply"
    );
    server.join().unwrap();
}

/// A connection accepted just before shutdown, whose first request comes after it began, is
/// answered (with `Connection: close`); one that never sends is closed after a short grace.
#[test]
fn fresh_connection_gets_its_first_request_answered() {
    let (addr, shutdown, stats, server) = start();

    let mut late = TcpStream::connect(addr).unwrap();
    let mut silent = TcpStream::connect(addr).unwrap();
    for c in [&mut late, &mut silent] {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    wait_until("both connections accepted", || counts(&stats).1 == 2);
    shutdown.trigger();
    wait_until("the shutdown to begin", || listener_closed(addr));
    late.write_all(HELLO).unwrap();
    let reply = read_reply(&mut late);
    assert!(
        reply.ends_with("Hello, World!") && reply.contains("Connection: close\r\n"),
        "{reply:?}"
    );
    let started = Instant::now();
    assert_eq!(
        silent.read(&mut [0u8; 16]).unwrap_or(0),
        0,
        "the silent connection is closed"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    server.join().unwrap();
}

/// Reads one reply (this test's replies are small and framed by Content-Length).
fn read_reply(c: &mut TcpStream) -> String {
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&reply).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if reply.len() >= end + 4 + length {
                return text;
            }
        }
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return text,
            Ok(n) => reply.extend_from_slice(&buf[..n]),
        }
    }
}
