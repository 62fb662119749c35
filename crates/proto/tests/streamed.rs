//! Streamed request bodies: the head is handed out first, then the body in pieces as it
//! arrives (Content-Length and chunked alike), zero-copy from the input buffer, never more than
//! a buffer's worth held, whole or one byte at a time, and followed by a pipelined request.

mod common;

use std::sync::Arc;

use common::{common, t0};
use proto::{BodyChunk, Config, Conn, Limits, Response};

/// Bodies of `POST /up` are streamed; everything else is buffered.
fn conn(limits: Limits) -> Conn {
    let config = Config {
        limits,
        stream_body: |method, path| method == "POST" && path == "/up",
        ..Config::default()
    };
    Conn::new(Arc::new(config), t0())
}

/// What a run saw: each request's target and body (streamed ones reassembled from their
/// pieces), the largest piece, the most buffered at once, and the statuses written.
#[derive(Debug, Default)]
struct Seen {
    requests: Vec<(String, Vec<u8>, bool)>,
    biggest_piece: usize,
    most_buffered: usize,
    output: String,
    broken: bool,
}

/// Feeds `input` in pieces of `step` bytes (0: whole), taking every body piece as it comes and
/// answering each request `200 <len>` once its body is done. `early` answers a streamed
/// request at once (before its body), as an application refusing it would.
fn run(input: &[u8], step: usize, limits: Limits, early: bool) -> Seen {
    let mut c = conn(limits);
    let mut seen = Seen::default();
    let step = if step == 0 { input.len() } else { step };
    let mut fed = 0;
    let mut streaming: Option<(proto::ReqId, usize)> = None;
    loop {
        let mut waiting = false;
        if let Some((id, i)) = streaming {
            loop {
                match c.body_chunk() {
                    BodyChunk::Data(d) => {
                        seen.biggest_piece = seen.biggest_piece.max(d.len());
                        let n = d.len();
                        seen.requests[i].1.extend_from_slice(d);
                        c.consume_body(n);
                    }
                    BodyChunk::Wait => {
                        waiting = true;
                        break;
                    }
                    BodyChunk::Done => {
                        let len = seen.requests[i].1.len().to_string();
                        c.respond(id, Response::owned(200, "text/plain", len.into_bytes()));
                        streaming = None;
                        break;
                    }
                    BodyChunk::Broken => {
                        seen.broken = true;
                        streaming = None;
                        break;
                    }
                }
            }
        }
        while let Some(req) = c.next_request() {
            let (id, streamed) = (req.id, req.streamed);
            seen.requests
                .push((req.target.to_string(), req.body.to_vec(), streamed));
            if streamed && !early {
                streaming = Some((id, seen.requests.len() - 1));
                break;
            }
            let len = req.body.len().to_string();
            c.respond(id, Response::owned(200, "text/plain", len.into_bytes()));
        }
        let out = c.output(&common(), t0());
        seen.output.push_str(&String::from_utf8_lossy(out));
        let n = out.len();
        c.written(n, t0());
        seen.most_buffered = seen.most_buffered.max(c.buffer_bytes());
        if fed == input.len() {
            if streaming.is_none() || waiting {
                break;
            }
            continue;
        }
        if !c.wants_read() {
            if streaming.is_none() {
                break;
            }
            continue;
        }
        let buf = c.read_buf();
        let n = step.min(input.len() - fed).min(buf.len());
        buf[..n].copy_from_slice(&input[fed..fed + n]);
        c.filled(n, t0());
        fed += n;
    }
    seen
}

fn statuses(output: &str) -> Vec<u16> {
    output
        .match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| output[i + 9..i + 12].parse().ok())
        .filter(|&s| s != 100)
        .collect()
}

const SECOND: &[u8] = b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n";

