//! The request head: httparse does the line and header grammar; this module applies the
//! framing rules of RFC 9112 (which body, keep-alive or not) and maps every fault to a status.

use crate::Limits;

/// Header lines beyond this many are answered 431.
pub const MAX_HEADERS: usize = 100;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// Where one header sits in the head, as offsets from the head's first byte.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HeaderPos {
    pub name: (u32, u32),
    pub value: (u32, u32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    Length(usize),
    Chunked,
}

/// A parsed head, by offsets, so that it can wait in the buffer while its body arrives.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Head {
    pub len: usize,
    /// The body is handed out in pieces as it arrives, not buffered (decided by the caller).
    pub streamed: bool,
    pub method: (u32, u32),
    pub target: (u32, u32),
    pub version: Version,
    pub framing: Framing,
    pub keep_alive: bool,
    pub expect_continue: bool,
}

/// Headers parsed with room on the stack for this many first; a head with more is parsed again
/// with room for [`MAX_HEADERS`]. Most requests have a handful: this spares initialising 3 KiB
/// per request, and keeps a coroutine's stack (whose touched pages stay resident) shallow.
const FEW_HEADERS: usize = 16;

/// Parses the head at the start of `buf` (leading blank lines already skipped).
/// `Ok(None)`: not complete yet. `Err(status)`: answer with that status and close.
pub(crate) fn parse(
    buf: &[u8],
    limits: &Limits,
    positions: &mut Vec<HeaderPos>,
) -> Result<Option<Head>, u16> {
    let mut few = [httparse::EMPTY_HEADER; FEW_HEADERS];
    match parse_with(buf, limits, positions, &mut few) {
        Err(TOO_MANY_HEADERS) => parse_many(buf, limits, positions),
        parsed => parsed,
    }
}

#[inline(never)]
fn parse_many(
    buf: &[u8],
    limits: &Limits,
    positions: &mut Vec<HeaderPos>,
) -> Result<Option<Head>, u16> {
    let mut many = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match parse_with(buf, limits, positions, &mut many) {
        Err(TOO_MANY_HEADERS) => Err(431),
        parsed => parsed,
    }
}

/// Not a status: `storage` had no room for every header.
const TOO_MANY_HEADERS: u16 = 0;

fn parse_with<'b>(
    buf: &'b [u8],
    limits: &Limits,
    positions: &mut Vec<HeaderPos>,
    storage: &mut [httparse::Header<'b>],
) -> Result<Option<Head>, u16> {
    let mut req = httparse::Request::new(storage);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            // The target so far: if its end has not arrived, all that follows the method.
            let target_len = match req.path {
                Some(p) => p.len(),
                None => memchr::memchr(b' ', buf).map_or(0, |sp| buf.len() - sp - 1),
            };
            return if target_len > limits.max_target {
                Err(414)
            } else if buf.len() > limits.max_head {
                Err(431)
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(TOO_MANY_HEADERS),
        Err(httparse::Error::Version) if req.path.is_some_and(|p| p.len() > limits.max_target) => {
            return Err(414);
        }
        Err(httparse::Error::Version) => {
            return match version_error(buf) {
                Some(status) => Err(status),
                None if buf.len() > limits.max_head => Err(431),
                None => Ok(None),
            };
        }
        Err(_) => return Err(400),
    };
    let method = req.method.unwrap_or_default();
    let target = req.path.unwrap_or_default();
    // 414 before 431, as when the head arrives in pieces.
    if target.len() > limits.max_target {
        return Err(414);
    }
    if len > limits.max_head {
        return Err(431);
    }
    let version = if req.version == Some(0) {
        Version::Http10
    } else {
        Version::Http11
    };
    // RFC 3986 / RFC 9112 3.2: a target is visible ASCII (non-ASCII is percent-encoded).
    // httparse lets raw bytes above 0x7F through; they are never routed.
    if target.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
        return Err(400);
    }
    check_target_form(method, target)?;

    let base = buf.as_ptr() as usize;
    let span = |s: &[u8]| ((s.as_ptr() as usize - base) as u32, s.len() as u32);
    positions.clear();
    let mut content_length: Option<u64> = None;
    let mut te_chunked = false;
    let mut close = false;
    let mut keep_alive_token = false;
    let mut hosts = 0;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        positions.push(HeaderPos {
            name: span(h.name.as_bytes()),
            value: span(h.value),
        });
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_content_length(h.value)?;
            if content_length.is_some_and(|prev| prev != n) {
                return Err(400);
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            for coding in list(h.value) {
                if te_chunked {
                    // Nothing may follow chunked, and chunked twice is malformed.
                    return Err(400);
                }
                if coding.eq_ignore_ascii_case(b"chunked") {
                    te_chunked = true;
                } else if coding.is_empty() || !coding.iter().all(|&b| is_tchar(b)) {
                    return Err(400);
                } else {
                    return Err(501);
                }
            }
            if !te_chunked {
                return Err(400);
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in list(h.value) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive_token |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case(b"expect") {
            expect_continue = h.value.eq_ignore_ascii_case(b"100-continue");
        }
    }
    // RFC 9112 3.2: exactly one Host in HTTP/1.1; at most one in HTTP/1.0.
    if hosts > 1 || (hosts == 0 && version == Version::Http11) {
        return Err(400);
    }
    // RFC 9112 6.3: both framings at once is how requests are smuggled; reject rather than guess.
    let framing = match (te_chunked, content_length) {
        (true, Some(_)) => return Err(400),
        (true, None) => Framing::Chunked,
        // The size is checked by the caller: the limit depends on whether the body is streamed.
        (false, n) => Framing::Length(usize::try_from(n.unwrap_or(0)).map_err(|_| 413u16)?),
    };
    // RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 means the framing is faulty.
    if te_chunked && version == Version::Http10 {
        return Err(400);
    }
    let keep_alive = match version {
        Version::Http11 => !close,
        Version::Http10 => keep_alive_token && !close,
    };
    Ok(Some(Head {
        len,
        streamed: false,
        method: span(method.as_bytes()),
        target: span(target.as_bytes()),
        version,
        framing,
        keep_alive,
        expect_continue: expect_continue && framing != Framing::Length(0),
    }))
}

