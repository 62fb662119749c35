//! An incremental HTTP/1.1 response reader that frames replies and skips their bodies.
//!
//! The head goes through httparse; the body is never copied: Content-Length bodies are
//! skipped by count, chunked ones by a small byte-level state machine, and a reply with
//! neither ends when the server closes. Input may arrive split anywhere, or many replies at
//! once (pipelining): [`ResponseReader::advance`] takes what it can and says how much.
//! A caller that wants the body (an event stream, a long poll's JSON) passes a sink to
//! [`ResponseReader::advance_with`], which is handed the body's bytes as slices of the input,
//! chunk framing removed.

/// Largest reply head we accept; a bigger one is a parse error (servers send ~100 bytes).
pub const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 64;

/// A complete reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    pub status: u16,
    /// The server will close the connection after it (`Connection: close`, or HTTP/1.0).
    pub close: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// httparse refused the head, or the head is larger than [`MAX_HEAD`].
    Head,
    /// Content-Length is not a number, or two of them disagree.
    Length,
    /// Bad chunked framing.
    Chunk,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    /// Content-Length bytes still to skip.
    Body(u64),
    Chunked(Chunk),
    /// No length: the body ends when the connection does.
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Hex digits of a chunk size; `digits` says whether any were seen yet.
    Size {
        n: u64,
        digits: bool,
    },
    /// `;name=value` after the size, up to the line end.
    Extension {
        n: u64,
    },
    SizeLf {
        n: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk: trailer lines, up to an empty one.
    Trailer {
        line_start: bool,
    },
}

#[derive(Debug, Clone)]
pub struct ResponseReader {
    state: State,
    status: u16,
    close: bool,
    event_stream: bool,
}

impl Default for ResponseReader {
    fn default() -> Self {
        ResponseReader {
            state: State::Head,
            status: 0,
            close: false,
            event_stream: false,
        }
    }
}

impl ResponseReader {
    pub fn new() -> ResponseReader {
        ResponseReader::default()
    }

    /// Reads from `input`, which starts where the last call stopped. Returns how many bytes
    /// it used and, if a reply ended within them, the reply (the bytes after it belong to the
    /// next one). Zero bytes used and no reply: the head is incomplete; call again with the
    /// same bytes and more. `no_body`: the reply answers a HEAD request.
    pub fn advance(
        &mut self,
        input: &[u8],
        no_body: bool,
    ) -> Result<(usize, Option<Done>), ParseError> {
        self.advance_with(input, no_body, |_| {})
    }

    /// [`ResponseReader::advance`], handing each piece of the body to `body` as it is framed.
    pub fn advance_with(
        &mut self,
        input: &[u8],
        no_body: bool,
        mut body: impl FnMut(&[u8]),
    ) -> Result<(usize, Option<Done>), ParseError> {
        let mut used = 0;
        loop {
            let rest = &input[used..];
            match self.state {
                State::Head => {
                    let Some(n) = self.head(rest, no_body)? else {
                        return Ok((used, None));
                    };
                    used += n;
                    if self.state == State::Head {
                        // A 1xx reply: the real one follows.
                        continue;
                    }
                    if self.state == State::Body(0) {
                        return Ok((used, Some(self.finish())));
                    }
                }
                State::Body(left) => {
                    let take = left.min(rest.len() as u64);
                    if take > 0 {
                        body(&rest[..take as usize]);
                    }
                    used += take as usize;
                    if take == left {
                        return Ok((used, Some(self.finish())));
                    }
                    self.state = State::Body(left - take);
                    return Ok((used, None));
                }
                State::Chunked(c) => {
                    let (n, done) = self.chunked(c, rest, &mut body)?;
                    used += n;
                    if done {
                        return Ok((used, Some(self.finish())));
                    }
                    return Ok((used, None));
                }
                State::UntilClose => {
                    if !rest.is_empty() {
                        body(rest);
                    }
                    return Ok((input.len(), None));
                }
            }
        }
    }

