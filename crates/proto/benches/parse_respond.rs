//! Parse + respond, without sockets: how many requests one core can frame per second.
//!
//! Each iteration does what a server does for one read: copy the input into `read_buf()`,
//! `filled`, take every request with `next_request()`, `respond` with a static text reply, then
//! `output` and `written`. Dependency-free: `std::time::Instant` and `std::hint::black_box`.
//!
//! `cargo bench -p proto` runs every scenario; `cargo bench -p proto -- chunked` only those whose
//! name contains `chunked`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use std::sync::Arc;

use proto::{CommonHeaders, Config, Conn, Response, http_date};

/// What `wrk` sends by default.
const WRK_GET: &[u8] = b"GET / HTTP/1.1\r\nHost: localhost:8080\r\n\r\n";
/// What `curl http://localhost:8080/` sends.
const CURL_GET: &[u8] =
    b"GET / HTTP/1.1\r\nHost: localhost:8080\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n";
const PIPELINE: usize = 16;
const BODY_LEN: usize = 1024;
const CHUNK_LEN: usize = 256;

/// Rounds measured per scenario; the median is reported.
const ROUNDS: usize = 15;
/// Each round runs for about this long.
const ROUND_TIME: Duration = Duration::from_millis(40);
const WARMUP_TIME: Duration = Duration::from_millis(200);

struct Scenario {
    name: &'static str,
    /// The bytes of one read.
    input: Vec<u8>,
    /// Requests in one read.
    requests: usize,
}

fn scenarios() -> Vec<Scenario> {
    let body = vec![b'x'; BODY_LEN];
    let mut post = format!(
        "POST /echo HTTP/1.1\r\nHost: localhost:8080\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {BODY_LEN}\r\n\r\n"
    )
    .into_bytes();
    post.extend_from_slice(&body);
    let mut chunked = b"POST /echo HTTP/1.1\r\nHost: localhost:8080\r\nUser-Agent: curl/8.5.0\r\n\
        Accept: */*\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        .to_vec();
    for piece in body.chunks(CHUNK_LEN) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    vec![
        Scenario {
            name: "GET / (wrk headers)",
            input: WRK_GET.to_vec(),
            requests: 1,
        },
        Scenario {
            name: "GET / (curl headers)",
            input: CURL_GET.to_vec(),
            requests: 1,
        },
        Scenario {
            name: "GET / x16 pipelined",
            input: WRK_GET.repeat(PIPELINE),
            requests: PIPELINE,
        },
        Scenario {
            name: "POST 1 KiB Content-Length",
            input: post,
            requests: 1,
        },
        Scenario {
            name: "POST 1 KiB chunked (4 x 256)",
            input: chunked,
            requests: 1,
        },
    ]
}

/// One read's worth of work. Returns bytes of output, so that nothing is optimised away.
#[inline(never)]
fn serve(conn: &mut Conn, common: &CommonHeaders, input: &[u8], requests: usize) -> usize {
    let buf = conn.read_buf();
    buf[..input.len()].copy_from_slice(input);
    let now = Instant::now();
    conn.filled(input.len(), now);
    let mut seen = 0;
    while let Some(req) = conn.next_request() {
        black_box((req.method, req.target, req.body));
        let id = req.id;
        conn.respond(id, Response::text(200, "Hello, World!"));
        seen += 1;
    }
    debug_assert_eq!(seen, requests);
    let n = conn.output(common, now).len();
    conn.written(n, now);
    // What a driver does before it waits for the next read: the buffers go back to the pool.
    conn.release_buffers();
    n
}

/// Runs `iters` reads and returns the time taken.
fn run(conn: &mut Conn, common: &CommonHeaders, s: &Scenario, iters: u64) -> Duration {
    let input = black_box(&s.input[..]);
    let start = Instant::now();
    for _ in 0..iters {
        black_box(serve(conn, common, input, s.requests));
    }
    start.elapsed()
}

struct Measured {
    median_ns: f64,
    min_ns: f64,
    max_ns: f64,
}

fn measure(s: &Scenario) -> Measured {
    let common = CommonHeaders {
        server: "bench",
        date: http_date(1_700_000_000),
    };
    let mut conn = Conn::new(Arc::new(Config::default()), Instant::now());
    // Warm up, and find how many reads fill a round.
    let mut iters = 1u64;
    let warm_start = Instant::now();
    loop {
        let t = run(&mut conn, &common, s, iters);
        if warm_start.elapsed() >= WARMUP_TIME && t >= ROUND_TIME / 4 {
            let per_iter = t.as_secs_f64() / iters as f64;
            iters = ((ROUND_TIME.as_secs_f64() / per_iter) as u64).max(1);
            break;
        }
        if t < ROUND_TIME / 4 {
            iters *= 2;
        }
    }
    let mut ns_per_req: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let t = run(&mut conn, &common, s, iters);
            t.as_nanos() as f64 / (iters as f64 * s.requests as f64)
        })
        .collect();
    ns_per_req.sort_by(f64::total_cmp);
    assert!(!conn.is_finished(), "{}: the connection closed", s.name);
    Measured {
        median_ns: ns_per_req[ROUNDS / 2],
        min_ns: ns_per_req[0],
        max_ns: ns_per_req[ROUNDS - 1],
    }
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument filters scenarios by name.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    println!(
        "{:<30} {:>9} {:>11} {:>9} {:>9} {:>14}",
        "scenario", "bytes/req", "median ns", "min ns", "max ns", "req/s per core"
    );
    for s in scenarios() {
        if !filter.is_empty() && !filter.iter().any(|f| s.name.contains(f.as_str())) {
            continue;
        }
        let m = measure(&s);
        println!(
            "{:<30} {:>9} {:>11.1} {:>9.1} {:>9.1} {:>13.2}M",
            s.name,
            s.input.len() / s.requests,
            m.median_ns,
            m.min_ns,
            m.max_ns,
            1e3 / m.median_ns
        );
    }
    println!("(ns per request, median of {ROUNDS} rounds of ~{ROUND_TIME:?}; one thread)");
}