/// `HTTP/2.0` is well-formed but unsupported (505); anything else in that place is malformed
/// (400). httparse reports the error before the line ends, so `None` means: wait for the rest.
fn version_error(buf: &[u8]) -> Option<u16> {
    let (line, complete) = match memchr::memchr(b'\n', buf) {
        Some(i) => (&buf[..i], true),
        None => (buf, false),
    };
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    // The third token of the request line (httparse has checked the method and target).
    let version = line.splitn(3, |&b| b == b' ').nth(2).unwrap_or_default();
    let fits = version.len() <= 8
        && version.iter().zip(b"HTTP/0.0").all(|(&c, &p)| {
            if p == b'0' {
                c.is_ascii_digit()
            } else {
                c == p
            }
        });
    match (fits, complete, version.len()) {
        (true, true, 8) => Some(505),
        (true, false, _) => None,
        _ => Some(400),
    }
}

/// RFC 9112 3.2: origin-form `/path`, absolute-form `http://host/path`, authority-form
/// `host:port` for CONNECT only, asterisk-form `*` for OPTIONS only.
fn check_target_form(method: &str, target: &str) -> Result<(), u16> {
    let ok = match target.as_bytes() {
        [b'/', ..] => true,
        b"*" => method == "OPTIONS",
        _ if method == "CONNECT" => !target.contains('/'),
        _ => match target.split_once("://") {
            Some((scheme, rest)) => {
                let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
                scheme
                    .bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_alphabetic())
                    && scheme
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
                    && !authority.is_empty()
                    && (!authority.contains(['[', ']']) || authority.starts_with('['))
            }
            None => false,
        },
    };
    if ok { Ok(()) } else { Err(400) }
}

/// `Content-Length: 42` or the repeated form `42, 42`. All digits but too large is 413.
fn parse_content_length(value: &[u8]) -> Result<u64, u16> {
    let mut result = None;
    for item in list(value) {
        if item.is_empty() || !item.iter().all(u8::is_ascii_digit) {
            return Err(400);
        }
        let n = item
            .iter()
            .try_fold(0u64, |acc, &d| {
                acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
            })
            .ok_or(413u16)?;
        if result.is_some_and(|prev| prev != n) {
            return Err(400);
        }
        result = Some(n);
    }
    result.ok_or(400)
}

/// The elements of a comma-separated header list, trimmed of optional whitespace.
fn list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(|s| s.trim_ascii())
}

/// RFC 9110 5.6.2 tchar.
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}
