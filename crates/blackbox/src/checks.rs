//! The checks: each starts its own server (`bin` with `args`, plus `--addr 127.0.0.1:0` and any
//! flags the check needs) and asserts one behaviour of the shared contract.
//!
//! [`suite!`](crate::suite) makes one `#[test]` per check. [`heavy_delays_hello`] is not in the
//! suite: it measures, and each pattern's own tests decide what the number should be.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

mod app;
mod clients;
mod crash;
mod idempotency;
mod push;
mod upload;
pub use app::*;
pub use clients::*;
pub use crash::*;
pub use idempotency::*;
pub use push::*;
pub use upload::*;

use crate::client::{Client, DEFAULT_TIMEOUT, Expect, ReadError, Response, preview};
use crate::json::{self, Value};
use crate::server::{Server, describe_exit};

/// The body of `GET /`.
pub const HELLO: &str = "Hello, World!";

/// A plain `GET /` on HTTP/1.1.
pub const GET_HELLO: &[u8] = b"GET / HTTP/1.1\r\nHost: blackbox\r\n\r\n";

/// How long a server may take to close a connection it said it would close (it may linger
/// reading what the client still sends).
pub(crate) const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// An HTTP/1.1 GET of `path`.
pub fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: blackbox\r\n\r\n")
}

/// An HTTP/1.1 `POST /echo` of `body`, framed by Content-Length.
pub fn post_echo(body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST /echo HTTP/1.1\r\nHost: blackbox\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

/// `args` followed by `extra`.
pub(crate) fn with<'a>(args: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
    args.iter().chain(extra).copied().collect()
}

/// Panics, showing the response, unless it is a 200 with body `Hello, World!`.
#[track_caller]
fn assert_hello(response: &Response) {
    response.assert_status(200).assert_body(HELLO);
}

/// `n` bytes of a fixed pseudo-random sequence (xorshift64), so a failure can be reproduced.
pub fn pseudo_random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// `GET /` answers 200 `Hello, World!` with Content-Type text/plain, Content-Length 13, a Date
/// and a Server header naming the pattern.
pub fn hello(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut c = Client::connect(server.addr());
    let r = c.request(GET_HELLO);
    assert_hello(&r);
    assert_eq!(r.version, "HTTP/1.1", "status line version:\n{r:?}");
    r.assert_header("Content-Length", "13");
    let content_type = r.header("Content-Type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain"),
        "Content-Type should be text/plain:\n{r:?}"
    );
    let date = r.header("Date").unwrap_or_default();
    assert!(
        date.len() == 29 && date.ends_with(" GMT"),
        "Date should be an IMF-fixdate like `Sun, 06 Nov 1994 08:49:37 GMT`:\n{r:?}"
    );
    let name = r.header("Server").unwrap_or_default();
    assert!(
        !name.is_empty() && server.startup_line().contains(name),
        "Server should name the pattern, as the startup line {:?} does:\n{r:?}",
        server.startup_line()
    );
    r.assert_keeps_alive();
}

/// One HTTP/1.1 connection serves 1000 requests in a row.
pub fn keep_alive_1000_requests(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut c = Client::connect(server.addr());
    for i in 0..1000 {
        let r = c.request(GET_HELLO);
        assert!(
            r.status == 200 && r.body == HELLO.as_bytes(),
            "request {i}:\n{r:?}"
        );
        r.assert_keeps_alive();
    }
}

/// 50 different requests sent in one write are all answered, in order.
pub fn pipelined_50_in_order(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut c = Client::connect(server.addr());
    let mut batch = Vec::new();
    for i in 0..50 {
        match i % 3 {
            0 => batch.extend_from_slice(GET_HELLO),
            1 => batch.extend_from_slice(get(&format!("/nope-{i}")).as_bytes()),
            _ => batch.extend(post_echo(format!("pipelined body #{i}").as_bytes())),
        }
    }
    c.send(&batch);
    for i in 0..50 {
        let r = c.read_response();
        let (status, body) = match i % 3 {
            0 => (200, Some(HELLO.to_string())),
            1 => (404, None),
            _ => (200, Some(format!("pipelined body #{i}"))),
        };
        assert!(
            r.status == status && body.as_ref().is_none_or(|b| r.body == b.as_bytes()),
            "response {i} of 50 should answer request {i} (status {status}, body {body:?}):\n{r:?}"
        );
    }
}

