//! Framing and rejection cases in the style of h11's tests: each case is run with its input
//! whole, one byte at a time, and followed by a second pipelined request.

mod common;

use common::{Outcome, run};
use proto::{Conn, Limits};

const SECOND: &[u8] = b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n";

enum Expect {
    /// The requests parsed: (method, target, body).
    Ok(&'static [(&'static str, &'static str, &'static [u8])]),
    /// The connection is answered with this status and closed.
    Err(u16),
}

fn limits() -> Limits {
    Limits {
        max_head: 1024,
        max_target: 256,
        max_body: 4096,
        max_pipeline: 64,
        ..Limits::default()
    }
}

fn check(name: &str, input: &[u8], expect: Expect) {
    for step in [0, 1] {
        let whole = run(input, limits(), step, false);
        let piped = [input, SECOND].concat();
        let with_second = run(&piped, limits(), step, false);
        let how = if step == 0 { "whole" } else { "byte by byte" };
        match expect {
            Expect::Ok(want) => {
                let got: Vec<_> = whole
                    .seen
                    .iter()
                    .map(|s| (s.method.as_str(), s.target.as_str(), s.body.as_slice()))
                    .collect();
                assert_eq!(got, want, "{name} ({how})");
                assert!(
                    whole.statuses().iter().all(|&s| s == 200),
                    "{name} ({how}): {}",
                    text(&whole)
                );
                // Unless the case closes the connection, the pipelined request is served next.
                let keeps_open = whole.seen.last().is_some_and(|s| s.keep_alive);
                let last = with_second.seen.last().map(|s| s.target.as_str());
                if keeps_open {
                    assert_eq!(
                        with_second.seen.len(),
                        want.len() + 1,
                        "{name} ({how}) + second"
                    );
                    assert_eq!(last, Some("/second"), "{name} ({how}) + second");
                } else {
                    assert_eq!(
                        with_second.seen.len(),
                        want.len(),
                        "{name} ({how}) + second after close"
                    );
                    assert!(with_second.finished, "{name} ({how}): not closed");
                }
            }
            Expect::Err(status) => {
                for (out, what) in [(&whole, ""), (&with_second, " + second")] {
                    assert_eq!(
                        out.statuses(),
                        vec![status],
                        "{name} ({how}{what}): {}",
                        text(out)
                    );
                    assert!(
                        out.seen.is_empty(),
                        "{name} ({how}{what}): a request got through"
                    );
                    assert!(
                        out.finished,
                        "{name} ({how}{what}): connection not finished"
                    );
                    assert!(
                        text(out).contains("Connection: close\r\n"),
                        "{name} ({how}{what})"
                    );
                }
            }
        }
    }
}

fn text(o: &Outcome) -> String {
    String::from_utf8_lossy(&o.output).into_owned()
}

#[test]
fn simple_get() {
    check(
        "get",
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        Expect::Ok(&[("GET", "/", b"")]),
    );
}

#[test]
fn empty_lines_before_request_are_ignored() {
    check(
        "crlf",
        b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        Expect::Ok(&[("GET", "/", b"")]),
    );
    check(
        "lf",
        b"\n\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        Expect::Ok(&[("GET", "/", b"")]),
    );
}

#[test]
fn bare_lf_line_endings_are_accepted() {
    // RFC 9112 2.2 allows a recipient to take a lone LF as a line terminator (httparse does).
    check(
        "lf head",
        b"GET / HTTP/1.1\nHost: a\n\n",
        Expect::Ok(&[("GET", "/", b"")]),
    );
}

#[test]
fn any_token_is_a_method() {
    check(
        "custom",
        b"PURGE /x HTTP/1.1\r\nHost: a\r\n\r\n",
        Expect::Ok(&[("PURGE", "/x", b"")]),
    );
    check(
        "lower",
        b"get /x HTTP/1.1\r\nHost: a\r\n\r\n",
        Expect::Ok(&[("get", "/x", b"")]),
    );
}

#[test]
fn content_length_body() {
    check(
        "cl",
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
        Expect::Ok(&[("POST", "/echo", b"hello")]),
    );
    check(
        "cl repeated same",
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        Expect::Ok(&[("POST", "/echo", b"hello")]),
    );
    check(
        "cl list same",
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello",
        Expect::Ok(&[("POST", "/echo", b"hello")]),
    );
}

