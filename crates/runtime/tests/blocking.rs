//! The blocking driver over real sockets: pipelining, and shutdown waking a parked reader
//! while its in-flight reply still goes out whole.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use proto::Response;
use runtime::blocking::{Context, OpenConns, Phase, ThreadPark, serve};
use runtime::{App, ServeConfig, ServerArgs, Stats};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    server: ServerArgs,
}

/// The config, and an app on a journal of its own, from these flags.
fn setup(flags: &[&str]) -> (ServeConfig, App) {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Relaxed);
    let dir = std::env::temp_dir().join(format!("blocking-test-{}-{n}", std::process::id()));
    let dir = dir.display().to_string();
    let argv = ["test", "--data-dir", &dir]
        .into_iter()
        .chain(flags.iter().copied());
    let args = Args::parse_from(argv);
    let app = App::open(
        "blocking-test",
        Arc::new(Stats::new("blocking-test", 1)),
        &args.server.app,
    );
    (
        ServeConfig::new("blocking-test", &args.server),
        app.unwrap(),
    )
}

/// Serves one connection on a thread; the handler sleeps `delay` per request.
fn start(
    delay: Duration,
) -> (
    TcpStream,
    Arc<OpenConns>,
    Arc<Stats>,
    thread::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    let open = Arc::new(OpenConns::default());
    let stats = Arc::new(Stats::new("blocking-test", 1));
    let (o, s) = (open.clone(), stats.clone());
    let t = thread::spawn(move || {
        let (config, app) = setup(&[]);
        let park = ThreadPark::current();
        let cx = Context {
            config: &config,
            app: &app,
            stats: s.worker(0),
            open: &o,
            park: &park,
        };
        serve(server, &cx, |req| {
            thread::sleep(delay);
            Response::owned(200, "text/plain", req.target.as_bytes().to_vec()).into()
        })
    });
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    (client, open, stats, t)
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

fn read_all(mut c: TcpStream) -> String {
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn pipelined_requests_answered_in_order() {
    let (mut c, _open, stats, t) = start(Duration::ZERO);
    c.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\nGET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let text = read_all(c);
    let bodies: Vec<&str> = text.split("\r\n\r\n").skip(1).map(|s| &s[..2]).collect();
    assert_eq!(bodies, ["/a", "/b", "/c"], "{text}");
    t.join().unwrap();
    let w = stats.worker(0);
    assert_eq!(
        (
            w.requests.load(Relaxed),
            w.accepted.load(Relaxed),
            w.open.load(Relaxed)
        ),
        (3, 1, 0)
    );
}

#[test]
fn stop_reading_wakes_a_parked_reader_after_its_reply() {
    let (mut c, open, stats, t) = start(Duration::from_millis(300));
    c.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    wait_until("the handler to start", || {
        stats.worker(0).requests.load(Relaxed) == 1
    });
    assert_eq!(open.len(), 1);
    let started = Instant::now();
    open.stop_reading();
    // The in-flight reply is written whole, then the connection closes without waiting for
    // the idle timeout (60 s by default).
    let text = read_all(c);
    assert!(
        text.starts_with("HTTP/1.1 200 OK") && text.ends_with("/slow"),
        "{text}"
    );
    t.join().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(open.is_empty());
}

#[test]
fn stop_reading_lets_a_request_being_received_finish() {
    let (mut c, open, _stats, t) = start(Duration::ZERO);
    c.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
        .unwrap();
    // Once it has read the first half, the server is inside a request, waiting for the rest.
    wait_until("the server to read the first half", || {
        open.count(Phase::Busy) == 1
    });
    open.stop_reading();
    // The rest in two writes (the pause only spaces them): the server reads on after the
    // first, still inside the request.
    c.write_all(b"wor").unwrap();
    thread::sleep(Duration::from_millis(50));
    c.write_all(b"ld").unwrap();
    // The request is finished and answered, then the connection closes.
    let text = read_all(c);
    assert!(
        text.starts_with("HTTP/1.1 200 OK") && text.ends_with("/upload"),
        "{text}"
    );
    t.join().unwrap();
    assert!(open.is_empty());
}

/// A connection that has sent nothing when shutdown begins may still send its first request
/// within the shutdown grace; it is answered with `Connection: close`.
#[test]
fn stop_reading_leaves_a_fresh_connection_its_grace() {
    let (mut c, open, _stats, t) = start(Duration::ZERO);
    wait_until("the connection to be tracked", || open.len() == 1);
    open.stop_reading();
    c.write_all(b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let text = read_all(c);
    assert!(
        text.contains("Connection: close\r\n") && text.ends_with("/late"),
        "{text}"
    );
    t.join().unwrap();
}

#[test]
fn a_peer_that_stops_reading_is_closed_after_the_send_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    let (done, finished) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let (config, app) = setup(&["--send-timeout", "300ms"]);
        let (open, park) = (OpenConns::default(), ThreadPark::current());
        let cx = Context {
            config: &config,
            app: &app,
            stats: app.stats().worker(0),
            open: &open,
            park: &park,
        };
        serve(server, &cx, |_| {
            Response::owned(200, "application/octet-stream", vec![0; 32 << 20]).into()
        });
        let _ = done.send(());
    });
    // 32 MiB does not fit in the socket buffers of a peer that reads nothing: the reply's
    // write stalls, and must give up after the send timeout rather than block forever.
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(
        finished.recv_timeout(Duration::from_secs(10)).is_ok(),
        "the connection was still being served 10 s after its peer stopped reading"
    );
    drop(client);
}
