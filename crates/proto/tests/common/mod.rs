//! A test driver for `Conn`: feeds input in pieces, answers each request the way a tiny app
//! would, and records what came out.
#![allow(dead_code)]

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use proto::{CommonHeaders, Config, Conn, Limits, Response, http_date};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub body: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub keep_alive: bool,
}

#[derive(Debug)]
pub struct Outcome {
    pub seen: Vec<Seen>,
    pub output: Vec<u8>,
    pub finished: bool,
}

impl Outcome {
    /// The status codes of the final replies, in order (100 Continue left out).
    pub fn statuses(&self) -> Vec<u16> {
        let text = String::from_utf8_lossy(&self.output);
        text.match_indices("HTTP/1.1 ")
            .filter_map(|(i, _)| text[i + 9..i + 12].parse().ok())
            .filter(|&s: &u16| s != 100)
            .collect()
    }
}

/// The fixed instant the tests' connections live at: time only moves when a test moves it.
pub fn t0() -> Instant {
    static T0: OnceLock<Instant> = OnceLock::new();
    *T0.get_or_init(Instant::now)
}

/// A connection with `limits` and the default timeouts, opened at [`t0`].
pub fn conn_with(limits: Limits) -> Conn {
    Conn::new(
        Arc::new(Config {
            limits,
            ..Config::default()
        }),
        t0(),
    )
}

pub fn common() -> CommonHeaders {
    CommonHeaders {
        server: "test",
        date: http_date(0),
    }
}

/// Feeds `input` in pieces of `step` bytes (0 = all at once), answering every request with
/// `200 METHOD TARGET`, then reports EOF if `eof`.
pub fn run(input: &[u8], limits: Limits, step: usize, eof: bool) -> Outcome {
    let mut conn = conn_with(limits);
    let mut seen = Vec::new();
    let mut output = Vec::new();
    let step = if step == 0 { input.len().max(1) } else { step };
    let mut fed = 0;
    loop {
        while let Some(req) = conn.next_request() {
            seen.push(Seen {
                method: req.method.to_string(),
                target: req.target.to_string(),
                body: req.body.to_vec(),
                headers: req
                    .headers()
                    .map(|(n, v)| (n.to_string(), v.to_vec()))
                    .collect(),
                keep_alive: req.keep_alive,
            });
            let id = req.id;
            let text = format!(
                "{} {}",
                seen.last().unwrap().method,
                seen.last().unwrap().target
            );
            conn.respond(id, Response::owned(200, "text/plain", text.into_bytes()));
        }
        let out = conn.output(&common(), t0());
        let n = out.len();
        output.extend_from_slice(out);
        conn.written(n, t0());
        if fed == input.len() || !conn.wants_read() {
            break;
        }
        let buf = conn.read_buf();
        let n = step.min(input.len() - fed).min(buf.len());
        buf[..n].copy_from_slice(&input[fed..fed + n]);
        conn.filled(n, t0());
        fed += n;
    }
    if eof {
        conn.read_eof();
        let out = conn.output(&common(), t0());
        output.extend_from_slice(out);
    }
    Outcome {
        seen,
        output,
        finished: conn.is_finished(),
    }
}
