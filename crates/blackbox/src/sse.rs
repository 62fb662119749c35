//! A Server-Sent Events subscriber for the checks: `GET /events` on its own connection, the
//! chunked body decoded as it arrives, and each event (WHATWG HTML's event stream format)
//! handed out as soon as its blank line is in.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::client::preview;

/// One event, or a comment line (`: keep-alive`), or a `retry:` field.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
    pub retry: Option<u64>,
    pub comment: Option<String>,
}

/// How a subscription ended, or why no event came.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The stream ended cleanly: the last chunk (`0\r\n\r\n`) came.
    Finished,
    /// The connection closed (or was reset) without the last chunk: the server cut it off.
    Closed,
    /// Nothing within the time allowed.
    Timeout,
}

pub struct Subscriber {
    stream: TcpStream,
    /// The response head as received.
    pub head: String,
    pub status: u16,
    /// Raw body bytes received and not yet decoded from the chunked framing.
    raw: Vec<u8>,
    /// Decoded body bytes not yet parsed into events.
    text: Vec<u8>,
    finished: bool,
    closed: bool,
}

impl Subscriber {
    /// Connects and asks for `target` (e.g. `/events?type=message`) with `headers` (each line
    /// ending in CRLF), and reads the response head.
    #[track_caller]
    pub fn connect(addr: SocketAddr, target: &str, headers: &str) -> Subscriber {
        Subscriber::connect_with(addr, target, headers, None)
    }

    /// Like [`Subscriber::connect`], with the socket's receive buffer set before connecting.
    #[track_caller]
    pub fn connect_with(
        addr: SocketAddr,
        target: &str,
        headers: &str,
        rcvbuf: Option<usize>,
    ) -> Subscriber {
        let socket = socket_with_rcvbuf(addr, rcvbuf);
        let mut stream = socket;
        let request = format!("GET {target} HTTP/1.1\r\nHost: blackbox\r\n{headers}\r\n");
        stream
            .write_all(request.as_bytes())
            .expect("send GET /events");
        let mut s = Subscriber {
            stream,
            head: String::new(),
            status: 0,
            raw: Vec::new(),
            text: Vec::new(),
            finished: false,
            closed: false,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(end) = find(&s.raw, b"\r\n\r\n") {
                s.head = String::from_utf8_lossy(&s.raw[..end]).into_owned();
                s.raw.drain(..end + 4);
                break;
            }
            assert!(
                s.fill(deadline) > 0,
                "no response head for GET {target}: {}",
                preview(&s.raw)
            );
        }
        s.status = s
            .head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        s
    }

    /// The first header `name` of the response head (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// The next event (or comment, or retry line), waiting at most `within`.
    pub fn next(&mut self, within: Duration) -> Result<Event, End> {
        let deadline = Instant::now() + within;
        loop {
            self.decode_chunks();
            if let Some(event) = self.parse_one() {
                return Ok(event);
            }
            if self.finished {
                return Err(End::Finished);
            }
            if self.closed {
                return Err(End::Closed);
            }
            if self.fill(deadline) == 0 && !self.closed {
                return Err(End::Timeout);
            }
        }
    }

    /// The next event with data (skipping comments and `retry:`), or how the stream ended.
    pub fn next_event(&mut self, within: Duration) -> Result<Event, End> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let e = self.next(left)?;
            if e.comment.is_none() && e.retry.is_none() {
                return Ok(e);
            }
        }
    }

    /// Reads once, waiting until `deadline`; returns the bytes read (0: timeout or closed).
    fn fill(&mut self, deadline: Instant) -> usize {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return 0;
        }
        let _ = self.stream.set_read_timeout(Some(left));
        let mut buf = [0u8; 16 * 1024];
        match self.stream.read(&mut buf) {
            Ok(0) => {
                self.closed = true;
                0
            }
            Ok(n) => {
                self.raw.extend_from_slice(&buf[..n]);
                n
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => 0,
            Err(_) => {
                self.closed = true;
                0
            }
        }
    }

    /// Moves whole chunks from `raw` to `text`; notes the last chunk.
    fn decode_chunks(&mut self) {
        loop {
            let Some(line_end) = find(&self.raw, b"\r\n") else {
                return;
            };
            let size = std::str::from_utf8(&self.raw[..line_end])
                .ok()
                .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok());
            let Some(size) = size else {
                panic!("a bad chunk size line: {}", preview(&self.raw));
            };
            if size == 0 {
                if self.raw.len() >= line_end + 4 {
                    self.finished = true;
                    self.raw.clear();
                }
                return;
            }
            let end = line_end + 2 + size + 2;
            if self.raw.len() < end {
                return;
            }
            self.text
                .extend_from_slice(&self.raw[line_end + 2..line_end + 2 + size]);
            self.raw.drain(..end);
        }
    }

    /// One event from `text`, if a whole one (ended by a blank line) is there.
    fn parse_one(&mut self) -> Option<Event> {
        let end = find(&self.text, b"\n\n")?;
        let block = String::from_utf8_lossy(&self.text[..end]).into_owned();
        self.text.drain(..end + 2);
        let mut e = Event::default();
        for line in block.lines() {
            if let Some(comment) = line.strip_prefix(':') {
                e.comment = Some(comment.trim().to_string());
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => e.id = Some(value.to_string()),
                "event" => e.event = Some(value.to_string()),
                "retry" => e.retry = value.parse().ok(),
                "data" => {
                    if !e.data.is_empty() {
                        e.data.push('\n');
                    }
                    e.data.push_str(value);
                }
                _ => {}
            }
        }
        Some(e)
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A connected socket whose receive buffer was set before the handshake (so the window scale
/// matches it).
fn socket_with_rcvbuf(addr: SocketAddr, rcvbuf: Option<usize>) -> TcpStream {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .expect("socket");
    if let Some(bytes) = rcvbuf {
        socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
    }
    socket.connect(&addr.into()).expect("connect");
    socket.into()
}