/// A GET and a POST with a body, written one byte per segment, are parsed and answered.
pub fn request_one_byte_at_a_time(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut c = Client::connect(server.addr()); // TCP_NODELAY: one segment per byte
    let mut requests =
        b"GET / HTTP/1.1\r\nHost: blackbox\r\nUser-Agent: blackbox\r\nAccept: */*\r\n\r\n".to_vec();
    requests.extend(post_echo(b"sent one byte at a time"));
    for byte in &requests {
        c.send([*byte]);
        thread::sleep(Duration::from_millis(1));
    }
    assert_hello(&c.read_response());
    c.read_response()
        .assert_status(200)
        .assert_body("sent one byte at a time");
}

/// A chunked POST /echo with chunk extensions and a trailer comes back de-chunked, and the
/// connection is still usable afterwards.
pub fn chunked_request_body(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut c = Client::connect(server.addr());
    c.send(
        "POST /echo HTTP/1.1\r\nHost: blackbox\r\nTransfer-Encoding: chunked\r\n\r\n\
         5;ext=1\r\nHello\r\n\
         8;name=\"quoted;value\"\r\n, World!\r\n\
         0\r\nX-Trailer: dropped\r\n\r\n",
    );
    c.read_response().assert_status(200).assert_body(HELLO);
    assert_hello(&c.request(GET_HELLO));
}

/// POST /echo of 1 MiB of pseudo-random bytes returns the same bytes.
pub fn echo_1mib(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut c = Client::connect(server.addr());
    c.set_timeout(Duration::from_secs(20));
    let body = pseudo_random_bytes(1 << 20, 0x5eed);
    let request = post_echo(&body);
    // Write from another thread, so that a server answering early cannot deadlock the test.
    let mut writer = c.stream().try_clone().expect("clone the socket");
    let sender = thread::spawn(move || std::io::Write::write_all(&mut writer, &request));
    let r = c.read_response();
    sender
        .join()
        .expect("writer thread")
        .expect("sending 1 MiB");
    r.assert_status(200);
    r.assert_header("Content-Length", &body.len().to_string());
    if let Some(at) = r.body.iter().zip(&body).position(|(a, b)| a != b) {
        panic!(
            "echoed body differs from byte {at}: got {}",
            preview(&r.body[at..])
        );
    }
    assert_eq!(r.body.len(), body.len(), "echoed body length");
}

/// An HTTP/1.0 request without keep-alive gets `Connection: close` and the connection closes.
pub fn http10_closes_after_reply(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut c = Client::connect(server.addr());
    let r = c.request("GET / HTTP/1.0\r\n\r\n");
    assert_hello(&r);
    r.assert_closes();
    c.expect_closed(CLOSE_WITHIN);
}

/// An HTTP/1.0 request with `Connection: keep-alive` is answered with `Connection: keep-alive`
/// and the connection serves a second request.
pub fn http10_keep_alive(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut c = Client::connect(server.addr());
    let request = "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
    for _ in 0..2 {
        let r = c.request(request);
        assert_hello(&r);
        assert!(
            r.has_token("Connection", "keep-alive"),
            "expected Connection: keep-alive:\n{r:?}"
        );
    }
}

/// An HTTP/1.1 request with `Connection: close` is answered with `Connection: close`, then the
/// connection closes.
pub fn http11_connection_close(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut c = Client::connect(server.addr());
    let r = c.request("GET / HTTP/1.1\r\nHost: blackbox\r\nConnection: close\r\n\r\n");
    assert_hello(&r);
    r.assert_closes();
    c.expect_closed(CLOSE_WITHIN);
}

/// HEAD / has the headers of GET / (Content-Length 13) and no body.
pub fn head_request(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut c = Client::connect(server.addr());
    let r = c.request("HEAD / HTTP/1.1\r\nHost: blackbox\r\n\r\n");
    r.assert_status(200).assert_header("Content-Length", "13");
    let content_type = r.header("Content-Type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain"),
        "Content-Type should be text/plain:\n{r:?}"
    );
    c.send(GET_HELLO);
    match c.try_read_response(Expect::Body) {
        Ok(r) => assert_hello(&r),
        Err(e) => {
            panic!("the GET / after HEAD / got no clean response (did HEAD send a body?): {e}")
        }
    }
}