#[test]
fn chunked_body_with_extensions_and_trailers() {
    check(
        "chunked",
        b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=1;y=\"q\\\"v\"\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
        Expect::Ok(&[("POST", "/echo", b"hello world")]),
    );
    check(
        "chunked upper hex, BWS",
        b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\nA ; ext\r\n0123456789\r\n0\r\n\r\n",
        Expect::Ok(&[("POST", "/echo", b"0123456789")]),
    );
}

#[test]
fn pipelined_requests_in_one_input() {
    check(
        "three",
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhiGET /3 HTTP/1.1\r\nHost: a\r\n\r\n",
        Expect::Ok(&[("GET", "/1", b""), ("POST", "/2", b"hi"), ("GET", "/3", b"")]),
    );
}

#[test]
fn keep_alive_rules() {
    // HTTP/1.0 closes by default: the pipelined second request is never read.
    check(
        "1.0",
        b"GET / HTTP/1.0\r\n\r\n",
        Expect::Ok(&[("GET", "/", b"")]),
    );
    check(
        "1.0 keep-alive",
        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        Expect::Ok(&[("GET", "/", b"")]),
    );
    check(
        "1.1 close",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        Expect::Ok(&[("GET", "/", b"")]),
    );
    let ka = run(
        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        limits(),
        0,
        false,
    );
    assert!(ka.seen[0].keep_alive && !ka.finished);
    assert!(String::from_utf8_lossy(&ka.output).contains("Connection: keep-alive\r\n"));
    let close = run(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Close\r\n\r\n",
        limits(),
        0,
        false,
    );
    assert!(!close.seen[0].keep_alive && close.finished);
    assert!(String::from_utf8_lossy(&close.output).contains("Connection: close\r\n"));
}