    /// Parses only a reply's head at the start of `input`: its length once complete (then
    /// [`ResponseReader::status`] and the others describe it, and `advance_with` goes on with
    /// the body), `None` while incomplete: offer the same bytes again with more. Only between
    /// replies. A 1xx reply before it is passed over (and parsed again if offered again).
    pub fn read_head(&mut self, input: &[u8], no_body: bool) -> Result<Option<usize>, ParseError> {
        debug_assert_eq!(self.state, State::Head, "read_head between replies only");
        let mut used = 0;
        loop {
            let Some(n) = self.head(&input[used..], no_body)? else {
                return Ok(None);
            };
            used += n;
            if self.state != State::Head {
                return Ok(Some(used));
            }
        }
    }

    /// The status of the reply being read (or last read).
    pub fn status(&self) -> u16 {
        self.status
    }

    /// Whether the reply being read says `Content-Type: text/event-stream`.
    pub fn event_stream(&self) -> bool {
        self.event_stream
    }

    /// The connection ended: a reply framed by the close is complete now. `None`: the reply
    /// was cut short, or none had begun ([`ResponseReader::in_progress`] tells which).
    pub fn eof(&mut self) -> Option<Done> {
        match self.state {
            State::UntilClose => Some(self.finish()),
            _ => None,
        }
    }

    /// Whether part of a reply has been read (a close now would cut it).
    pub fn in_progress(&self) -> bool {
        self.state != State::Head
    }

    fn finish(&mut self) -> Done {
        self.state = State::Head;
        Done {
            status: self.status,
            close: self.close,
        }
    }

    /// Parses a head at the start of `input`, sets the body state, and returns its length;
    /// `None` if incomplete.
    fn head(&mut self, input: &[u8], no_body: bool) -> Result<Option<usize>, ParseError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let n = match resp.parse(input) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if input.len() < MAX_HEAD => return Ok(None),
            _ => return Err(ParseError::Head),
        };
        let status = resp.code.unwrap_or(0);
        let mut close = resp.version == Some(0);
        let mut length: Option<u64> = None;
        let mut chunked = false;
        let mut event_stream = false;
        for h in resp.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let v = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or(ParseError::Length)?;
                if length.is_some_and(|l| l != v) {
                    return Err(ParseError::Length);
                }
                length = Some(v);
            } else if h.name.eq_ignore_ascii_case("content-type") {
                let media = h.value.split(|&b| b == b';').next().unwrap_or(h.value);
                event_stream = media
                    .trim_ascii()
                    .eq_ignore_ascii_case(b"text/event-stream");
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = last_token(h.value).eq_ignore_ascii_case(b"chunked");
            } else if h.name.eq_ignore_ascii_case("connection") {
                for token in h.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        close = false;
                    }
                }
            }
        }
        self.status = status;
        self.close = close;
        self.event_stream = event_stream;
        self.state = if (100..200).contains(&status) {
            State::Head
        } else if no_body || status == 204 || status == 304 {
            State::Body(0)
        } else if chunked {
            State::Chunked(Chunk::Size {
                n: 0,
                digits: false,
            })
        } else if let Some(l) = length {
            State::Body(l)
        } else {
            State::UntilClose
        };
        Ok(Some(n))
    }

    /// Walks chunked framing; returns the bytes used and whether the body ended.
    fn chunked(
        &mut self,
        mut c: Chunk,
        input: &[u8],
        body: &mut impl FnMut(&[u8]),
    ) -> Result<(usize, bool), ParseError> {
        let mut i = 0;
        while i < input.len() {
            if let Chunk::Data(left) = c {
                let take = left.min((input.len() - i) as u64);
                body(&input[i..i + take as usize]);
                i += take as usize;
                c = if take == left {
                    Chunk::DataCr
                } else {
                    Chunk::Data(left - take)
                };
                continue;
            }
            let b = input[i];
            c = match c {
                Chunk::Data(_) => unreachable!("skipped above"),
                Chunk::Size { n, digits } => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let d = (b as char).to_digit(16).unwrap() as u64;
                        if n > (u64::MAX >> 4) {
                            return Err(ParseError::Chunk);
                        }
                        Chunk::Size {
                            n: n << 4 | d,
                            digits: true,
                        }
                    }
                    b';' | b' ' | b'\t' if digits => Chunk::Extension { n },
                    b'\r' if digits => Chunk::SizeLf { n },
                    b'\n' if digits => after_size(n),
                    _ => return Err(ParseError::Chunk),
                },
                Chunk::Extension { n } => match b {
                    b'\r' => Chunk::SizeLf { n },
                    b'\n' => after_size(n),
                    _ => Chunk::Extension { n },
                },
                Chunk::SizeLf { n } if b == b'\n' => after_size(n),
                Chunk::DataCr if b == b'\r' => Chunk::DataLf,
                Chunk::DataCr | Chunk::DataLf if b == b'\n' => Chunk::Size {
                    n: 0,
                    digits: false,
                },
                Chunk::Trailer { line_start } => match b {
                    b'\n' if line_start => {
                        self.state = State::Chunked(c);
                        return Ok((i + 1, true));
                    }
                    b'\n' => Chunk::Trailer { line_start: true },
                    b'\r' => Chunk::Trailer { line_start },
                    _ => Chunk::Trailer { line_start: false },
                },
                Chunk::SizeLf { .. } | Chunk::DataCr | Chunk::DataLf => {
                    return Err(ParseError::Chunk);
                }
            };
            i += 1;
        }
        self.state = State::Chunked(c);
        Ok((i, false))
    }
}