/// `Expect: 100-continue` gets `100 Continue` before the body is sent, then the echo.
pub fn expect_100_continue(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut c = Client::connect(server.addr());
    c.send(
        "POST /echo HTTP/1.1\r\nHost: blackbox\r\nExpect: 100-continue\r\nContent-Length: 11\r\n\r\n",
    );
    c.set_timeout(Duration::from_secs(2));
    let interim = match c.try_read_response(Expect::Body) {
        Ok(r) => r,
        Err(e) => {
            panic!("expected `HTTP/1.1 100 Continue` within 2 s, before sending the body: {e}")
        }
    };
    interim.assert_status(100);
    c.set_timeout(DEFAULT_TIMEOUT);
    c.send("hello world");
    c.read_response()
        .assert_status(200)
        .assert_body("hello world");
}

/// An unknown path is 404, and the connection stays usable.
pub fn not_found_404(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut c = Client::connect(server.addr());
    c.request(get("/nope")).assert_status(404);
    assert_hello(&c.request(GET_HELLO));
}

/// A known path with a wrong method (`DELETE /`) is 405 with an `Allow` header listing GET.
pub fn wrong_method_405(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut c = Client::connect(server.addr());
    let r = c.request("DELETE / HTTP/1.1\r\nHost: blackbox\r\n\r\n");
    r.assert_status(405);
    assert!(r.has_token("Allow", "GET"), "Allow should list GET:\n{r:?}");
}

/// An unknown method on an unknown path (`FOO /nope`) is 501.
pub fn unknown_method_501(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut c = Client::connect(server.addr());
    c.request("FOO /nope HTTP/1.1\r\nHost: blackbox\r\n\r\n")
        .assert_status(501);
}

/// Sends `request` in one write to a server started with `args` + `extra`, and asserts the
/// reply has `status` and `Connection: close`, and that the server then closes.
fn assert_rejected(bin: &str, args: &[&str], extra: &[&str], request: &[u8], status: u16) {
    let server = Server::start(bin, &with(args, extra));
    let mut c = Client::connect(server.addr());
    c.send(request);
    let r = match c.try_read_response(Expect::Body) {
        Ok(r) => r,
        Err(e) => panic!("expected a {status} for request {}: {e}", preview(request)),
    };
    assert!(
        r.status == status,
        "expected {status} for request {}, got:\n{r:?}",
        preview(request)
    );
    r.assert_closes();
    c.expect_closed(CLOSE_WITHIN);
}

/// A POST whose body (chunked, after the head) is `chunked_body`.
fn chunked_post(chunked_body: &str) -> Vec<u8> {
    format!(
        "POST /echo HTTP/1.1\r\nHost: blackbox\r\nTransfer-Encoding: chunked\r\n\r\n{chunked_body}"
    )
    .into_bytes()
}

/// A request line with an extra token after the version is 400.
pub fn reject_extra_token_in_request_line(bin: &str, args: &[&str]) {
    assert_rejected(
        bin,
        args,
        &[],
        b"GET / HTTP/1.1 extra\r\nHost: blackbox\r\n\r\n",
        400,
    );
}

/// A request line with only a method (`GET`) is 400.
pub fn reject_request_line_without_target(bin: &str, args: &[&str]) {
    assert_rejected(bin, args, &[], b"GET\r\nHost: blackbox\r\n\r\n", 400);
}

/// Whitespace between a header name and its colon (`X-Spaced : x`) is 400.
pub fn reject_space_before_header_colon(bin: &str, args: &[&str]) {
    let request = b"GET / HTTP/1.1\r\nHost: blackbox\r\nX-Spaced : x\r\n\r\n";
    assert_rejected(bin, args, &[], request, 400);
}

/// A header line without a colon is 400.
pub fn reject_header_without_colon(bin: &str, args: &[&str]) {
    assert_rejected(
        bin,
        args,
        &[],
        b"GET / HTTP/1.1\r\nHost: blackbox\r\nNoColon\r\n\r\n",
        400,
    );
}

/// An HTTP/1.1 request without Host is 400.
pub fn reject_http11_without_host(bin: &str, args: &[&str]) {
    assert_rejected(
        bin,
        args,
        &[],
        b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n",
        400,
    );
}

/// Transfer-Encoding together with Content-Length is 400 (request smuggling guard).
pub fn reject_transfer_encoding_with_content_length(bin: &str, args: &[&str]) {
    let request = b"POST /echo HTTP/1.1\r\nHost: blackbox\r\nContent-Length: 5\r\n\
                    Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    assert_rejected(bin, args, &[], request, 400);
}

/// Two Content-Length headers with different values are 400.
pub fn reject_conflicting_content_lengths(bin: &str, args: &[&str]) {
    let request = b"POST /echo HTTP/1.1\r\nHost: blackbox\r\nContent-Length: 5\r\n\
                    Content-Length: 6\r\n\r\nhello!";
    assert_rejected(bin, args, &[], request, 400);
}

