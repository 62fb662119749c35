//! A real EventSource client that nobody here wrote (the npm `eventsource` package, in node)
//! against `/events`: it receives live messages; when the server goes away (a restart on the
//! same port and journal) it reconnects with `Last-Event-ID` and gets exactly the messages it
//! missed. Needs node and `npm ci --prefix clients` (.ci/run does both).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use blackbox::checks::post_message;
use blackbox::json::{self, Value};
use blackbox::{Client, Server};

const BIN: &str = env!("CARGO_BIN_EXE_single-thread");

fn clients_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../clients")
}

/// The node client, its stdout lines arriving on a channel; killed on drop.
struct Node {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Node {
    fn start(url: &str, count: usize) -> Node {
        let dir = clients_dir();
        assert!(
            dir.join("node_modules/eventsource").exists(),
            "the eventsource package is not installed: run `npm ci --prefix clients`"
        );
        let mut child = Command::new("node")
            .arg(dir.join("eventsource.mjs"))
            .arg(url)
            .arg(count.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node (install Node.js 18 or later)");
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Node { child, lines }
    }

    /// The next line the client printed, parsed.
    #[track_caller]
    fn next(&self) -> Value {
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(20))
            .expect("the EventSource client said nothing for 20 s");
        json::parse(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    /// Skips connection notices until a message event; returns its (id, body).
    #[track_caller]
    fn next_message(&self) -> (String, String) {
        loop {
            let v = self.next();
            if let Some(id) = v.get("id").and_then(Value::as_str) {
                let body = v
                    .get("data")
                    .and_then(|d| d.get("body"))
                    .and_then(Value::as_str);
                return (id.to_string(), body.unwrap_or_default().to_string());
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_npm_eventsource_client_reconnects_with_last_event_id() {
    let dir = blackbox::server::fresh_data_dir();
    let dir_arg = dir.display().to_string();
    let mut first = Server::start(BIN, &["--data-dir", &dir_arg]);
    let addr = first.addr();
    let node = Node::start(&format!("http://{addr}/events?type=message"), 5);
    // Connected once the server holds the stream.
    let v = node.next();
    assert_eq!(
        v.get("connect").and_then(Value::as_bool),
        Some(true),
        "{v:?}"
    );
    assert!(
        v.get("lastEventId").is_some_and(|id| id.as_str().is_none()),
        "first connection: no Last-Event-ID: {v:?}"
    );
    wait_held(addr, 1);

    let mut c = Client::connect(addr);
    let m1 = post_message(&mut c, "one");
    let m2 = post_message(&mut c, "two");
    assert_eq!(node.next_message(), (m1.to_string(), "one".to_string()));
    assert_eq!(node.next_message(), (m2.to_string(), "two".to_string()));
    drop(c);

    // The server goes away (its streams end) and comes back on the same port and journal;
    // messages arrive before the client (retry: 2000) is back.
    first.signal(libc::SIGTERM);
    assert!(
        first
            .wait_exit(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );
    let second = Server::start(BIN, &["--data-dir", &dir_arg, "--addr", &addr.to_string()]);
    let mut c = Client::connect(second.addr());
    let m3 = post_message(&mut c, "three");
    let m4 = post_message(&mut c, "four");
    // The reconnection carries the last id it saw.
    let reconnect = loop {
        let v = node.next();
        if v.get("connect").is_some() {
            break v;
        }
    };
    assert_eq!(
        reconnect.get("lastEventId").and_then(Value::as_str),
        Some(m2.to_string().as_str()),
        "{reconnect:?}"
    );
    assert_eq!(node.next_message(), (m3.to_string(), "three".to_string()));
    assert_eq!(node.next_message(), (m4.to_string(), "four".to_string()));
    let m5 = post_message(&mut c, "five, live");
    assert_eq!(
        node.next_message(),
        (m5.to_string(), "five, live".to_string())
    );
    drop(second);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits until the server holds `n` requests (its /stats says so).
fn wait_held(addr: std::net::SocketAddr, n: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (stats, text) = blackbox::checks::fetch_stats(addr);
        let held = stats
            .get("total")
            .and_then(|t| t.get("held"))
            .and_then(Value::as_u64);
        if held.unwrap_or(0) >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not held after 10 s: {text}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}
