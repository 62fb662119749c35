//! A small blocking HTTP/1.1 client that shows exactly what it received.
//!
//! Every read has a timeout (5 s unless changed), so a server that never answers fails the test
//! instead of hanging it. Bytes read past the end of one response stay buffered for the next one,
//! which is what reading pipelined responses needs.

use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// How long one read or write may wait unless a test says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest response head the client accepts (a guard against garbage, not a protocol limit).
const MAX_HEAD: usize = 64 * 1024;

/// One parsed HTTP response.
#[derive(Clone, PartialEq)]
pub struct Response {
    /// `HTTP/1.1` or `HTTP/1.0`.
    pub version: String,
    pub status: u16,
    pub reason: String,
    /// Header fields in the order received, names as sent.
    pub headers: Vec<(String, String)>,
    /// The body after removing the framing (de-chunked for chunked responses).
    pub body: Vec<u8>,
    /// Every byte of this response as it arrived, for failure messages.
    pub raw: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (case-insensitive), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Whether some `name` header lists `token` in its comma-separated value (case-insensitive).
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.header_all(name)
            .iter()
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// The body as text (lossy), for comparisons and messages.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether this is an interim (1xx) response.
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status)
    }

    /// Panics, showing this response, unless the status is `status`.
    #[track_caller]
    pub fn assert_status(&self, status: u16) -> &Self {
        assert!(
            self.status == status,
            "expected status {status}, got:\n{self:?}"
        );
        self
    }

    /// Panics, showing this response, unless the body is exactly `body`.
    #[track_caller]
    pub fn assert_body(&self, body: impl AsRef<[u8]>) -> &Self {
        let body = body.as_ref();
        assert!(
            self.body == body,
            "expected body {:?} ({} bytes), got:\n{self:?}",
            preview(body),
            body.len()
        );
        self
    }

    /// Panics, showing this response, unless header `name` has exactly the value `value`.
    #[track_caller]
    pub fn assert_header(&self, name: &str, value: &str) -> &Self {
        assert!(
            self.header(name) == Some(value),
            "expected header `{name}: {value}`, got:\n{self:?}"
        );
        self
    }

    /// Panics, showing this response, unless it carries `Connection: close`.
    #[track_caller]
    pub fn assert_closes(&self) -> &Self {
        assert!(
            self.has_token("Connection", "close"),
            "expected `Connection: close`, got:\n{self:?}"
        );
        self
    }

    /// Panics, showing this response, if it carries `Connection: close`.
    #[track_caller]
    pub fn assert_keeps_alive(&self) -> &Self {
        assert!(
            !self.has_token("Connection", "close"),
            "expected the connection to stay open, got:\n{self:?}"
        );
        self
    }
}

/// Shows the status line, the headers and a preview of the body, escaped.
impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  {} {} {}", self.version, self.status, self.reason)?;
        for (name, value) in &self.headers {
            writeln!(f, "  {name}: {value}")?;
        }
        write!(
            f,
            "  body ({} bytes): {}",
            self.body.len(),
            preview(&self.body)
        )
    }
}

/// Why no complete response could be read.
#[derive(Debug)]
pub enum ReadError {
    /// The peer closed (EOF or reset) before sending any byte of a response.
    Closed,
    /// Nothing complete arrived within the timeout; `received` is what did arrive.
    Timeout { received: Vec<u8> },
    /// The peer closed in the middle of a response.
    Truncated { received: Vec<u8> },
    /// The bytes are not an HTTP/1.x response.
    Malformed { reason: String, received: Vec<u8> },
    /// Any other socket error.
    Io { error: io::Error, received: Vec<u8> },
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Closed => write!(f, "connection closed before any byte of a response"),
            ReadError::Timeout { received } => {
                write!(
                    f,
                    "timed out; received {} bytes: {}",
                    received.len(),
                    preview(received)
                )
            }
            ReadError::Truncated { received } => write!(
                f,
                "connection closed mid-response; received {} bytes: {}",
                received.len(),
                preview(received)
            ),
            ReadError::Malformed { reason, received } => write!(
                f,
                "malformed response ({reason}); received {} bytes: {}",
                received.len(),
                preview(received)
            ),
            ReadError::Io { error, received } => write!(
                f,
                "socket error {error}; received {} bytes: {}",
                received.len(),
                preview(received)
            ),
        }
    }
}

