//! The demo aids `scripts/demo.sh` uses: `GET /split` (a streamed reply) and the `--dataset-mb`
//! data set with `POST /snapshot`, Redis's BGSAVE by fork(2).

use std::time::{Duration, Instant};

use blackbox::checks::get;
use blackbox::json::{self, Value};
use blackbox::{Client, Server};

const BIN: &str = env!("CARGO_BIN_EXE_single-thread");

fn post(path: &str) -> String {
    format!("POST {path} HTTP/1.1\r\nHost: blackbox\r\nContent-Length: 0\r\n\r\n")
}

fn json_of(c: &mut Client, request: String, status: u16) -> Value {
    let reply = c.request(request);
    reply.assert_status(status);
    json::parse(&reply.body_text()).unwrap_or_else(|e| panic!("{e}: {reply:?}"))
}

fn field(v: &Value, name: &str) -> u64 {
    v.get(name)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no {name} in {v:?}"))
}

#[test]
fn split_streams_hello_in_chunks() {
    let server = Server::start(BIN, &[]);
    let mut c = Client::connect(server.addr());
    for _ in 0..3 {
        let reply = c.request(get("/split"));
        reply
            .assert_status(200)
            .assert_header("transfer-encoding", "chunked")
            .assert_body("Hello, World!");
    }
    // The connection stays usable after streamed replies.
    c.request(get("/")).assert_body("Hello, World!");
}

#[test]
fn without_a_data_set_the_snapshot_routes_do_not_exist() {
    let server = Server::start(BIN, &[]);
    let mut c = Client::connect(server.addr());
    c.request(post("/snapshot")).assert_status(404);
    c.request(get("/dataset")).assert_status(404);
}

/// The child writes the data as of the fork, while the parent changes it; one snapshot at a
/// time; the child is reaped.
#[test]
fn snapshot_holds_the_data_as_of_the_fork() {
    let dir = std::env::temp_dir().join(format!("single-thread-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("dump");
    let path_arg = path.to_str().unwrap().to_string();
    let server = Server::start(
        BIN,
        &[
            "--dataset-mb",
            "4",
            "--snapshot-path",
            &path_arg,
            "--snapshot-delay",
            "100ms",
        ],
    );
    let mut c = Client::connect(server.addr());
    let touched = json_of(&mut c, post("/dataset/touch?mb=4"), 200);
    assert_eq!(field(&touched, "generation"), 1);
    assert_eq!(field(&touched, "touched_pages"), 1024);

    let started = json_of(&mut c, post("/snapshot"), 202);
    assert_eq!(field(&started, "generation"), 1);
    let child = field(&started, "child_pid");
    // The child takes ~400 ms (100 ms per MiB): a second snapshot now is refused, and the
    // parent goes on serving and writing meanwhile.
    c.request(post("/snapshot")).assert_status(409);
    let during = json_of(&mut c, post("/dataset/touch?mb=4"), 200);
    assert_eq!(field(&during, "generation"), 2);
    c.request(get("/")).assert_body("Hello, World!");

    let deadline = Instant::now() + Duration::from_secs(30);
    let done = loop {
        let status = json_of(&mut c, get("/snapshot"), 200);
        match status.get("state").and_then(Value::as_str) {
            Some("running") => {}
            Some(_) => break status,
            None => panic!("no state: {status:?}"),
        }
        assert!(Instant::now() < deadline, "the snapshot never finished");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        done.get("state").and_then(Value::as_str),
        Some("done"),
        "{done:?}"
    );
    assert_eq!(field(&done, "exit"), 0);
    // Reaped: no zombie left behind.
    assert!(
        !std::path::Path::new(&format!("/proc/{child}")).exists(),
        "child {child} still exists"
    );

    let data = std::fs::read(&path).unwrap();
    assert_eq!(data.len(), 4 << 20);
    for (i, page) in data.chunks_exact(4096).enumerate() {
        let expected = (1u64 << 32 | i as u64).to_le_bytes();
        assert!(
            page.chunks_exact(8).all(|w| w == expected),
            "page {i} is not generation 1's: {:?}",
            &page[..8]
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