/// A chunk size that is not hex (`zz`) is 400.
pub fn reject_bad_chunk_size(bin: &str, args: &[&str]) {
    assert_rejected(
        bin,
        args,
        &[],
        &chunked_post("zz\r\nhello\r\n0\r\n\r\n"),
        400,
    );
}

/// A chunk extension without a name (`5;=x`) is 400.
pub fn reject_chunk_extension_without_name(bin: &str, args: &[&str]) {
    assert_rejected(
        bin,
        args,
        &[],
        &chunked_post("5;=x\r\nhello\r\n0\r\n\r\n"),
        400,
    );
}

/// A chunk extension with an unterminated quoted value (`5;a="unterminated`) is 400.
pub fn reject_unterminated_chunk_extension(bin: &str, args: &[&str]) {
    let body = "5;a=\"unterminated\r\nhello\r\n0\r\n\r\n";
    assert_rejected(bin, args, &[], &chunked_post(body), 400);
}

/// A bare CR inside a header value (`X: a\rb`) is 400.
pub fn reject_bare_cr_in_header(bin: &str, args: &[&str]) {
    assert_rejected(
        bin,
        args,
        &[],
        b"GET / HTTP/1.1\r\nHost: blackbox\r\nX: a\rb\r\n\r\n",
        400,
    );
}

/// A header section longer than `--max-head` is 431.
pub fn reject_header_section_too_large_431(bin: &str, args: &[&str]) {
    let request = format!(
        "GET / HTTP/1.1\r\nHost: blackbox\r\nX-Big: {}\r\n\r\n",
        "a".repeat(2000)
    );
    assert_rejected(bin, args, &["--max-head", "1024"], request.as_bytes(), 431);
}

/// A request-target longer than `--max-target` is 414.
pub fn reject_target_too_long_414(bin: &str, args: &[&str]) {
    let request = get(&format!("/{}", "t".repeat(600)));
    assert_rejected(bin, args, &["--max-target", "256"], request.as_bytes(), 414);
}

/// A Content-Length over `--max-body` is 413, delivered even though part of the body was sent.
pub fn reject_content_length_over_limit_413(bin: &str, args: &[&str]) {
    let mut request =
        b"POST /echo HTTP/1.1\r\nHost: blackbox\r\nContent-Length: 1048576\r\n\r\n".to_vec();
    request.extend(pseudo_random_bytes(4096, 413));
    assert_rejected(bin, args, &["--max-body", "1K"], &request, 413);
}

/// A chunked body that grows past `--max-body` is 413 before the body ends.
pub fn reject_chunked_body_over_limit_413(bin: &str, args: &[&str]) {
    // Four 1000-byte chunks and no last chunk: the server must not wait for the end.
    let chunk = format!("3e8\r\n{}\r\n", "c".repeat(1000));
    assert_rejected(
        bin,
        args,
        &["--max-body", "1K"],
        &chunked_post(&chunk.repeat(4)),
        413,
    );
}

/// `Transfer-Encoding: gzip` is 501.
pub fn reject_transfer_encoding_gzip_501(bin: &str, args: &[&str]) {
    let request = b"POST /echo HTTP/1.1\r\nHost: blackbox\r\nTransfer-Encoding: gzip\r\n\r\n";
    assert_rejected(bin, args, &[], request, 501);
}

/// `HTTP/2.0` in the request line is 505.
pub fn reject_http20_505(bin: &str, args: &[&str]) {
    assert_rejected(
        bin,
        args,
        &[],
        b"GET / HTTP/2.0\r\nHost: blackbox\r\n\r\n",
        505,
    );
}

/// `HTTP/1.2` in the request line is 505.
pub fn reject_http12_505(bin: &str, args: &[&str]) {
    assert_rejected(
        bin,
        args,
        &[],
        b"GET / HTTP/1.2\r\nHost: blackbox\r\n\r\n",
        505,
    );
}

/// A valid request pipelined after a malformed one is not answered: after the 400 the
/// connection closes.
pub fn no_reply_after_rejected_request(bin: &str, args: &[&str]) {
    let mut request = b"GET / HTTP/1.1 extra\r\nHost: blackbox\r\n\r\n".to_vec();
    request.extend_from_slice(GET_HELLO);
    assert_rejected(bin, args, &[], &request, 400);
}