impl std::error::Error for ReadError {}

/// How the body of the next response is delimited, given the request it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The response may carry a body (framed by its headers).
    Body,
    /// The response answers a HEAD request: headers only, whatever Content-Length says.
    NoBody,
}

/// One client connection.
pub struct Client {
    stream: TcpStream,
    /// Bytes received but not yet consumed as part of a response.
    buf: Vec<u8>,
    timeout: Duration,
}

/// Failures from reading raw bytes, before they become a [`ReadError`].
enum Fill {
    Eof,
    Timeout,
    Error(io::Error),
}

impl Client {
    /// Connects to `addr` with TCP_NODELAY on, panicking after [`DEFAULT_TIMEOUT`].
    #[track_caller]
    pub fn connect(addr: SocketAddr) -> Client {
        match Client::try_connect(addr, DEFAULT_TIMEOUT) {
            Ok(client) => client,
            Err(e) => panic!("connect to {addr} failed: {e}"),
        }
    }

    /// Connects to `addr` with TCP_NODELAY on; the connect itself may take up to `timeout`.
    pub fn try_connect(addr: SocketAddr, timeout: Duration) -> io::Result<Client> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(DEFAULT_TIMEOUT))?;
        stream.set_read_timeout(Some(DEFAULT_TIMEOUT))?;
        Ok(Client {
            stream,
            buf: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Changes how long each read waits for the server.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Shrinks the socket's receive buffer (SO_RCVBUF), so that a large response stays partly
    /// unsent in the server until the client reads it.
    pub fn set_recv_buffer(&self, bytes: usize) -> io::Result<()> {
        let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: the fd is this client's open socket, and the option value points to a live
        // c_int whose size is passed along with it.
        let rc = unsafe {
            libc::setsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&raw const value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// The socket, e.g. to clone it for a writer thread.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Writes all of `bytes`, panicking on error.
    #[track_caller]
    pub fn send(&mut self, bytes: impl AsRef<[u8]>) {
        let bytes = bytes.as_ref();
        if let Err(e) = self.try_send(bytes) {
            panic!(
                "sending {} bytes failed: {e}; request began {}",
                bytes.len(),
                preview(bytes)
            );
        }
    }

    /// Writes all of `bytes`.
    pub fn try_send(&mut self, bytes: impl AsRef<[u8]>) -> io::Result<()> {
        self.stream.write_all(bytes.as_ref())
    }

    /// Sends `request` and reads the response to it (a body is expected unless it is a HEAD).
    #[track_caller]
    pub fn request(&mut self, request: impl AsRef<[u8]>) -> Response {
        let request = request.as_ref();
        self.send(request);
        let expect = if request.starts_with(b"HEAD ") {
            Expect::NoBody
        } else {
            Expect::Body
        };
        self.read_response_to(expect)
    }

    /// Reads the next response, which may carry a body; panics with what arrived on failure.
    #[track_caller]
    pub fn read_response(&mut self) -> Response {
        self.read_response_to(Expect::Body)
    }

    /// Reads the next response, framed as `expect` says; panics with what arrived on failure.
    #[track_caller]
    pub fn read_response_to(&mut self, expect: Expect) -> Response {
        match self.try_read_response(expect) {
            Ok(response) => response,
            Err(e) => panic!("reading a response: {e}"),
        }
    }

    /// Reads the next response, framed as `expect` says.
    ///
    /// The body is delimited by `Content-Length`, by chunked encoding, or by the close of the
    /// connection; 1xx, 204 and 304 responses and responses to HEAD have none.
    pub fn try_read_response(&mut self, expect: Expect) -> Result<Response, ReadError> {
        let deadline = Instant::now() + self.timeout;
        let mut reader = Reader {
            client: self,
            pos: 0,
            deadline,
        };
        let result = reader.response(expect);
        let consumed = reader.pos;
        match result {
            Ok(mut response) => {
                response.raw = self.buf.drain(..consumed).collect();
                Ok(response)
            }
            Err(e) => Err(e.into_read_error(std::mem::take(&mut self.buf))),
        }
    }

    /// Asserts that the peer closes the connection (EOF or reset) within `within`, without
    /// sending any further byte.
    #[track_caller]
    pub fn expect_closed(&mut self, within: Duration) {
        if let Err(e) = self.try_expect_closed(within) {
            panic!("expected the server to close the connection: {e}");
        }
    }

    /// Like [`Client::expect_closed`], but returns what went wrong instead of panicking.
    pub fn try_expect_closed(&mut self, within: Duration) -> Result<(), ReadError> {
        let deadline = Instant::now() + within;
        while self.buf.is_empty() {
            match self.fill(deadline) {
                Ok(_) => {}
                Err(Fill::Eof) => return Ok(()),
                Err(Fill::Timeout) => {
                    return Err(ReadError::Timeout {
                        received: Vec::new(),
                    });
                }
                Err(Fill::Error(error)) => {
                    return Err(ReadError::Io {
                        error,
                        received: Vec::new(),
                    });
                }
            }
        }
        // Bytes arrived: gather a little more so the message shows what they were.
        let _ = self.fill(Instant::now() + Duration::from_millis(100));
        let received = std::mem::take(&mut self.buf);
        Err(ReadError::Malformed {
            reason: "unexpected bytes instead of a close".into(),
            received,
        })
    }

    /// Reads once (waiting at most until `deadline`) and appends to the buffer.
    fn fill(&mut self, deadline: Instant) -> Result<usize, Fill> {
        let now = Instant::now();
        if now >= deadline {
            return Err(Fill::Timeout);
        }
        let wait = (deadline - now)
            .min(self.timeout)
            .max(Duration::from_millis(1));
        self.stream
            .set_read_timeout(Some(wait))
            .map_err(Fill::Error)?;
        let mut chunk = [0u8; 64 * 1024];
        loop {
            return match self.stream.read(&mut chunk) {
                Ok(0) => Err(Fill::Eof),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    Ok(n)
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    Err(Fill::Timeout)
                }
                Err(e) if is_reset(&e) => Err(Fill::Eof),
                Err(e) => Err(Fill::Error(e)),
            };
        }
    }
}

/// Whether an error means the peer reset or closed the connection.
pub fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
    )
}

