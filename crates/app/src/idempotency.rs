//! Idempotency keys (draft-ietf-httpapi-idempotency-key-header-07) on `POST /jobs` and
//! `POST /messages`: a client that retries a POST with the same `Idempotency-Key` gets the first
//! reply again, and nothing is done twice, whichever process serves the retry and whether or not
//! the server restarted in between.
//!
//! The key travels in the same journal record as the work it protects (the message, the job's
//! first record), so no crash can leave one without the other, and it is checked and recorded
//! under the journal's append lock: of any number of concurrent requests with one key, in any
//! processes, exactly one does the work. The rules:
//! - the same key and the same request (method, target and body: SHA-256) after the first has
//!   finished: its reply again, with `Idempotent-Replayed: true`;
//! - the same key while the first still waits (`Prefer: wait`): 409; with a different request:
//!   422; a malformed key: 400; with `--require-idempotency-key`, no key: 400;
//! - a key whose first request's process died (or an earlier run of the server) blocks nothing:
//!   its work was done (it is in the journal), so a retry gets the reply the work implies;
//! - keys expire after `--idempotency-ttl`; live ones are carried into every new segment.

use std::time::Instant;

use journal::Tx;
use proto::Response;
use sha2::{Digest, Sha256};

use crate::problem::problem;
use crate::records::{self, Key, KeyReply, Owner, StoredReply, now_ms};
use crate::reply::{Pending, Reply, Wait};
use crate::{App, Routable};

/// The longest key (in characters), as the draft suggests servers bound it.
const MAX_KEY: usize = 255;

/// What a POST wrote, inside the journal transaction.
pub(crate) enum Written {
    /// The reply, due once `seq` is durable.
    Now { seq: u64, reply: Response },
    /// Held (`Prefer: wait`): `wait` says for what, until `until`.
    Later { wait: Wait, until: Instant },
}

/// A key the view knows.
pub(crate) struct KeyEntry {
    pub key: Key,
    /// The first reply (for a waiting job, the 202 its creation implies, until the final one
    /// is recorded).
    pub reply: StoredReply,
    /// The record that says it: a replay waits until it is durable.
    pub seq: u64,
}

impl KeyEntry {
    /// Whether the first request's reply is final (it does not wait any more).
    fn is_final(&self) -> bool {
        !self.key.waits
    }
}