fn after_size(n: u64) -> Chunk {
    if n == 0 {
        Chunk::Trailer { line_start: true }
    } else {
        Chunk::Data(n)
    }
}

/// The last comma-separated token of a header value (`gzip, chunked` -> `chunked`).
fn last_token(value: &[u8]) -> &[u8] {
    value
        .rsplit(|&b| b == b',')
        .next()
        .unwrap_or(value)
        .trim_ascii()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` the way a connection would, in pieces of `step` bytes (a partial head is
    /// kept and offered again with the next piece), and returns the replies and the unused tail.
    fn feed(input: &[u8], step: usize, no_body: bool) -> Result<(Vec<Done>, usize), ParseError> {
        let mut r = ResponseReader::new();
        let mut done = Vec::new();
        let (mut start, mut end) = (0, 0);
        while end < input.len() {
            end = (end + step).min(input.len());
            loop {
                let (n, d) = r.advance(&input[start..end], no_body)?;
                start += n;
                match d {
                    Some(d) => done.push(d),
                    None => break,
                }
            }
        }
        Ok((done, input.len() - start))
    }

    /// h11's rule: the same answer for the whole input, one byte at a time, and odd splits.
    fn all_splits(input: &[u8], no_body: bool) -> Vec<Done> {
        let (whole, rest) = feed(input, input.len(), no_body).unwrap();
        assert_eq!(rest, 0, "unused bytes");
        for step in [1, 2, 3, 7, 64] {
            assert_eq!(
                feed(input, step, no_body).unwrap(),
                (whole.clone(), 0),
                "step {step}"
            );
        }
        whole
    }

    const HELLO: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nContent-Type: text/plain\r\n\r\nHello, World!";

    #[test]
    fn content_length_and_pipelining() {
        let mut three = Vec::new();
        for _ in 0..3 {
            three.extend_from_slice(HELLO);
        }
        let done = all_splits(&three, false);
        assert_eq!(done.len(), 3);
        assert!(done.iter().all(|d| d.status == 200 && !d.close));
        // A trailing partial reply is left for the next read.
        three.extend_from_slice(b"HTTP/1.1 404 Not");
        let (done, rest) = feed(&three, three.len(), false).unwrap();
        assert_eq!((done.len(), rest), (3, 16));
    }

    #[test]
    fn chunked_bodies() {
        let reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Trailer: y\r\n\r\n";
        let mut two = reply.to_vec();
        two.extend_from_slice(HELLO);
        let done = all_splits(&two, false);
        assert_eq!(done.len(), 2);
        let bare = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(all_splits(bare, false).len(), 1);
        for bad in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\n",
        ] {
            assert_eq!(feed(bad, bad.len(), false), Err(ParseError::Chunk));
        }
    }

    #[test]
    fn replies_without_bodies() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n";
        assert_eq!(all_splits(head, true).len(), 1, "HEAD");
        let no_content = b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(all_splits(no_content, false)[0].status, 204);
        // 100 Continue is not the reply.
        let mut cont = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
        cont.extend_from_slice(HELLO);
        assert_eq!(
            all_splits(&cont, false),
            vec![Done {
                status: 200,
                close: false
            }]
        );
    }

    #[test]
    fn close_and_until_close() {
        let close = b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            all_splits(close, false),
            vec![Done {
                status: 400,
                close: true
            }]
        );
        let old = b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n";
        assert!(all_splits(old, false)[0].close);
        let mut r = ResponseReader::new();
        let body = b"HTTP/1.1 200 OK\r\n\r\nall of this until the close";
        assert_eq!(r.advance(body, false), Ok((body.len(), None)));
        assert!(r.in_progress());
        assert_eq!(
            r.eof(),
            Some(Done {
                status: 200,
                close: false
            })
        );
        assert!(!r.in_progress());
        assert_eq!(r.eof(), None);
    }

    /// The body handed to a sink is the same, chunk framing removed, however the input is
    /// split; a head read alone says the status and whether it is an event stream.
    #[test]
    fn bodies_to_a_sink() {
        let chunked = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nretry\r\n3;x=y\r\n: 1\r\n0\r\n\r\n";
        let sized = b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\nabcd";
        for (input, body) in [(&chunked[..], &b"retry: 1"[..]), (sized, b"abcd")] {
            for step in [1, 2, 3, 7, input.len()] {
                let mut r = ResponseReader::new();
                let (mut got, mut start, mut end, mut done) = (Vec::new(), 0, 0, None);
                while end < input.len() {
                    end = (end + step).min(input.len());
                    let (n, d) = r
                        .advance_with(&input[start..end], false, |b| got.extend_from_slice(b))
                        .unwrap();
                    start += n;
                    done = done.or(d);
                }
                assert_eq!(got, body, "step {step}");
                assert!(done.is_some(), "step {step}");
            }
        }
        let mut r = ResponseReader::new();
        let head_end = chunked.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert_eq!(r.read_head(&chunked[..head_end - 1], false), Ok(None));
        assert_eq!(r.read_head(chunked, false), Ok(Some(head_end)));
        assert_eq!((r.status(), r.event_stream()), (200, true));
        let mut got = Vec::new();
        let (n, done) = r
            .advance_with(&chunked[head_end..], false, |b| got.extend_from_slice(b))
            .unwrap();
        assert_eq!(
            (n, got.as_slice()),
            (chunked.len() - head_end, &b"retry: 1"[..])
        );
        assert!(done.is_some());
        // A 1xx before the head is passed over; a JSON reply is no event stream.
        let mut r = ResponseReader::new();
        let mut cont = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
        cont.extend_from_slice(sized);
        assert_eq!(r.read_head(&cont, false), Ok(Some(cont.len() - 4)));
        assert_eq!((r.status(), r.event_stream()), (201, false));
        // Until the close: every byte is body.
        let mut r = ResponseReader::new();
        let mut got = Vec::new();
        let input = b"HTTP/1.0 200 OK\r\n\r\nstream";
        r.advance_with(input, false, |b| got.extend_from_slice(b))
            .unwrap();
        assert_eq!(got, b"stream");
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(
            feed(b"HTTX/1.1 200 OK\r\n\r\n", 100, false),
            Err(ParseError::Head)
        );
        let two = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(feed(two, 100, false), Err(ParseError::Length));
        let nan = b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n";
        assert_eq!(feed(nan, 100, false), Err(ParseError::Length));
        let mut huge = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        huge.resize(MAX_HEAD + 10, b'a');
        assert_eq!(feed(&huge, 4096, false), Err(ParseError::Head));
    }
}