/// A server at its bound (`--max-conns`, `--max-threads`...) with `held` connections open and
/// served: one more connection completes its handshake but gets no reply while they stay open
/// (it waits in the accept queue); once the first closes, it is served. Returns the connections
/// still open, the late one last, for the caller to go on with.
pub fn next_connection_waits_at_the_bound(server: &Server, held: usize) -> Vec<Client> {
    let mut clients: Vec<Client> = (0..held).map(|_| Client::connect(server.addr())).collect();
    for c in &mut clients {
        c.request(GET_HELLO).assert_status(200);
    }
    let mut late = Client::connect(server.addr()); // the kernel completes the handshake
    late.send(GET_HELLO);
    late.set_timeout(Duration::from_secs(1));
    match late.try_read_response(Expect::Body) {
        Err(ReadError::Timeout { received }) if received.is_empty() => {}
        other => panic!(
            "connection {} at the bound of {held} should get nothing: {other:?}",
            held + 1
        ),
    }
    drop(clients.remove(0));
    late.set_timeout(Duration::from_secs(10));
    late.read_response().assert_status(200).assert_body(HELLO);
    clients.push(late);
    clients
}

/// GETs `/stats` on a new connection; returns it parsed and as text (for messages).
pub fn fetch_stats(addr: SocketAddr) -> (Value, String) {
    let mut c = Client::connect(addr);
    let r = c.request(get("/stats"));
    r.assert_status(200);
    let content_type = r.header("Content-Type").unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "/stats Content-Type:\n{r:?}"
    );
    let text = r.body_text();
    match json::parse(&text) {
        Ok(stats) => (stats, text),
        Err(e) => panic!("/stats is not JSON ({e}):\n{r:?}"),
    }
}

/// Numeric field `field` of each entry of the `workers` array of a `/stats` document.
pub fn per_worker(stats: &Value, field: &str) -> Vec<u64> {
    let workers = stats.get("workers").and_then(Value::as_array);
    let workers = workers.unwrap_or_else(|| panic!("/stats has no `workers` array: {stats:?}"));
    assert!(!workers.is_empty(), "/stats lists no workers: {stats:?}");
    workers
        .iter()
        .map(|w| {
            let n = w.get(field).and_then(Value::as_u64);
            n.unwrap_or_else(|| panic!("a /stats worker has no numeric `{field}`: {w:?}"))
        })
        .collect()
}

/// The sum of numeric field `field` over the `workers` array of a `/stats` document.
pub fn sum_over_workers(stats: &Value, field: &str) -> u64 {
    per_worker(stats, field).iter().sum()
}

/// 200 concurrent clients × 50 keep-alive requests all succeed, and `/stats` then counts exactly
/// 200×50 + 1 requests and 200 + 1 (+ the readiness probe) accepted connections.
pub fn concurrent_clients_counted_in_stats(bin: &str, args: &[&str]) {
    const CLIENTS: usize = 200;
    const REQUESTS: usize = 50;
    let server = Server::start(bin, args);
    let addr = server.addr();
    // Every client connects, then all start together, so 200 connections are open at once.
    let start = Arc::new(Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let start = Arc::clone(&start);
            thread::Builder::new()
                .name(format!("client-{i}"))
                .stack_size(256 * 1024)
                .spawn(move || -> Result<(), String> {
                    let connected = Client::try_connect(addr, Duration::from_secs(10));
                    start.wait();
                    let mut c = connected.map_err(|e| format!("client {i}: connect: {e}"))?;
                    for j in 0..REQUESTS {
                        c.try_send(GET_HELLO)
                            .map_err(|e| format!("client {i} #{j}: send: {e}"))?;
                        let r = c.try_read_response(Expect::Body);
                        let r = r.map_err(|e| format!("client {i} #{j}: {e}"))?;
                        if r.status != 200 || r.body != HELLO.as_bytes() {
                            return Err(format!("client {i} #{j}:\n{r:?}"));
                        }
                    }
                    Ok(())
                })
                .expect("spawn a client thread")
        })
        .collect();
    let errors: Vec<String> = clients
        .into_iter()
        .filter_map(|t| {
            t.join()
                .unwrap_or_else(|_| Err("client thread panicked".into()))
                .err()
        })
        .collect();
    assert!(
        errors.is_empty(),
        "{} of {CLIENTS} clients failed; the first ones:\n{}",
        errors.len(),
        errors
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );

    let (stats, text) = fetch_stats(addr);
    let pid = stats.get("pid").and_then(Value::as_u64);
    assert_eq!(pid, Some(u64::from(server.pid())), "/stats pid: {text}");
    let pattern = stats
        .get("pattern")
        .and_then(Value::as_str)
        .unwrap_or_default();
    assert!(
        !pattern.is_empty(),
        "/stats should name its pattern: {text}"
    );
    let requests = sum_over_workers(&stats, "requests");
    let accepted = sum_over_workers(&stats, "accepted");
    let want_requests = (CLIENTS * REQUESTS + 1) as u64;
    let want_accepted = CLIENTS as u64 + 1 + Server::PROBE_CONNECTIONS;
    assert_eq!(
        requests, want_requests,
        "requests summed over workers should be {CLIENTS}×{REQUESTS} + the /stats request: {text}"
    );
    assert_eq!(
        accepted, want_accepted,
        "accepted summed over workers should be {CLIENTS} clients + the /stats connection + the \
         readiness probe: {text}"
    );
}