#[test]
fn malformed_request_lines_are_400() {
    for (name, input) in [
        ("extra token", &b"GET / HTTP/1.1 x\r\nHost: a\r\n\r\n"[..]),
        ("no target", b"GET\r\nHost: a\r\n\r\n"),
        ("double space", b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n"),
        ("leading space", b" GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
        ("control in method", b"G\x01T / HTTP/1.1\r\nHost: a\r\n\r\n"),
        ("bare CR in line", b"GET /\r HTTP/1.1\r\nHost: a\r\n\r\n"),
        ("bad protocol", b"GET / FTP/1.1\r\nHost: a\r\n\r\n"),
        (
            "bare CR before request",
            b"\rGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        ),
        // RFC 3986: a target is URI characters; a client percent-encodes anything else.
        (
            "raw UTF-8 in target",
            "GET /café HTTP/1.1\r\nHost: a\r\n\r\n".as_bytes(),
        ),
        ("DEL in target", b"GET /a\x7fb HTTP/1.1\r\nHost: a\r\n\r\n"),
        (
            "control in target",
            b"GET /a\x01b HTTP/1.1\r\nHost: a\r\n\r\n",
        ),
    ] {
        check(name, input, Expect::Err(400));
    }
}

#[test]
fn percent_encoded_and_reserved_characters_in_targets_are_routed() {
    check(
        "percent-encoded UTF-8",
        b"GET /caf%C3%A9?q=a%20b&x=[1]:@!$'()*+,;= HTTP/1.1\r\nHost: a\r\n\r\n",
        Expect::Ok(&[("GET", "/caf%C3%A9?q=a%20b&x=[1]:@!$'()*+,;=", b"")]),
    );
}

#[test]
fn malformed_headers_are_400() {
    for (name, input) in [
        (
            "space before colon",
            &b"GET / HTTP/1.1\r\nHost : a\r\n\r\n"[..],
        ),
        ("no colon", b"GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n"),
        (
            "obs-fold",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
        ),
        (
            "bare CR in value",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
        ),
        (
            "NUL in value",
            b"GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n",
        ),
        ("missing host", b"GET / HTTP/1.1\r\n\r\n"),
        ("two hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
    ] {
        check(name, input, Expect::Err(400));
    }
}

#[test]
fn ambiguous_framing_is_400() {
    for (name, input) in [
        ("te and cl", &b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n"[..]),
        ("cl differ", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"),
        ("cl list differ", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 4\r\n\r\nabcd"),
        ("cl sign", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc"),
        ("cl empty", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\n\r\n"),
        ("cl hex", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x3\r\n\r\nabc"),
        ("chunked twice", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"),
        ("chunked not last", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n0\r\n\r\n"),
        ("te empty", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \r\n\r\n"),
    ] {
        check(name, input, Expect::Err(400));
    }
}

#[test]
fn bad_chunks_are_400() {
    let head = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
    for (name, chunks) in [
        ("non-hex size", "zz\r\nhello\r\n0\r\n\r\n"),
        ("empty size", "\r\nhello\r\n0\r\n\r\n"),
        ("negative size", "-5\r\nhello\r\n0\r\n\r\n"),
        ("size overflow", "fffffffffffffffff\r\nx\r\n0\r\n\r\n"),
        ("ext without name", "5;=x\r\nhello\r\n0\r\n\r\n"),
        ("ext unterminated quote", "5;a=\"x\r\nhello\r\n0\r\n\r\n"),
        ("ext bad char", "5;a@b\r\nhello\r\n0\r\n\r\n"),
        ("bare LF after size", "5\nhello\r\n0\r\n\r\n"),
        ("bare CR in size line", "5\r;a\r\nhello\r\n0\r\n\r\n"),
        ("data longer than size", "3\r\nhello\r\n0\r\n\r\n"),
        ("no CRLF after data", "5\r\nhelloXY0\r\n\r\n"),
        ("bad trailer", "5\r\nhello\r\n0\r\nbad trailer\r\n\r\n"),
    ] {
        check(name, format!("{head}{chunks}").as_bytes(), Expect::Err(400));
    }
}

#[test]
fn limits_give_413_414_431() {
    let long_target = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(300));
    check("414", long_target.as_bytes(), Expect::Err(414));
    let long_header = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
        "b".repeat(1100)
    );
    check("431", long_header.as_bytes(), Expect::Err(431));
    let many: String = (0..120).map(|i| format!("X{i}: v\r\n")).collect();
    check(
        "431 count",
        format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n").as_bytes(),
        Expect::Err(431),
    );
    check(
        "413 cl",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n",
        Expect::Err(413),
    );
    check(
        "413 cl overflow",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        Expect::Err(413),
    );
    let big_chunks = format!(
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n{0}\r\n800\r\n{0}\r\n1\r\nx\r\n0\r\n\r\n",
        "c".repeat(0x800)
    );
    check("413 chunked", big_chunks.as_bytes(), Expect::Err(413));
}

#[test]
fn unsupported_coding_and_version() {
    check(
        "gzip",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
        Expect::Err(501),
    );
    check(
        "gzip, chunked",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        Expect::Err(501),
    );
    check(
        "2.0",
        b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
        Expect::Err(505),
    );
    check(
        "1.2",
        b"GET / HTTP/1.2\r\nHost: a\r\n\r\n",
        Expect::Err(505),
    );
    check(
        "0.9 style",
        b"GET / HTTP/1.10\r\nHost: a\r\n\r\n",
        Expect::Err(400),
    );
}

#[test]
fn head_gets_length_but_no_body() {
    let o = run(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n", limits(), 0, false);
    let text = String::from_utf8_lossy(&o.output);
    assert!(text.ends_with("Content-Length: 6\r\n\r\n"), "{text}");
}

#[test]
fn expect_continue_is_sent_once_before_the_body() {
    let head =
        b"POST /echo HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n";
    let o = run(head, limits(), 0, false);
    assert_eq!(o.output, b"HTTP/1.1 100 Continue\r\n\r\n");
    let o = run(&[&head[..], b"hello"].concat(), limits(), 1, false);
    let text = String::from_utf8_lossy(&o.output);
    assert!(
        text.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"),
        "{text}"
    );
    assert_eq!(text.matches("100 Continue").count(), 1);
    // Over the body limit: no 100, just 413.
    let o = run(
        b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 99999\r\n\r\n",
        limits(),
        0,
        false,
    );
    assert_eq!(o.statuses(), vec![413]);
    assert!(!String::from_utf8_lossy(&o.output).contains("100 Continue"));
}

#[test]
fn eof_mid_request_finishes_quietly() {
    let o = run(b"GET / HTTP/1.1\r\nHo", limits(), 0, true);
    assert!(o.output.is_empty() && o.finished);
}

#[test]
fn request_path_and_query() {
    use proto::Limits;
    let mut conn = common::conn_with(Limits::default());
    let input = b"GET http://example.com:8080/a/b?x=1&y=2#frag HTTP/1.1\r\nHost: example.com\r\n\r\nGET /c?us=5 HTTP/1.1\r\nHost: a\r\n\r\nOPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n";
    let buf = conn.read_buf();
    buf[..input.len()].copy_from_slice(input);
    conn.filled(input.len(), common::t0());
    let r = conn.next_request().unwrap();
    assert_eq!(
        (r.path(), r.query(), r.query_param("y")),
        ("/a/b", Some("x=1&y=2"), Some("2"))
    );
    let r = conn.next_request().unwrap();
    assert_eq!(
        (r.path(), r.query_param("us"), r.query_param("u")),
        ("/c", Some("5"), None)
    );
    let r = conn.next_request().unwrap();
    assert_eq!((r.path(), r.query()), ("*", None));
}

/// Shutdown stops a connection between requests, never inside one: a body still arriving is
/// read and answered, with `Connection: close`, and then the connection is finished.
#[test]
fn stop_reading_finishes_the_request_in_progress() {
    use proto::{Limits, Response};
    let feed = |conn: &mut Conn, bytes: &[u8]| {
        conn.read_buf()[..bytes.len()].copy_from_slice(bytes);
        conn.filled(bytes.len(), common::t0());
    };
    let common = common::common();

    // Mid-body: finished, then closed.
    let mut conn = common::conn_with(Limits::default());
    feed(
        &mut conn,
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello",
    );
    assert!(conn.next_request().is_none());
    conn.stop_reading(common::t0());
    assert!(conn.wants_read(), "the rest of the body must still be read");
    feed(&mut conn, b"world");
    let req = conn
        .next_request()
        .expect("the request in progress completes");
    assert_eq!(req.body, b"helloworld");
    let id = req.id;
    conn.respond(id, Response::text(200, "ok"));
    let out = String::from_utf8_lossy(conn.output(&common, common::t0())).into_owned();
    assert!(out.contains("Connection: close\r\n"), "{out}");
    let n = out.len();
    conn.written(n, common::t0());
    assert!(conn.is_finished() && !conn.wants_read());

    // Between requests, with a reply still owed: no more reading; the owed reply closes.
    let mut conn = common::conn_with(Limits::default());
    feed(&mut conn, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    let id = conn.next_request().unwrap().id;
    conn.stop_reading(common::t0());
    assert!(!conn.wants_read() && !conn.is_finished());
    conn.respond(id, Response::text(200, "ok"));
    let out = String::from_utf8_lossy(conn.output(&common, common::t0())).into_owned();
    assert!(out.contains("Connection: close\r\n"), "{out}");
    let n = out.len();
    conn.written(n, common::t0());
    assert!(conn.is_finished());
}

/// Backpressure counts replies filed but not yet encoded: while the peer takes nothing, a
/// connection stops handing out requests once about 256 KiB of replies are held, not after 64.
#[test]
fn replies_waiting_for_the_socket_stop_the_reading() {
    use proto::{Limits, OUTPUT_HIGH_WATER, Response};
    let body = vec![b'x'; 100 * 1024];
    let request = [
        format!(
            "POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
        &body,
    ]
    .concat();
    let mut conn = common::conn_with(Limits::default());
    let mut served = 0;
    for _ in 0..64 {
        if !conn.wants_read() {
            break;
        }
        let buf = conn.read_buf();
        let n = request.len().min(buf.len());
        buf[..n].copy_from_slice(&request[..n]);
        conn.filled(n, common::t0());
        let mut rest = &request[n..];
        while !rest.is_empty() {
            let buf = conn.read_buf();
            let n = rest.len().min(buf.len());
            buf[..n].copy_from_slice(&rest[..n]);
            conn.filled(n, common::t0());
            rest = &rest[n..];
        }
        // The socket is never writable: nothing is encoded or written.
        while let Some(req) = conn.next_request() {
            let (id, echo) = (req.id, req.body.to_vec());
            conn.respond(id, Response::owned(200, "application/octet-stream", echo));
            served += 1;
        }
    }
    assert!(!conn.wants_read());
    assert!(
        served <= OUTPUT_HIGH_WATER / body.len() + 1,
        "{served} replies held"
    );
    assert!(conn.backlog() >= OUTPUT_HIGH_WATER);
    // Once the peer reads, the backlog drains and reading resumes.
    let n = conn.output(&common::common(), common::t0()).len();
    conn.written(n, common::t0());
    assert_eq!(conn.backlog(), 0);
    assert!(conn.wants_read());
}

// Regressions for what the fuzz target (fuzz/) found.

#[test]
fn bare_cr_after_an_empty_line_is_400_however_it_is_split() {
    // Byte by byte, the buffer is reused from offset 0 and a stale '\n' from an earlier read
    // sat just past the end: it must not complete the CR.
    check(
        "crlf then bare cr",
        b"\r\n\rGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        Expect::Err(400),
    );
}

#[test]
fn a_long_method_is_not_a_long_target() {
    // limits(): max_target 256. A 400-byte method is no reason for 414, split or whole.
    let method = "M".repeat(400);
    let input = format!("{method} /x HTTP/1.1\r\nHost: a\r\n\r\n");
    let leaked: &'static str = Box::leak(method.into_boxed_str());
    let expected: &'static [(&str, &str, &[u8])] = Box::leak(Box::new([(leaked, "/x", &b""[..])]));
    check("long method", input.as_bytes(), Expect::Ok(expected));
}

#[test]
fn a_bad_version_cannot_grow_the_head_without_bound() {
    // Each read ends in a space and no newline comes, so the "version" never looks finished:
    // the head limit (1024 in limits()) must still end it.
    let mut conn = common::conn_with(limits());
    let mut fed = 0;
    let mut piece: &[u8] = b"GET / HTTP/X ";
    while conn.wants_read() && fed < 64 * 1024 {
        conn.read_buf()[..piece.len()].copy_from_slice(piece);
        conn.filled(piece.len(), common::t0());
        fed += piece.len();
        assert!(conn.next_request().is_none());
        piece = b"y ";
    }
    assert!(fed < 2048, "read {fed} bytes of a head limited to 1024");
    let out = String::from_utf8_lossy(conn.output(&common::common(), common::t0())).into_owned();
    assert!(out.starts_with("HTTP/1.1 4"), "{out}");
}

#[test]
fn streams_obey_close_and_bodiless_statuses() {
    use proto::{Limits, Response};
    let common = common::common();
    let feed = |conn: &mut Conn, bytes: &[u8]| {
        conn.read_buf()[..bytes.len()].copy_from_slice(bytes);
        conn.filled(bytes.len(), common::t0());
    };

    // A streamed reply that says `Connection: close` ends the connection when it ends.
    let mut conn = common::conn_with(Limits::default());
    feed(&mut conn, b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n");
    let id = conn.next_request().unwrap().id;
    let mut head = Response::stream(200, "text/plain");
    head.close = true;
    conn.respond(id, head);
    let n = conn.output(&common, common::t0()).len();
    conn.written(n, common::t0());
    feed(&mut conn, b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n");
    assert!(
        conn.next_request().is_none(),
        "nothing is read after a closing reply"
    );
    conn.push_chunk(id, b"data");
    conn.end_stream(id);
    let out = String::from_utf8_lossy(conn.output(&common, common::t0())).into_owned();
    assert_eq!(out, "4\r\ndata\r\n0\r\n\r\n");
    let n = out.len();
    conn.written(n, common::t0());
    assert!(conn.is_finished());

    // A 204 has no body: no chunked coding, and its chunks are dropped.
    let mut conn = common::conn_with(Limits::default());
    feed(
        &mut conn,
        b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n",
    );
    let first = conn.next_request().unwrap().id;
    let second = conn.next_request().unwrap().id;
    conn.respond(first, Response::stream(204, ""));
    conn.push_chunk(first, b"ignored");
    conn.end_stream(first);
    conn.respond(second, Response::text(200, "ok"));
    let out = String::from_utf8_lossy(conn.output(&common, common::t0())).into_owned();
    assert!(
        !out.contains("Transfer-Encoding") && !out.contains("ignored"),
        "{out}"
    );
    assert!(
        out.starts_with("HTTP/1.1 204 No Content\r\n") && out.ends_with("\r\n\r\nok"),
        "{out}"
    );
}

#[test]
fn request_keep_alive_reflects_a_shutdown() {
    use proto::Limits;
    let mut conn = common::conn_with(Limits::default());
    let input = b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nh";
    conn.read_buf()[..input.len()].copy_from_slice(input);
    conn.filled(input.len(), common::t0());
    assert!(conn.next_request().is_none());
    conn.stop_reading(common::t0());
    conn.read_buf()[0] = b'i';
    conn.filled(1, common::t0());
    let req = conn.next_request().unwrap();
    assert!(!req.keep_alive);
}