impl App {
    /// Runs the write `make` (a POST's work) in a journal transaction, with the request's
    /// Idempotency-Key (if any) checked first and handed to `make` to record with the work.
    pub(crate) fn keyed_write<R: Routable + ?Sized>(
        &self,
        req: &R,
        make: impl FnOnce(&App, &mut Tx<'_>, Option<Key>) -> std::io::Result<Written>,
    ) -> Reply {
        let key = match parse_key(req) {
            Ok(None) if self.inner.require_key => {
                return problem(400, "an Idempotency-Key header is required on this route").into();
            }
            Ok(key) => key,
            Err(detail) => return problem(400, detail).into(),
        };
        let mut tx = match self.journal().begin() {
            Ok(tx) => tx,
            Err(e) => return problem(500, format!("appending to the journal: {e}")).into(),
        };
        let key = match key {
            None => None,
            Some(key) => {
                let fingerprint = fingerprint(req);
                // Under the append lock, with the view caught up: the first request with this
                // key in any process is the one that finds nothing here.
                if let Some(reply) = self.check_key(&key, &fingerprint) {
                    return reply;
                }
                Some(Key {
                    key,
                    fingerprint,
                    expires_ms: now_ms() + self.inner.key_ttl.as_millis() as u64,
                    by: self.owner(),
                    waits: false,
                })
            }
        };
        let written = make(self, &mut tx, key);
        drop(tx);
        match written {
            Ok(Written::Now { seq, reply }) => self.after_commit(seq, reply),
            Ok(Written::Later { wait, until }) => Reply::Later(Pending {
                app: self.clone(),
                wait,
                until: Some(until),
            }),
            Err(e) => problem(500, format!("appending to the journal: {e}")).into(),
        }
    }

    /// What to answer a request whose key is already known; `None` if it is new (or expired).
    fn check_key(&self, key: &str, fingerprint: &str) -> Option<Reply> {
        let view = self.view();
        let entry = view.keys.get(key).filter(|e| e.key.expires_ms > now_ms())?;
        if entry.key.fingerprint != fingerprint {
            return Some(
                problem(
                    422,
                    "this Idempotency-Key was first used with a different request (method, \
                     target or body); use a new key for a new request",
                )
                .into(),
            );
        }
        if !entry.is_final() && self.is_alive(entry.key.by) {
            return Some(
                problem(
                    409,
                    "a request with this Idempotency-Key is still being processed; retry later",
                )
                .with_header("Retry-After", "1")
                .into(),
            );
        }
        let (seq, reply) = (entry.seq, replayed(&entry.reply));
        drop(view);
        Some(self.after_commit(seq, reply))
    }

    /// Whether the process that took a request is still running it: of this run of the server,
    /// and alive (a SIGKILLed prefork worker is not).
    fn is_alive(&self, by: Owner) -> bool {
        let me = self.owner();
        if by.boot != me.boot {
            return false;
        }
        if by.pid == me.pid {
            return true;
        }
        // SAFETY: kill with signal 0 only checks that the process exists; no memory involved.
        let rc = unsafe { libc::kill(by.pid as libc::pid_t, 0) };
        rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }

    /// Records the final reply of a request that waited (`Prefer: wait`), so that a retry gets
    /// it. Best effort: if it is lost, a retry gets the 202 the job's creation implies.
    pub(crate) fn record_final(&self, mut key: Key, reply: &Response) {
        key.waits = false;
        let record = KeyReply {
            key,
            reply: StoredReply::of(reply),
        };
        let payload = serde_json::to_vec(&record).expect("a key reply serializes");
        let appended = self
            .journal()
            .begin()
            .and_then(|mut tx| self.append(&mut tx, records::IDEMPOTENCY, &payload));
        if let Err(e) = appended {
            eprintln!("{}: recording an idempotent reply: {e}", self.inner.pattern);
        }
    }

    /// The live keys, appended again at the head of a new segment.
    pub(crate) fn carry_keys_forward(&self, tx: &mut Tx<'_>) -> std::io::Result<()> {
        let now = now_ms();
        let live: Vec<KeyReply> = self
            .view()
            .keys
            .values()
            .filter(|e| e.key.expires_ms > now)
            .map(|e| KeyReply {
                key: e.key.clone(),
                reply: e.reply.clone(),
            })
            .collect();
        for record in live {
            let payload = serde_json::to_vec(&record).expect("a key reply serializes");
            tx.append(records::IDEMPOTENCY, &payload)?;
        }
        Ok(())
    }
}

impl StoredReply {
    /// A reply as it will be sent again (its extra headers, not the ones every reply gets).
    pub fn of(r: &Response) -> StoredReply {
        let body = match &r.body {
            proto::Body::Static(b) => String::from_utf8_lossy(b).into_owned(),
            proto::Body::Owned(b) => String::from_utf8_lossy(b).into_owned(),
            proto::Body::Stream | proto::Body::Sized(_) => String::new(),
        };
        StoredReply {
            status: r.status,
            content_type: r.content_type.to_string(),
            headers: r
                .headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            body,
        }
    }
}

/// The first reply again, marked as such.
fn replayed(stored: &StoredReply) -> Response {
    let mut r = Response::owned(
        stored.status,
        stored.content_type.clone(),
        stored.body.clone().into_bytes(),
    );
    for (name, value) in &stored.headers {
        // Only the headers this application sets reach a stored reply.
        let name: &'static str = match name.as_str() {
            "Location" => "Location",
            "Retry-After" => "Retry-After",
            "Cache-Control" => "Cache-Control",
            _ => continue,
        };
        r = r.with_header(name, value.clone());
    }
    r.with_header("Idempotent-Replayed", "true")
}