/// With `--header-timeout 500ms`, a connection that stalls mid-head is closed (after a 408, if
/// anything is sent) within about 3 s.
pub fn header_timeout(bin: &str, args: &[&str]) {
    let server = Server::start(bin, &with(args, &["--header-timeout", "500ms"]));
    let mut c = Client::connect(server.addr());
    c.send("GET / HTTP/1.1\r\nHo");
    c.set_timeout(Duration::from_secs(3));
    let sent = Instant::now();
    match c.try_read_response(Expect::Body) {
        Ok(r) => {
            assert!(
                r.status == 408,
                "a stalled request head should get 408 or a close:\n{r:?}"
            );
            c.expect_closed(CLOSE_WITHIN);
        }
        Err(ReadError::Closed) => {}
        Err(e) => panic!(
            "a stalled request head was neither answered 408 nor closed after {:?}: {e}",
            sent.elapsed()
        ),
    }
}

/// With `--idle-timeout 500ms`, a keep-alive connection left idle after a response is closed
/// within about 3 s.
pub fn idle_timeout(bin: &str, args: &[&str]) {
    let server = Server::start(bin, &with(args, &["--idle-timeout", "500ms"]));
    let mut c = Client::connect(server.addr());
    let r = c.request(GET_HELLO);
    assert_hello(&r);
    r.assert_keeps_alive();
    let idle = Instant::now();
    if let Err(e) = c.try_expect_closed(Duration::from_secs(3)) {
        panic!(
            "an idle keep-alive connection was not closed after {:?}: {e}",
            idle.elapsed()
        );
    }
}

/// At SIGTERM every server applies one policy (proto's): a connection idle between requests is
/// closed at once; one accepted but silent may still send its first request within the
/// shutdown grace, is answered, and then closed; one that stays silent is closed when the grace
/// ends; then the server exits 0. (The reply may still say keep-alive: a prefork worker can
/// read the request before its own SIGTERM from the master arrives.)
pub fn sigterm_grace_for_a_fresh_connection(bin: &str, args: &[&str]) {
    const GRACE: Duration = Duration::from_secs(3);
    let mut server = Server::start(bin, &with(args, &["--shutdown-grace", "3s"]));
    let addr = server.addr();
    let mut idle = Client::connect(addr);
    assert_hello(&idle.request(GET_HELLO));
    let mut fresh = Client::connect(addr);
    let mut silent = Client::connect(addr);
    // Until the server serves all three: `accepted` counts a connection once a worker has it
    // (besides these three, the readiness probe and each /stats connection).
    let deadline = Instant::now() + Duration::from_secs(10);
    for polls in 1.. {
        let (stats, text) = fetch_stats(addr);
        let accepted = stats
            .get("total")
            .and_then(|t| t.get("accepted"))
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("/stats has no total.accepted: {text}"));
        if accepted >= 4 + polls {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not take all three connections within 10 s: {text}"
        );
        thread::sleep(Duration::from_millis(10));
    }

    server.signal(libc::SIGTERM);
    if let Err(e) = idle.try_expect_closed(CLOSE_WITHIN) {
        panic!("at SIGTERM, a connection idle between requests should be closed: {e}");
    }
    let signalled = Instant::now();
    fresh.send(GET_HELLO);
    fresh.set_timeout(GRACE + CLOSE_WITHIN);
    assert_hello(&fresh.read_response());
    if let Err(e) = fresh.try_expect_closed(CLOSE_WITHIN) {
        panic!("after answering its first request at shutdown, the connection should close: {e}");
    }
    if let Err(e) = silent.try_expect_closed(GRACE + CLOSE_WITHIN) {
        panic!("a connection silent through the shutdown grace should be closed: {e}");
    }
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "the server should exit 0 after the shutdown ({:?} since SIGTERM): {}",
        signalled.elapsed(),
        status.map_or("still running".into(), describe_exit)
    );
}

