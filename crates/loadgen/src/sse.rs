//! Server-sent events (the `text/event-stream` format of the WHATWG HTML standard,
//! "Server-sent events"), read incrementally: the stream's bytes in (chunk framing already
//! removed), one [`Field`] out per line, borrowed from the input where the line arrived whole.
//!
//! A line may arrive split across reads at any byte: its start is kept in the parser until its
//! end comes. Lines end with LF, CRLF or a lone CR, as the standard allows.

/// The longest line kept while waiting for its end; a longer one is an error.
pub const MAX_LINE: usize = 1 << 20;

/// One line of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field<'a> {
    /// `retry: MS`: how long a client waits before it reconnects.
    Retry(u64),
    /// `id: ...`: the last event id, sent back as `Last-Event-ID` on a reconnect.
    Id(&'a [u8]),
    /// `event: ...`: the event's type (`message` when absent).
    Event(&'a [u8]),
    /// `data: ...`: one line of the event's data.
    Data(&'a [u8]),
    /// `: ...`: a comment; servers send them to keep idle streams alive.
    Comment,
    /// An empty line: the event is complete.
    Dispatch,
    /// Any other field (clients ignore it), or `retry` with a value that is not a number.
    Other,
}

/// The line that was too long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineTooLong;

#[derive(Debug, Default, Clone)]
pub struct Parser {
    /// The start of a line whose end has not arrived.
    partial: Vec<u8>,
    /// The last line ended with CR: an LF right after it belongs to that line ending.
    after_cr: bool,
}

impl Parser {
    pub fn new() -> Parser {
        Parser::default()
    }

    /// Feeds the stream's next bytes; calls `on` for each line they complete.
    pub fn feed(
        &mut self,
        mut input: &[u8],
        mut on: impl FnMut(Field<'_>),
    ) -> Result<(), LineTooLong> {
        if self.after_cr && !input.is_empty() {
            self.after_cr = false;
            if input[0] == b'\n' {
                input = &input[1..];
            }
        }
        while let Some(end) = input.iter().position(|&b| b == b'\n' || b == b'\r') {
            let line = &input[..end];
            let cr = input[end] == b'\r';
            let mut next = end + 1;
            if cr {
                match input.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    // The LF, if any, comes with the next bytes.
                    None => self.after_cr = true,
                }
            }
            if self.partial.is_empty() {
                on(field(line));
            } else {
                self.partial.extend_from_slice(line);
                let whole = std::mem::take(&mut self.partial);
                on(field(&whole));
                // Keep the allocation for the next split line.
                self.partial = whole;
                self.partial.clear();
            }
            input = &input[next..];
        }
        if self.partial.len() + input.len() > MAX_LINE {
            return Err(LineTooLong);
        }
        self.partial.extend_from_slice(input);
        Ok(())
    }

    /// Forgets a line in progress (the connection is gone).
    pub fn reset(&mut self) {
        self.partial.clear();
        self.after_cr = false;
    }
}

/// What one line (without its ending) says.
fn field(line: &[u8]) -> Field<'_> {
    if line.is_empty() {
        return Field::Dispatch;
    }
    if line[0] == b':' {
        return Field::Comment;
    }
    let (name, value) = match line.iter().position(|&b| b == b':') {
        Some(colon) => {
            let v = &line[colon + 1..];
            (&line[..colon], v.strip_prefix(b" ").unwrap_or(v))
        }
        None => (line, &b""[..]),
    };
    match name {
        b"data" => Field::Data(value),
        b"id" => Field::Id(value),
        b"event" => Field::Event(value),
        b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
            std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse().ok())
                .map_or(Field::Other, Field::Retry)
        }
        _ => Field::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields as owned strings, for comparing.
    fn owned(f: Field<'_>) -> String {
        let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        match f {
            Field::Retry(ms) => format!("retry {ms}"),
            Field::Id(v) => format!("id {}", s(v)),
            Field::Event(v) => format!("event {}", s(v)),
            Field::Data(v) => format!("data {}", s(v)),
            Field::Comment => "comment".into(),
            Field::Dispatch => "dispatch".into(),
            Field::Other => "other".into(),
        }
    }

    fn parse_in_steps(input: &[u8], step: usize) -> Vec<String> {
        let mut p = Parser::new();
        let mut out = Vec::new();
        for piece in input.chunks(step) {
            p.feed(piece, |f| out.push(owned(f))).unwrap();
        }
        out
    }

    /// h11's rule: the same fields whole, one byte at a time, and at odd splits.
    fn all_splits(input: &[u8]) -> Vec<String> {
        let whole = parse_in_steps(input, input.len().max(1));
        for step in [1, 2, 3, 5, 7, 64] {
            assert_eq!(parse_in_steps(input, step), whole, "step {step}");
        }
        whole
    }

    #[test]
    fn a_stream_of_events() {
        let stream = b"retry: 2000\n\nid: 7\nevent: message\ndata: {\"seq\":7,\"body\":\"hi\"}\n\n: keep-alive\n\nid: 8\nevent: job\ndata: {}\n\n";
        assert_eq!(
            all_splits(stream),
            [
                "retry 2000",
                "dispatch",
                "id 7",
                "event message",
                "data {\"seq\":7,\"body\":\"hi\"}",
                "dispatch",
                "comment",
                "dispatch",
                "id 8",
                "event job",
                "data {}",
                "dispatch"
            ]
        );
    }

    #[test]
    fn line_endings_and_field_forms() {
        // CRLF, a lone CR, LF; no space after the colon; a field without a colon; two spaces
        // (only one is removed); an unknown field; a retry that is not a number.
        let stream = b"data:a\r\ndata: b\rdata\nid:  9\nfoo: bar\nretry: soon\r\n\r";
        assert_eq!(
            all_splits(stream),
            [
                "data a", "data b", "data ", "id  9", "other", "other", "dispatch"
            ]
        );
        // A CR at the very end of one read and the LF at the start of the next: one ending.
        let mut p = Parser::new();
        let mut out = Vec::new();
        p.feed(b"data: x\r", |f| out.push(owned(f))).unwrap();
        p.feed(b"\ndata: y\n", |f| out.push(owned(f))).unwrap();
        assert_eq!(out, ["data x", "data y"]);
    }

    #[test]
    fn a_line_too_long_is_an_error() {
        let mut p = Parser::new();
        let big = vec![b'a'; MAX_LINE];
        p.feed(&big, |_| {}).unwrap();
        assert_eq!(p.feed(b"a", |_| {}), Err(LineTooLong));
        p.reset();
        let mut n = 0;
        p.feed(b"data: ok\n", |_| n += 1).unwrap();
        assert_eq!(n, 1);
    }
}
