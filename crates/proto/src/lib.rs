//! Sans-IO HTTP/1.1 for every server in this workspace: bytes in, requests out; responses in,
//! bytes out. No sockets, no threads, no clock reads, so every server frames HTTP identically
//! and the tests here are deterministic.
//!
//! ```text
//!   socket ──read──▶ Conn::read_buf/filled ──▶ Conn::next_request ──▶ Request ──▶ app
//!                                                                                  │
//!   socket ◀─write── Conn::output/written ◀── encode in request order ◀── respond(id, Response)
//! ```
//!
//! * A request may arrive split at any byte, or several in one read (pipelining). Replies leave
//!   in request order, however late or out of order they are filed: a reply can be filed at once,
//!   later (after work on another thread), or as a stream of chunks ([`Response::stream`]).
//! * Bodies: Content-Length or chunked (extensions and trailers checked, then dropped).
//! * Every bad input gets a status and a close, never a panic: 400 malformed, 413/414/431 over a
//!   [`Limits`] bound, 501 an unknown transfer coding, 505 an unsupported version.
//! * Time is an argument: the caller says when bytes came and went, asks [`Conn::poll_timeout`]
//!   when to look again, and calls [`Conn::handle_timeout`] then. The [`Timeouts`] policy
//!   (slow heads, stalled bodies, idle keep-alive, a peer that stops reading, the shutdown
//!   grace, lingering close) lives here once, for every driver.
//! * An idle connection holds no buffer: [`Conn::release_buffers`] lends them back to the
//!   thread's pool until bytes flow again.

mod chunked;
mod conn;
mod date;
mod head;
mod pool;
mod response;
mod trace;

use std::time::Duration;

pub use conn::{BodyChunk, Conn, OUTPUT_HIGH_WATER, ReqId};
pub use date::{HTTP_DATE_LEN, http_date};
pub use head::{MAX_HEADERS, Version};
pub use response::{Body, CommonHeaders, Response, reason};
pub use trace::Trace;

use head::HeaderPos;

/// What every connection of a server shares: its limits and its timeouts, and which requests
/// have their bodies streamed.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub limits: Limits,
    pub timeouts: Timeouts,
    /// Whether a request (method, path) gets its body in pieces as it arrives (bounded by
    /// [`Limits::max_upload`], not by memory) instead of whole (bounded by `max_body`). See
    /// [`Conn::body_chunk`].
    pub stream_body: fn(&str, &str) -> bool,
    /// `--trace`: each request's timeline goes here once its reply is written (see [`Trace`]).
    pub trace: Option<fn(&Trace)>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            stream_body: |_, _| false,
            trace: None,
        }
    }
}

/// How long a connection may wait at each step (see [`Conn::poll_timeout`]).
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// A request head must arrive whole within this of its first byte (408).
    pub header: Duration,
    /// A request body must make progress at least this often (408).
    pub body: Duration,
    /// A keep-alive connection with nothing to do is closed after this.
    pub idle: Duration,
    /// A peer that takes none of our output for this long is closed.
    pub send: Duration,
    /// At shutdown, how long a connection that has sent nothing yet may take to send its
    /// first request.
    pub shutdown_grace: Duration,
    /// How long a closing connection drains what its peer still sends (lingering close).
    pub linger: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            header: Duration::from_secs(10),
            body: Duration::from_secs(60),
            idle: Duration::from_secs(60),
            send: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(1),
            linger: Duration::from_secs(2),
        }
    }
}

/// Bounds on what one request may make the server buffer.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Request line plus headers, in bytes (431).
    pub max_head: usize,
    /// Request target, in bytes (414).
    pub max_target: usize,
    /// Decoded body, in bytes (413), when it is buffered whole.
    pub max_body: usize,
    /// A streamed body, in bytes (413): it is never held whole.
    pub max_upload: u64,
    /// Requests read ahead of their replies; past this, reading waits.
    pub max_pipeline: usize,
    /// A streamed reply whose unsent bytes pass this (a subscriber that reads too slowly) is
    /// cut off: the connection is closed, and the client can resume where it stopped.
    pub max_stream_backlog: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head: 16 * 1024,
            max_target: 8 * 1024,
            max_body: 8 * 1024 * 1024,
            max_upload: 1 << 40,
            max_pipeline: 64,
            max_stream_backlog: 1024 * 1024,
        }
    }
}

/// The value of parameter `name` in a query string (`a=1&b=2`), undecoded; a bare `name` is
/// an empty value.
pub fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

/// The path of a request target, without the query.
pub fn target_path(target: &str) -> &str {
    let target = if target.starts_with('/') {
        target
    } else if let Some((_, rest)) = target.split_once("://") {
        rest.find('/').map_or("/", |i| &rest[i..])
    } else {
        target
    };
    target.split(['?', '#']).next().unwrap_or(target)
}

/// A complete request (or, for a streamed body, its head), borrowed from its connection's buffer.
#[derive(Debug)]
pub struct Request<'a> {
    /// Pass to [`Conn::respond`] to file the reply.
    pub id: ReqId,
    pub method: &'a str,
    /// The request target as sent: `/path?query`.
    pub target: &'a str,
    pub version: Version,
    /// Whether the connection stays open after this request's reply.
    pub keep_alive: bool,
    /// The body, when it is buffered whole; empty for a streamed body (`streamed`), which
    /// arrives in pieces through [`Conn::body_chunk`].
    pub body: &'a [u8],
    pub streamed: bool,
    head: &'a [u8],
    headers: &'a [HeaderPos],
}

impl<'a> Request<'a> {
    /// The path, without the query; for an absolute-form target (`http://host/p?q`), its path.
    pub fn path(&self) -> &'a str {
        target_path(self.target)
    }

    pub fn query(&self) -> Option<&'a str> {
        let (_, q) = self.target.split_once('?')?;
        Some(q.split('#').next().unwrap_or(q))
    }

    /// The value of query parameter `name`, undecoded.
    pub fn query_param(&self, name: &str) -> Option<&'a str> {
        query_param(self.query()?, name)
    }

    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    pub fn headers(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + '_ {
        let head = self.head;
        self.headers.iter().map(move |h| {
            let name = &head[h.name.0 as usize..(h.name.0 + h.name.1) as usize];
            let value = &head[h.value.0 as usize..(h.value.0 + h.value.1) as usize];
            // Header names are tokens (checked by httparse), so ASCII.
            (std::str::from_utf8(name).unwrap_or_default(), value)
        })
    }

    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }
}