/// Out of file descriptors (RLIMIT_NOFILE 64, 100 connections), the server does not spin
/// (< 0.5 s CPU over 1.5 s) and serves again once the connections are gone.
pub fn emfile_no_spin(bin: &str, args: &[&str]) {
    let server = Server::start_with_nofile(bin, args, 64);
    let addr = server.addr();
    // They complete in the kernel's backlog whether or not the server can accept them.
    let held: Vec<Client> = (0..100)
        .map(
            |i| match Client::try_connect(addr, Duration::from_secs(5)) {
                Ok(c) => c,
                Err(e) => panic!("connection {i} of 100 failed: {e}"),
            },
        )
        .collect();
    thread::sleep(Duration::from_millis(300));
    let before = server.cpu_time();
    let window = Instant::now();
    thread::sleep(Duration::from_millis(1500));
    let spent = server.cpu_time() - before;
    let elapsed = window.elapsed();
    assert!(
        spent < 0.5,
        "server used {spent:.2} s of CPU in {elapsed:?} while out of file descriptors: it spins"
    );

    drop(held);
    let freed = Instant::now();
    let mut last_error = String::new();
    while freed.elapsed() < Duration::from_secs(10) {
        let attempt = Client::try_connect(addr, Duration::from_secs(2)).map_err(|e| e.to_string());
        let outcome = attempt.and_then(|mut c| {
            c.set_timeout(Duration::from_secs(3));
            c.try_send(GET_HELLO).map_err(|e| e.to_string())?;
            c.try_read_response(Expect::Body).map_err(|e| e.to_string())
        });
        match outcome {
            Ok(r) => {
                assert_hello(&r);
                return;
            }
            Err(e) => last_error = e,
        }
        thread::sleep(Duration::from_millis(100));
    }
    panic!("no GET / succeeded within 10 s of freeing the descriptors; last error: {last_error}");
}

/// SIGTERM under load: every response any client got is whole and correct, 4 in-flight
/// `/block?ms=400` requests and a 6 MiB echo still being written get whole 200s, and the server
/// exits with 0 within 10 s.
pub fn sigterm_during_load(bin: &str, args: &[&str]) {
    shutdown_under_load(bin, args, libc::SIGTERM, 8, 4);
}

/// SIGINT under lighter load (2 GET loops, 1 `/block`, the 6 MiB echo): the same guarantees as
/// for SIGTERM.
pub fn sigint_during_load(bin: &str, args: &[&str]) {
    shutdown_under_load(bin, args, libc::SIGINT, 2, 1);
}