/// The `Idempotency-Key` header: an RFC 8941 string (`"..."`, with `\"` and `\\` escapes) or
/// a bare token; at most 255 characters. `Err` says what is wrong.
fn parse_key<R: Routable + ?Sized>(req: &R) -> Result<Option<String>, String> {
    let Some(raw) = req.header("idempotency-key") else {
        return Ok(None);
    };
    let raw = std::str::from_utf8(raw)
        .map_err(|_| "Idempotency-Key: not ASCII".to_string())?
        .trim();
    let key = if let Some(inner) = raw.strip_prefix('"') {
        let mut key = String::new();
        let mut chars = inner.chars();
        loop {
            match chars.next() {
                Some('"') if chars.as_str().is_empty() => break,
                Some('\\') => match chars.next() {
                    Some(c @ ('"' | '\\')) => key.push(c),
                    _ => return Err("Idempotency-Key: a bad escape in the string".into()),
                },
                Some(c) if (' '..='~').contains(&c) && c != '"' => key.push(c),
                _ => return Err("Idempotency-Key: expected a quoted string (RFC 8941)".into()),
            }
        }
        key
    } else {
        // An RFC 8941 token: a letter or `*`, then tchars, `:` or `/`.
        let ok_first = raw.starts_with(|c: char| c.is_ascii_alphabetic() || c == '*');
        let ok_rest = raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&b));
        if !(ok_first && ok_rest) {
            return Err("Idempotency-Key: expected a quoted string or a token (RFC 8941)".into());
        }
        raw.to_string()
    };
    if key.is_empty() || key.chars().count() > MAX_KEY {
        return Err(format!("Idempotency-Key: 1 to {MAX_KEY} characters"));
    }
    Ok(Some(key))
}

/// SHA-256 of the request's method, target and body: a retry must be the same request.
fn fingerprint<R: Routable + ?Sized>(req: &R) -> String {
    let mut h = Sha256::new();
    h.update(req.method().as_bytes());
    h.update(b" ");
    h.update(req.path().as_bytes());
    if let Some(query) = req.query() {
        h.update(b"?");
        h.update(query.as_bytes());
    }
    h.update(b"\n");
    h.update(req.body());
    let digest = h.finalize();
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Headers(Option<&'static [u8]>);
    impl Routable for Headers {
        fn method(&self) -> &str {
            "POST"
        }
        fn path(&self) -> &str {
            "/messages"
        }
        fn query(&self) -> Option<&str> {
            None
        }
        fn query_param(&self, _: &str) -> Option<&str> {
            None
        }
        fn header(&self, _: &str) -> Option<&[u8]> {
            self.0
        }
        fn body(&self) -> &[u8] {
            b""
        }
    }

    #[test]
    fn keys_are_rfc8941_strings_or_tokens() {
        let key = |raw: &'static [u8]| parse_key(&Headers(Some(raw)));
        assert_eq!(key(b"\"abc-123\""), Ok(Some("abc-123".into())));
        assert_eq!(
            key(b"\"a \\\"q\\\" \\\\ b\""),
            Ok(Some("a \"q\" \\ b".into()))
        );
        assert_eq!(key(b"tok:en/1"), Ok(Some("tok:en/1".into())));
        for bad in [
            &b"\"unterminated"[..],
            b"\"bad \\n escape\"",
            b"1starts-with-digit",
            b"\"\"",
            b"sp ace",
            b"\"x\" trailing",
        ] {
            assert!(key(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let long = format!("\"{}\"", "k".repeat(256));
        assert!(parse_key(&Headers(Some(Box::leak(long.into_boxed_str()).as_bytes()))).is_err());
        assert_eq!(parse_key(&Headers(None)), Ok(None));
    }
}
