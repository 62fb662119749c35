//! Shutdown while the loop is busy: a request that reached the server before shutdown began is
//! answered, even when the loop, stuck in a handler, has not yet seen its readiness event.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use clap::Parser;
use runtime::{App, EventLoop, Inline, LoopConfig, ServerArgs, Shutdown, Stats};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    server: ServerArgs,
}

/// One event loop serving the app on a free port, on its own thread.
fn start() -> (SocketAddr, Arc<Shutdown>, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let stats = Arc::new(Stats::new("drain-test", 1));
    let shutdown = Shutdown::new();
    let config = LoopConfig::new("drain-test", &Args::parse_from(["test"]).server);
    let mut event_loop = EventLoop::new(config, stats.worker(0), shutdown.clone()).unwrap();
    event_loop.listen(listener).unwrap();
    let app = App::new(stats.clone());
    let server = thread::spawn(move || event_loop.run(&mut Inline(app)).unwrap());
    (addr, shutdown, server)
}

const HELLO: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

#[test]
fn request_that_arrived_during_a_handler_is_served_after_shutdown() {
    let (addr, shutdown, server) = start();

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
    thread::sleep(Duration::from_millis(100));
    late.write_all(HELLO).unwrap();
    thread::sleep(Duration::from_millis(50));
    shutdown.trigger();

    assert!(read_reply(&mut busy).contains("blocked 300 ms"));
    let reply = read_reply(&mut late);
    assert!(
        reply.ends_with("Hello, World!"),
        "the request sent before shutdown got: {reply:?}"
    );
    server.join().unwrap();
}

/// A body half-sent when shutdown begins is still read to its end and answered (with
/// `Connection: close`); the loop then exits.
#[test]
fn request_half_received_at_shutdown_is_finished() {
    let (addr, shutdown, server) = start();

    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
        .unwrap();
    thread::sleep(Duration::from_millis(100));
    shutdown.trigger();
    thread::sleep(Duration::from_millis(100));
    c.write_all(b"world").unwrap();
    let reply = read_reply(&mut c);
    assert!(
        reply.ends_with("helloworld") && reply.contains("Connection: close\r\n"),
        "{reply:?}"
    );
    server.join().unwrap();
}

/// A connection accepted just before shutdown, whose first request comes after it began, is
/// answered (with `Connection: close`); one that never sends is closed after a short grace.
#[test]
fn fresh_connection_gets_its_first_request_answered() {
    let (addr, shutdown, server) = start();

    let mut late = TcpStream::connect(addr).unwrap();
    let mut silent = TcpStream::connect(addr).unwrap();
    for c in [&mut late, &mut silent] {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    thread::sleep(Duration::from_millis(100));
    shutdown.trigger();
    thread::sleep(Duration::from_millis(200));
    late.write_all(HELLO).unwrap();
    let reply = read_reply(&mut late);
    assert!(
        reply.ends_with("Hello, World!") && reply.contains("Connection: close\r\n"),
        "{reply:?}"
    );
    let started = std::time::Instant::now();
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