/// Runs `loaders` keep-alive GET loops, `blockers` in-flight `/block?ms=400` requests and a
/// 6 MiB echo whose reader is slow, then sends `signal` and checks the graceful shutdown.
fn shutdown_under_load(bin: &str, args: &[&str], signal: i32, loaders: usize, blockers: usize) {
    let mut server = Server::start(bin, args);
    let addr = server.addr();

    // A reply still being written when the signal arrives: with a small receive buffer and no
    // reads until after the signal, most of the 6 MiB wait in the server.
    let echo_body = pseudo_random_bytes(6 << 20, 0x516);
    let mut echo = {
        let c = Client::connect(addr);
        c.set_recv_buffer(64 * 1024).expect("set SO_RCVBUF");
        let mut writer = c.stream().try_clone().expect("clone the socket");
        let request = post_echo(&echo_body);
        let sender = thread::spawn(move || std::io::Write::write_all(&mut writer, &request));
        let sending = Instant::now();
        while !sender.is_finished() && sending.elapsed() < Duration::from_secs(10) {
            thread::sleep(Duration::from_millis(5));
        }
        assert!(
            sender.is_finished(),
            "the server did not read a 6 MiB POST /echo within 10 s"
        );
        sender
            .join()
            .expect("writer thread")
            .expect("sending 6 MiB");
        c
    };
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..loaders)
        .map(|i| {
            let (stop, served) = (Arc::clone(&stop), Arc::clone(&served));
            thread::Builder::new()
                .name(format!("load-{i}"))
                .spawn(move || load_until_closed(addr, i, &stop, &served))
                .expect("spawn a load thread")
        })
        .collect();
    let warm = Instant::now();
    while served.load(Ordering::Relaxed) < 10 * loaders as u64 && warm.elapsed().as_secs() < 5 {
        thread::sleep(Duration::from_millis(5));
    }

    // Each /block connection first completes a GET, so the server has surely accepted it.
    let mut blocked: Vec<Client> = (0..blockers)
        .map(|_| {
            let mut c = Client::connect(addr);
            assert_hello(&c.request(GET_HELLO));
            c
        })
        .collect();
    for c in &mut blocked {
        c.send(get("/block?ms=400"));
    }
    thread::sleep(Duration::from_millis(100));
    server.signal(signal);

    let mut failures = Vec::new();
    for (i, c) in blocked.iter_mut().enumerate() {
        c.set_timeout(Duration::from_secs(10));
        match c.try_read_response(Expect::Body) {
            Ok(r) if r.status == 200 => {}
            Ok(r) => failures.push(format!("in-flight /block #{i} got a non-200:\n{r:?}")),
            Err(e) => failures.push(format!("in-flight /block #{i} got no whole reply: {e}")),
        }
    }
    echo.set_timeout(Duration::from_secs(10));
    match echo.try_read_response(Expect::Body) {
        Ok(r) if r.status == 200 && r.body == echo_body => {}
        Ok(r) => failures.push(format!("the 6 MiB echo came back wrong:\n{r:?}")),
        Err(e) => failures.push(format!("the 6 MiB echo got no whole reply: {e}")),
    }
    let exit = server.wait_exit(Duration::from_secs(10));
    stop.store(true, Ordering::Relaxed);
    for t in load {
        failures.extend(
            t.join()
                .unwrap_or_else(|_| vec!["a load thread panicked".into()]),
        );
    }
    assert!(
        failures.is_empty(),
        "after signal {signal} ({} GETs served):\n{}",
        served.load(Ordering::Relaxed),
        failures.join("\n")
    );
    match exit {
        Some(status) if status.code() == Some(0) => {}
        Some(status) => panic!("after signal {signal} the server {}", describe_exit(status)),
        None => panic!("the server was still running 10 s after signal {signal}"),
    }
}

/// Loops keep-alive `GET /` (reconnecting when the server closes between requests) until
/// `stop` is set or a connect fails; returns every wrong, truncated or garbled response.
fn load_until_closed(
    addr: SocketAddr,
    id: usize,
    stop: &AtomicBool,
    served: &AtomicU64,
) -> Vec<String> {
    let mut failures = Vec::new();
    'connect: while !stop.load(Ordering::Relaxed) {
        // Refused once the server stopped listening.
        let Ok(mut c) = Client::try_connect(addr, Duration::from_secs(2)) else {
            break;
        };
        while !stop.load(Ordering::Relaxed) {
            if c.try_send(GET_HELLO).is_err() {
                continue 'connect; // closed between requests: fine
            }
            match c.try_read_response(Expect::Body) {
                Ok(r) if r.status == 200 && r.body == HELLO.as_bytes() => {
                    served.fetch_add(1, Ordering::Relaxed);
                }
                Ok(r) => {
                    failures.push(format!("load client {id} got a wrong response:\n{r:?}"));
                    break 'connect;
                }
                Err(ReadError::Closed) => continue 'connect, // closed between requests: fine
                Err(e) => {
                    failures.push(format!("load client {id}: {e}"));
                    break 'connect;
                }
            }
        }
    }
    failures
}

/// Sends `heavy_path` (e.g. `/work?us=200000`) on one connection, waits 20 ms, then times a
/// `GET /` on a second, already-open connection; returns that GET's latency.
///
/// Not part of [`suite!`](crate::suite): a pattern's own tests decide what to expect (a single
/// event loop without offloading is blocked by the heavy request; with offloading it is not).
pub fn heavy_delays_hello(bin: &str, args: &[&str], heavy_path: &str) -> Duration {
    let server = Server::start(bin, args);
    let mut heavy = Client::connect(server.addr());
    let mut light = Client::connect(server.addr());
    // Accepted and served once, so that the timed request pays no first-connection costs.
    assert_hello(&light.request(GET_HELLO));
    heavy.set_timeout(Duration::from_secs(10));
    light.set_timeout(Duration::from_secs(10));
    heavy.send(get(heavy_path));
    thread::sleep(Duration::from_millis(20));
    let sent = Instant::now();
    let r = light.request(GET_HELLO);
    let latency = sent.elapsed();
    assert_hello(&r);
    heavy.read_response().assert_status(200);
    latency
}