fn upload(body: &[u8]) -> Vec<u8> {
    let head = format!(
        "POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    [head.as_bytes(), body].concat()
}

fn chunked_upload(pieces: &[&[u8]]) -> Vec<u8> {
    let mut r = b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for p in pieces {
        r.extend_from_slice(format!("{:x};ext=1\r\n", p.len()).as_bytes());
        r.extend_from_slice(p);
        r.extend_from_slice(b"\r\n");
    }
    r.extend_from_slice(b"0\r\nX-Trailer: t\r\n\r\n");
    r
}

#[test]
fn a_content_length_body_streams_whole_or_byte_by_byte_then_the_next_request() {
    let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let input = [upload(&body), SECOND.to_vec()].concat();
    for step in [0, 1, 777] {
        let seen = run(&input, step, Limits::default(), false);
        assert_eq!(seen.requests.len(), 2, "step {step}");
        assert_eq!(
            seen.requests[0],
            ("/up".into(), body.clone(), true),
            "step {step}"
        );
        assert_eq!(seen.requests[1].0, "/second");
        assert_eq!(statuses(&seen.output), vec![200, 200], "step {step}");
        assert!(seen.output.contains("\r\n\r\n100000"), "step {step}");
    }
}

#[test]
fn a_chunked_body_streams_decoded_then_the_next_request() {
    let pieces: Vec<Vec<u8>> = (0..50)
        .map(|i| vec![b'a' + (i % 26) as u8; 1000 + i])
        .collect();
    let refs: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
    let input = [chunked_upload(&refs), SECOND.to_vec()].concat();
    for step in [0, 1, 333] {
        let seen = run(&input, step, Limits::default(), false);
        assert_eq!(seen.requests.len(), 2, "step {step}: {:?}", seen.output);
        assert_eq!(seen.requests[0].1, pieces.concat(), "step {step}");
        assert_eq!(statuses(&seen.output), vec![200, 200], "step {step}");
    }
}

#[test]
fn a_streamed_body_is_never_held_whole() {
    // 8 MiB through in 16 KiB reads, taken as it comes: the buffers stay small.
    let body = vec![b'x'; 8 << 20];
    let seen = run(&upload(&body), 16 * 1024, Limits::default(), false);
    assert_eq!(seen.requests[0].1.len(), body.len());
    assert!(
        seen.most_buffered <= 256 * 1024,
        "held {} bytes",
        seen.most_buffered
    );
    // A buffered body of the same size needs the whole of it (and is over max_body here).
    let seen = run(
        &[b"POST /other HTTP/1.1\r\nHost: a\r\nContent-Length: 9000000\r\n\r\n".as_slice()]
            .concat(),
        0,
        Limits::default(),
        false,
    );
    assert_eq!(statuses(&seen.output), vec![413]);
}

#[test]
fn a_consumer_that_takes_nothing_stops_the_reading() {
    let mut c = conn(Limits::default());
    let input = upload(&vec![b'y'; 1 << 20]);
    let mut fed = 0;
    while c.wants_read() && fed < input.len() {
        let buf = c.read_buf();
        let n = buf.len().min(input.len() - fed);
        buf[..n].copy_from_slice(&input[fed..fed + n]);
        c.filled(n, t0());
        fed += n;
        let _ = c.next_request();
    }
    assert!(fed < 128 * 1024, "read {fed} bytes of a body nobody took");
    assert!(matches!(c.body_chunk(), BodyChunk::Data(_)));
}

#[test]
fn streamed_bodies_obey_max_upload_not_max_body() {
    let limits = Limits {
        max_body: 1000,
        max_upload: 5000,
        ..Limits::default()
    };
    // Over max_body but under max_upload: fine when streamed.
    let seen = run(&upload(&[b'z'; 4000]), 0, limits, false);
    assert_eq!(statuses(&seen.output), vec![200]);
    // Content-Length over max_upload: 413 at the head.
    let seen = run(&upload(&[b'z'; 6000]), 0, limits, false);
    assert_eq!(statuses(&seen.output), vec![413]);
    // Chunked past max_upload: cut off with 413.
    let big = vec![b'z'; 3000];
    let seen = run(&chunked_upload(&[&big, &big]), 0, limits, false);
    assert!(seen.broken);
    assert_eq!(statuses(&seen.output), vec![413]);
}

#[test]
fn a_request_answered_before_its_body_drops_the_rest_and_serves_the_next() {
    let input = [upload(&vec![b'q'; 50_000]), SECOND.to_vec()].concat();
    for step in [0, 1, 4096] {
        let seen = run(&input, step, Limits::default(), true);
        assert_eq!(seen.requests.len(), 2, "step {step}");
        assert_eq!(seen.requests[1].0, "/second", "step {step}");
        assert_eq!(statuses(&seen.output), vec![200, 200], "step {step}");
    }
    // Chunked alike.
    let input = [chunked_upload(&[b"abc", b"defg"]), SECOND.to_vec()].concat();
    let seen = run(&input, 1, Limits::default(), true);
    assert_eq!(seen.requests.len(), 2);
}

#[test]
fn a_body_cut_short_or_badly_framed_is_broken() {
    // EOF mid-body: Broken once the buffered bytes are taken.
    let mut c = conn(Limits::default());
    let input = &upload(&[b'k'; 100])[..80];
    c.read_buf()[..input.len()].copy_from_slice(input);
    c.filled(input.len(), t0());
    let id = c.next_request().unwrap().id;
    c.read_eof();
    let BodyChunk::Data(d) = c.body_chunk() else {
        panic!("the buffered part first")
    };
    let n = d.len();
    c.consume_body(n);
    assert_eq!(c.body_chunk(), BodyChunk::Broken);
    assert!(c.owes(id));

    // A bad chunk size: Broken, and the connection answers 400 itself.
    let input =
        b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n";
    let seen = run(input, 0, Limits::default(), false);
    assert!(seen.broken);
    assert_eq!(statuses(&seen.output), vec![400]);
}

#[test]
fn expect_100_continue_on_a_streamed_body() {
    let input =
        b"POST /up HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc";
    let seen = run(input, 0, Limits::default(), false);
    assert!(
        seen.output
            .starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK"),
        "{}",
        seen.output
    );
}

/// Feeds `input` whole and drains the output.
fn feed(c: &mut Conn, input: &[u8]) {
    c.read_buf()[..input.len()].copy_from_slice(input);
    c.filled(input.len(), t0());
}

fn drain(c: &mut Conn) -> String {
    let out = c.output(&common(), t0());
    let text = String::from_utf8_lossy(out).into_owned();
    let n = out.len();
    c.written(n, t0());
    text
}

#[test]
fn a_sized_reply_streams_its_content_length_unframed_and_keeps_the_connection() {
    let mut c = conn(Limits::default());
    feed(
        &mut c,
        b"GET /file HTTP/1.1\r\nHost: a\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\n\r\n",
    );
    let id = c.next_request().unwrap().id;
    c.respond(
        id,
        Response::stream_sized(200, "application/octet-stream", 5),
    );
    c.push_chunk(id, b"abc");
    // More than promised is cut to the Content-Length.
    c.push_chunk(id, b"defg");
    c.end_stream(id);
    let id = c.next_request().unwrap().id;
    c.respond(id, Response::text(200, "next"));
    let out = drain(&mut c);
    assert!(out.contains("Content-Length: 5\r\n"), "{out}");
    assert!(!out.contains("chunked"), "{out}");
    assert!(out.contains("\r\n\r\nabcdeHTTP/1.1 200 OK"), "{out}");
    assert!(!c.is_finished());
}

#[test]
fn a_sized_reply_ended_short_closes_the_connection() {
    let mut c = conn(Limits::default());
    feed(&mut c, b"GET /file HTTP/1.1\r\nHost: a\r\n\r\n");
    let id = c.next_request().unwrap().id;
    c.respond(
        id,
        Response::stream_sized(200, "application/octet-stream", 10),
    );
    drain(&mut c);
    c.push_chunk(id, b"abc");
    c.end_stream(id);
    let out = drain(&mut c);
    assert_eq!(out, "abc");
    assert!(c.is_finished(), "the peer learns of the cut from the close");
}

#[test]
fn a_sized_reply_to_head_or_http10_has_no_body_or_framing_trouble() {
    let mut c = conn(Limits::default());
    feed(&mut c, b"HEAD /file HTTP/1.1\r\nHost: a\r\n\r\n");
    let id = c.next_request().unwrap().id;
    c.respond(
        id,
        Response::stream_sized(200, "application/octet-stream", 3),
    );
    c.push_chunk(id, b"abc");
    c.end_stream(id);
    let out = drain(&mut c);
    assert!(
        out.contains("Content-Length: 3\r\n") && out.ends_with("\r\n\r\n"),
        "{out}"
    );

    let mut c = conn(Limits::default());
    feed(
        &mut c,
        b"GET /file HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    );
    let id = c.next_request().unwrap().id;
    c.respond(
        id,
        Response::stream_sized(200, "application/octet-stream", 3),
    );
    c.push_chunk(id, b"abc");
    c.end_stream(id);
    let out = drain(&mut c);
    assert!(
        out.contains("Connection: keep-alive\r\n") && out.ends_with("\r\n\r\nabc"),
        "{out}"
    );
    assert!(
        !c.is_finished(),
        "Content-Length frames it: HTTP/1.0 keep-alive holds"
    );
}

#[test]
fn a_streamed_body_that_times_out_is_broken_and_answered_408() {
    let mut c = conn(Limits::default());
    let input = &upload(&[b'x'; 10])[..55];
    feed(&mut c, input);
    let id = c.next_request().unwrap().id;
    while let BodyChunk::Data(d) = c.body_chunk() {
        let n = d.len();
        c.consume_body(n);
    }
    let at = c.poll_timeout().expect("a body timeout");
    c.handle_timeout(at);
    assert_eq!(c.body_chunk(), BodyChunk::Broken);
    // The application's answer, come too late, does not replace the 408.
    c.respond(id, Response::text(204, ""));
    assert_eq!(statuses(&drain(&mut c)), vec![408]);
}
