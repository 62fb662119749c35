//! The chunked transfer coding of request bodies (RFC 9112 7.1), decoded in place: the decoded
//! bytes are moved down over the chunk framing inside the connection's own input buffer, so a
//! chunked body costs no second buffer and memory stays bounded by the body limit.

use crate::head::is_tchar;

/// A chunk-size line or trailer line longer than this is malformed.
const MAX_LINE: usize = 4096;

#[derive(Clone, Copy, Debug)]
enum State {
    Size,
    Data(u64),
    DataEnd,
    Trailers { bytes: usize },
    Done,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Decoder {
    state: State,
    /// Offset of the next raw byte to decode.
    pub read: usize,
    /// Offset just past the decoded body so far.
    pub write: usize,
}

impl Decoder {
    /// A decoder for a body that starts at `offset` in the buffer.
    pub fn new(offset: usize) -> Decoder {
        Decoder {
            state: State::Size,
            read: offset,
            write: offset,
        }
    }

    /// Decodes as much of `buf` as is there. `Ok(true)` once the last chunk and trailers are in.
    /// `body_start` and `max_body` bound the decoded size (413); `max_trailers` the trailers (431).
    pub fn decode(
        &mut self,
        buf: &mut [u8],
        body_start: usize,
        max_body: usize,
        max_trailers: usize,
    ) -> Result<bool, u16> {
        loop {
            match self.state {
                State::Size => {
                    let Some(line) = self.line(buf)? else {
                        return Ok(false);
                    };
                    let size = parse_size_line(line)?;
                    self.read += line.len() + 2;
                    if size == 0 {
                        self.state = State::Trailers { bytes: 0 };
                    } else if (self.write - body_start) as u64 + size > max_body as u64 {
                        return Err(413);
                    } else {
                        self.state = State::Data(size);
                    }
                }
                State::Data(left) => {
                    let n = (left as usize).min(buf.len() - self.read);
                    if n == 0 {
                        return Ok(false);
                    }
                    buf.copy_within(self.read..self.read + n, self.write);
                    self.read += n;
                    self.write += n;
                    self.state = if left == n as u64 {
                        State::DataEnd
                    } else {
                        State::Data(left - n as u64)
                    };
                }
                State::DataEnd => {
                    match buf.get(self.read..self.read + 2) {
                        None if buf.len() - self.read == 1 && buf[self.read] == b'\r' => {
                            return Ok(false);
                        }
                        None if buf.len() == self.read => return Ok(false),
                        Some(b"\r\n") => self.read += 2,
                        _ => return Err(400),
                    }
                    self.state = State::Size;
                }
                State::Trailers { bytes } => {
                    let Some(line) = self.line(buf)? else {
                        if bytes + (buf.len() - self.read) > max_trailers {
                            return Err(431);
                        }
                        return Ok(false);
                    };
                    let len = line.len();
                    if len == 0 {
                        self.read += 2;
                        self.state = State::Done;
                        return Ok(true);
                    }
                    check_trailer(line)?;
                    self.read += len + 2;
                    if bytes + len + 2 > max_trailers {
                        return Err(431);
                    }
                    self.state = State::Trailers {
                        bytes: bytes + len + 2,
                    };
                }
                State::Done => return Ok(true),
            }
        }
    }

    /// The next CRLF-terminated line (without the CRLF), if all of it is there. Chunk framing
    /// requires CRLF: a bare LF or CR is malformed.
    fn line<'b>(&self, buf: &'b [u8]) -> Result<Option<&'b [u8]>, u16> {
        let rest = &buf[self.read..];
        match memchr::memchr(b'\n', &rest[..rest.len().min(MAX_LINE)]) {
            Some(0) => Err(400),
            Some(i) if rest[i - 1] == b'\r' => {
                let line = &rest[..i - 1];
                if memchr::memchr(b'\r', line).is_some() {
                    return Err(400);
                }
                Ok(Some(line))
            }
            Some(_) => Err(400),
            None if rest.len() >= MAX_LINE => Err(400),
            None => Ok(None),
        }
    }
}

/// `1*HEXDIG *( BWS ";" BWS token [ BWS "=" BWS ( token / quoted-string ) ] )`; extensions are
/// checked and dropped.
fn parse_size_line(line: &[u8]) -> Result<u64, u16> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return Err(400);
    }
    let size = u64::from_str_radix(
        std::str::from_utf8(&line[..digits]).map_err(|_| 400u16)?,
        16,
    )
    .map_err(|_| 400u16)?;
    // Whitespace is allowed only before a `;` (BWS), never trailing on its own.
    let mut rest = &line[digits..];
    while !rest.is_empty() {
        let Some(after) = trim_bws(rest).strip_prefix(b";") else {
            return Err(400);
        };
        rest = trim_bws(after);
        let name_len = rest.iter().take_while(|&&b| is_tchar(b)).count();
        if name_len == 0 {
            return Err(400);
        }
        rest = &rest[name_len..];
        if let Some(after) = trim_bws(rest).strip_prefix(b"=") {
            rest = skip_ext_value(trim_bws(after))?;
        }
    }
    Ok(size)
}

fn skip_ext_value(v: &[u8]) -> Result<&[u8], u16> {
    if let Some(mut q) = v.strip_prefix(b"\"") {
        loop {
            match q {
                [b'"', rest @ ..] => return Ok(rest),
                [b'\\', c, rest @ ..] if *c == b'\t' || (b' '..=b'~').contains(c) || *c >= 0x80 => {
                    q = rest
                }
                [c, rest @ ..] if *c == b'\t' || (*c >= b' ' && *c != 0x7f && *c != b'\\') => {
                    q = rest
                }
                _ => return Err(400),
            }
        }
    }
    let n = v.iter().take_while(|&&b| is_tchar(b)).count();
    if n == 0 {
        return Err(400);
    }
    Ok(&v[n..])
}

fn trim_bws(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    s
}

/// A trailer line is a header line; trailers are dropped, but a malformed one is still a 400.
fn check_trailer(line: &[u8]) -> Result<(), u16> {
    let colon = memchr::memchr(b':', line).ok_or(400u16)?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(400);
    }
    // RFC 9110 6.5.1: framing and routing fields must not arrive as trailers.
    for forbidden in [&b"content-length"[..], b"transfer-encoding", b"host"] {
        if name.eq_ignore_ascii_case(forbidden) {
            return Err(400);
        }
    }
    if value
        .iter()
        .any(|&b| b == 0 || b == 0x7f || (b < b' ' && b != b'\t'))
    {
        return Err(400);
    }
    Ok(())
}