/// Why parsing stopped, before the buffered bytes are attached.
enum Stop {
    Eof,
    Timeout,
    Malformed(String),
    Io(io::Error),
}

impl Stop {
    fn into_read_error(self, received: Vec<u8>) -> ReadError {
        match self {
            Stop::Eof if received.is_empty() => ReadError::Closed,
            Stop::Eof => ReadError::Truncated { received },
            Stop::Timeout => ReadError::Timeout { received },
            Stop::Malformed(reason) => ReadError::Malformed { reason, received },
            Stop::Io(error) => ReadError::Io { error, received },
        }
    }
}

/// Parses one response out of the client's buffer, reading more as needed.
struct Reader<'a> {
    client: &'a mut Client,
    /// How many buffered bytes this response has consumed so far.
    pos: usize,
    deadline: Instant,
}

impl Reader<'_> {
    fn more(&mut self) -> Result<(), Stop> {
        match self.client.fill(self.deadline) {
            Ok(_) => Ok(()),
            Err(Fill::Eof) => Err(Stop::Eof),
            Err(Fill::Timeout) => Err(Stop::Timeout),
            Err(Fill::Error(e)) => Err(Stop::Io(e)),
        }
    }

    /// Consumes one CRLF-terminated line (without the CRLF).
    fn line(&mut self, limit: usize) -> Result<String, Stop> {
        let mut scanned = self.pos;
        loop {
            let buf = &self.client.buf;
            if let Some(i) = buf[scanned..].windows(2).position(|w| w == b"\r\n") {
                let end = scanned + i;
                let line = &buf[self.pos..end];
                let line = std::str::from_utf8(line)
                    .map_err(|_| Stop::Malformed("a line is not UTF-8".into()))?
                    .to_string();
                self.pos = end + 2;
                return Ok(line);
            }
            if buf.len() - self.pos > limit {
                return Err(Stop::Malformed(format!("a line longer than {limit} bytes")));
            }
            scanned = buf.len().saturating_sub(1).max(self.pos);
            self.more()?;
        }
    }

    /// Consumes exactly `n` bytes.
    fn bytes(&mut self, n: usize) -> Result<Vec<u8>, Stop> {
        while self.client.buf.len() - self.pos < n {
            self.more()?;
        }
        let out = self.client.buf[self.pos..self.pos + n].to_vec();
        self.pos += n;
        Ok(out)
    }

    fn response(&mut self, expect: Expect) -> Result<Response, Stop> {
        let status_line = self.line(MAX_HEAD)?;
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default().to_string();
        if version != "HTTP/1.1" && version != "HTTP/1.0" {
            return Err(Stop::Malformed(format!("bad status line {status_line:?}")));
        }
        let status = parts
            .next()
            .filter(|s| s.len() == 3)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| Stop::Malformed(format!("bad status code in {status_line:?}")))?;
        let reason = parts.next().unwrap_or_default().to_string();

        let mut headers = Vec::new();
        loop {
            let line = self.line(MAX_HEAD)?;
            if line.is_empty() {
                break;
            }
            let (name, value) = line
                .split_once(':')
                .filter(|(n, _)| !n.is_empty() && !n.contains([' ', '\t']))
                .ok_or_else(|| Stop::Malformed(format!("bad header line {line:?}")))?;
            headers.push((name.to_string(), value.trim().to_string()));
            if self.pos > MAX_HEAD {
                return Err(Stop::Malformed("response head too long".into()));
            }
        }
        let mut response = Response {
            version,
            status,
            reason,
            headers,
            body: Vec::new(),
            raw: Vec::new(),
        };

        let bodiless = expect == Expect::NoBody
            || response.is_interim()
            || response.status == 204
            || response.status == 304;
        if bodiless {
            return Ok(response);
        }
        if response.has_token("Transfer-Encoding", "chunked") {
            response.body = self.chunked_body()?;
        } else if let Some(length) = response.header("Content-Length") {
            let lengths = response.header_all("Content-Length");
            if lengths.iter().any(|l| *l != length) {
                return Err(Stop::Malformed(format!(
                    "conflicting Content-Length {lengths:?}"
                )));
            }
            let n: usize = length
                .parse()
                .map_err(|_| Stop::Malformed(format!("bad Content-Length {length:?}")))?;
            response.body = self.bytes(n)?;
        } else {
            response.body = self.until_close()?;
        }
        Ok(response)
    }

    fn chunked_body(&mut self) -> Result<Vec<u8>, Stop> {
        let mut body = Vec::new();
        loop {
            let line = self.line(1024)?;
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16)
                .map_err(|_| Stop::Malformed(format!("bad chunk size line {line:?}")))?;
            if size == 0 {
                // Trailer fields, then the empty line.
                while !self.line(MAX_HEAD)?.is_empty() {}
                return Ok(body);
            }
            body.extend(self.bytes(size)?);
            if self.bytes(2)? != b"\r\n" {
                return Err(Stop::Malformed("chunk data not followed by CRLF".into()));
            }
        }
    }

    fn until_close(&mut self) -> Result<Vec<u8>, Stop> {
        loop {
            match self.more() {
                Ok(()) => {}
                Err(Stop::Eof) => break,
                Err(e) => return Err(e),
            }
        }
        let body = self.client.buf[self.pos..].to_vec();
        self.pos = self.client.buf.len();
        Ok(body)
    }
}

/// Up to 300 bytes of `bytes`, escaped, with the total length when cut.
pub fn preview(bytes: &[u8]) -> String {
    const LIMIT: usize = 300;
    let shown = &bytes[..bytes.len().min(LIMIT)];
    let mut out = format!("\"{}\"", shown.escape_ascii());
    if bytes.len() > LIMIT {
        out.push_str(&format!(" ... ({} more bytes)", bytes.len() - LIMIT));
    }
    out
}
