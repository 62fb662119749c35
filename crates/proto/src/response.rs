//! What the application hands back, and how it becomes bytes.

use std::borrow::Cow;

use crate::date::HTTP_DATE_LEN;

/// A reply to one request. The body is either complete now, or a stream whose chunks arrive
/// later through [`crate::Conn::push_chunk`] and [`crate::Conn::end_stream`].
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Empty means no `Content-Type` header.
    pub content_type: Cow<'static, str>,
    /// Extra header lines, e.g. `("Allow", "GET, HEAD")`. Empty (and unallocated) for most replies.
    pub headers: Vec<(&'static str, Cow<'static, str>)>,
    pub body: Body,
    /// Close the connection after this reply.
    pub close: bool,
}

#[derive(Debug)]
pub enum Body {
    Static(&'static [u8]),
    Owned(Vec<u8>),
    /// Chunked (HTTP/1.1) or close-delimited (HTTP/1.0); the chunks follow the head later.
    Stream,
    /// Exactly this many bytes, sent as they come after the head (`Content-Length` framing: a
    /// file). Ended short, the connection closes, so the peer sees the cut.
    Sized(u64),
}

impl Body {
    pub fn len(&self) -> usize {
        match self {
            Body::Static(b) => b.len(),
            Body::Owned(b) => b.len(),
            Body::Stream | Body::Sized(_) => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Body::Static(b) => b,
            Body::Owned(b) => b,
            Body::Stream | Body::Sized(_) => &[],
        }
    }
}

impl Response {
    /// A `text/plain` reply with a body known at compile time: the allocation-free fast path.
    pub fn text(status: u16, body: &'static str) -> Response {
        Response {
            status,
            content_type: Cow::Borrowed("text/plain"),
            headers: Vec::new(),
            body: Body::Static(body.as_bytes()),
            close: false,
        }
    }

    pub fn owned(
        status: u16,
        content_type: impl Into<Cow<'static, str>>,
        body: Vec<u8>,
    ) -> Response {
        Response {
            status,
            content_type: content_type.into(),
            headers: Vec::new(),
            body: Body::Owned(body),
            close: false,
        }
    }

    /// The head of a streamed reply; send the chunks with `Conn::push_chunk`.
    pub fn stream(status: u16, content_type: &'static str) -> Response {
        Response {
            status,
            content_type: Cow::Borrowed(content_type),
            headers: Vec::new(),
            body: Body::Stream,
            close: false,
        }
    }

    /// The head of a streamed reply of `len` bytes (`Content-Length`); send them with
    /// `Conn::push_chunk`.
    pub fn stream_sized(status: u16, content_type: &'static str, len: u64) -> Response {
        Response {
            body: Body::Sized(len),
            ..Response::stream(status, content_type)
        }
    }

    /// A protocol error: a short text body naming the status, and the connection closes.
    pub fn error(status: u16) -> Response {
        let mut r = Response::text(status, error_body(status));
        r.close = true;
        r
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<Cow<'static, str>>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn is_stream(&self) -> bool {
        matches!(self.body, Body::Stream | Body::Sized(_))
    }
}

/// Headers every reply carries, owned by the caller so that it can refresh the date once a second.
#[derive(Clone, Debug)]
pub struct CommonHeaders {
    pub server: &'static str,
    pub date: [u8; HTTP_DATE_LEN],
}

/// How the request that a reply answers shapes that reply's framing.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ReplyMeta {
    pub head_only: bool,
    pub keep_alive: bool,
    pub http10: bool,
    /// A stream of known length: its pieces go out unframed.
    pub sized: bool,
}

/// Appends the status line and headers, and the body unless it is streamed or the request was
/// HEAD. Returns whether the connection stays open after this reply.
pub(crate) fn encode(
    out: &mut Vec<u8>,
    r: &Response,
    meta: ReplyMeta,
    common: &CommonHeaders,
) -> bool {
    // A streamed reply to HTTP/1.0 has no chunked coding: the close ends it.
    let chunked = matches!(r.body, Body::Stream);
    let keep_alive = meta.keep_alive && !r.close && !(chunked && meta.http10);
    let mut num = itoa::Buffer::new();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(num.format(r.status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason(r.status).as_bytes());
    out.extend_from_slice(b"\r\nServer: ");
    out.extend_from_slice(common.server.as_bytes());
    out.extend_from_slice(b"\r\nDate: ");
    out.extend_from_slice(&common.date);
    out.extend_from_slice(b"\r\n");
    if !r.content_type.is_empty() {
        out.extend_from_slice(b"Content-Type: ");
        out.extend_from_slice(r.content_type.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in &r.headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if chunked {
        if !meta.http10 && has_body_framing(r.status) {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
        }
    } else if has_body_framing(r.status) {
        let len = match r.body {
            Body::Sized(len) => len,
            _ => r.body.len() as u64,
        };
        out.extend_from_slice(b"Content-Length: ");
        out.extend_from_slice(num.format(len).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if meta.http10 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !meta.head_only && has_body_framing(r.status) {
        out.extend_from_slice(r.body.bytes());
    }
    keep_alive
}

/// Appends one piece of a streamed body in the framing its request allows.
pub(crate) fn encode_chunk(out: &mut Vec<u8>, data: &[u8], meta: ReplyMeta) {
    if meta.head_only || data.is_empty() {
        return;
    }
    if meta.http10 || meta.sized {
        out.extend_from_slice(data);
        return;
    }
    let mut hex = [0u8; 16];
    let mut n = data.len();
    let mut i = hex.len();
    while n > 0 {
        i -= 1;
        hex[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
    }
    out.extend_from_slice(&hex[i..]);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

pub(crate) fn encode_stream_end(out: &mut Vec<u8>, meta: ReplyMeta) {
    if !meta.head_only && !meta.http10 && !meta.sized {
        out.extend_from_slice(b"0\r\n\r\n");
    }
}

/// 1xx, 204 and 304 replies carry neither a body nor Content-Length.
pub(crate) fn has_body_framing(status: u16) -> bool {
    !(100..200).contains(&status) && status != 204 && status != 304
}

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        404 => "Not Found",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        417 => "Expectation Failed",
        422 => "Unprocessable Content",
        423 => "Locked",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        // tus 1.0 (checksum extension).
        460 => "Checksum Mismatch",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

fn error_body(status: u16) -> &'static str {
    match status {
        400 => "Bad Request\n",
        408 => "Request Timeout\n",
        413 => "Content Too Large\n",
        414 => "URI Too Long\n",
        431 => "Request Header Fields Too Large\n",
        501 => "Not Implemented\n",
        505 => "HTTP Version Not Supported\n",
        _ => "Error\n",
    }
}
