//! The publisher: POSTs the run's messages at the rate on one pipelined connection and records
//! when each was sent, in the table every subscriber thread reads.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Poll, Token};

use super::{MESSAGES_PATH, PUBLISHER_RETRY, READ_BUF, Shared};
use crate::delivery::Published;
use crate::engine::{connect_registered, connected, write_some};
use crate::http::ResponseReader;
use crate::stats::ErrorKind;

const PUBLISHER: Token = Token(0);

/// POSTs the messages at the rate, pipelined on one connection so that they reach the server
/// in order; reconnects (after a short pause) if the connection fails, and what was in flight
/// on it counts as unanswered.
pub(super) struct Publisher<'a> {
    shared: &'a Shared,
    poll: Poll,
    stream: Option<TcpStream>,
    connected: bool,
    reconnect_at: Option<Instant>,
    reader: ResponseReader,
    leftover: Vec<u8>,
    out: Vec<u8>,
    /// Message numbers written or queued, and when, oldest first.
    inflight: VecDeque<(usize, Instant)>,
    rbuf: Box<[u8]>,
    pub(super) result: Published,
}

impl<'a> Publisher<'a> {
    pub(super) fn new(shared: &'a Shared) -> Result<Publisher<'a>, String> {
        Ok(Publisher {
            shared,
            poll: Poll::new().map_err(|e| format!("epoll: {e}"))?,
            stream: None,
            connected: false,
            reconnect_at: Some(Instant::now()),
            reader: ResponseReader::new(),
            leftover: Vec::new(),
            out: Vec::new(),
            inflight: VecDeque::new(),
            rbuf: vec![0; READ_BUF].into_boxed_slice(),
            result: Published::new(shared.messages),
        })
    }

    /// Publishes every message, then waits for the replies; returns the deadline for the
    /// deliveries: --timeout after the last POST.
    pub(super) fn run(&mut self, mut on_tick: impl FnMut(u64)) -> Instant {
        let cfg = &self.shared.cfg;
        let start = Instant::now();
        let mut events = Events::with_capacity(64);
        let mut k = 0;
        let mut last_send = start;
        let mut next_tick = start;
        let due = |k: usize| start + Duration::from_secs_f64((k + 1) as f64 / cfg.rate);
        loop {
            let now = Instant::now();
            if let Some(at) = self.reconnect_at
                && now >= at
            {
                self.connect(now);
            }
            while k < self.shared.messages && now >= due(k) {
                self.publish(k, now);
                k += 1;
                last_send = now;
            }
            if let Some(&(_, at)) = self.inflight.front()
                && self.stream.is_some()
                && now.saturating_duration_since(at) > cfg.timeout
            {
                let kind = if self.connected {
                    ErrorKind::Timeout
                } else {
                    ErrorKind::Connect
                };
                self.reset(kind, now);
            }
            let all_sent = k == self.shared.messages;
            if all_sent && (self.inflight.is_empty() || now >= last_send + cfg.timeout) {
                break;
            }
            if now >= next_tick {
                next_tick = now + Duration::from_millis(250);
                on_tick(self.result.sent);
            }
            let mut wake = next_tick;
            if !all_sent {
                wake = wake.min(due(k));
            } else {
                wake = wake.min(last_send + cfg.timeout);
            }
            if let Some(at) = self.reconnect_at {
                wake = wake.min(at);
            }
            if let Err(e) = self
                .poll
                .poll(&mut events, Some(wake.saturating_duration_since(now)))
                && e.kind() != io::ErrorKind::Interrupted
            {
                // Nothing can be awaited: count the rest as unanswered.
                eprintln!("publisher: epoll_wait: {e}");
                break;
            }
            let ready = events.iter().next().is_some();
            if ready {
                self.on_event(Instant::now());
            }
        }
        self.result.unanswered += self.inflight.len() as u64;
        last_send + cfg.timeout
    }

    fn connect(&mut self, now: Instant) {
        self.reconnect_at = None;
        match connect_registered(&self.poll, self.shared.cfg.target.addr, PUBLISHER, None) {
            Ok(s) => {
                self.stream = Some(s);
                self.connected = false;
            }
            Err(_) => self.reset(ErrorKind::Connect, now),
        }
    }

    /// Queues message `k`'s POST and writes what the socket takes.
    fn publish(&mut self, k: usize, now: Instant) {
        let body = format!("{}{k}", self.shared.prefix);
        let req = format!(
            "POST {MESSAGES_PATH} HTTP/1.1\r\nHost: {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            self.shared.cfg.target.host,
            body.len()
        );
        self.out.extend_from_slice(req.as_bytes());
        // Before the write: no subscriber can see the message before its send time is stored.
        self.shared.sent[k].store(self.shared.ns(now).max(1), Ordering::Release);
        self.inflight.push_back((k, now));
        self.result.sent += 1;
        self.flush(now);
    }

    fn on_event(&mut self, now: Instant) {
        if self.stream.is_none() {
            return;
        }
        if !self.connected {
            match connected(self.stream.as_ref().expect("a stream")) {
                Ok(true) => self.connected = true,
                Ok(false) => return,
                Err(_) => return self.reset(ErrorKind::Connect, now),
            }
        }
        self.read(now);
        self.flush(now);
    }

    fn flush(&mut self, now: Instant) {
        if !self.connected {
            return;
        }
        let Some(s) = self.stream.as_mut() else {
            return;
        };
        match write_some(s, &self.out) {
            Ok(n) => drop(self.out.drain(..n)),
            Err(_) => self.reset(ErrorKind::Write, now),
        }
    }

    fn read(&mut self, now: Instant) {
        loop {
            let Some(s) = self.stream.as_mut() else {
                return;
            };
            match s.read(&mut self.rbuf) {
                Ok(0) => {
                    let kind = if self.inflight.is_empty() {
                        None
                    } else {
                        Some(ErrorKind::Closed)
                    };
                    return self.reset_opt(kind, now);
                }
                Ok(n) => {
                    self.leftover.extend_from_slice(&self.rbuf[..n]);
                    if !self.replies(Instant::now()) {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.reset(ErrorKind::Read, now),
            }
        }
    }

    /// Frames the replies in `leftover`; false if the connection was reset meanwhile.
    fn replies(&mut self, now: Instant) -> bool {
        let mut pos = 0;
        while pos < self.leftover.len() {
            match self.reader.advance(&self.leftover[pos..], false) {
                Err(_) => {
                    self.reset(ErrorKind::Parse, now);
                    return false;
                }
                Ok((n, None)) => {
                    pos += n;
                    break;
                }
                Ok((n, Some(done))) => {
                    pos += n;
                    let Some((k, at)) = self.inflight.pop_front() else {
                        self.reset(ErrorKind::Parse, now);
                        return false;
                    };
                    let r = &mut self.result;
                    r.latency.saturating_record(
                        u64::try_from((now - at).as_nanos()).unwrap_or(u64::MAX),
                    );
                    *r.status.entry(done.status).or_default() += 1;
                    if done.status == 201 {
                        r.confirmed[k] = true;
                        self.shared.confirmed[k / 64].fetch_or(1 << (k % 64), Ordering::Relaxed);
                    }
                    if done.close {
                        let kind = (!self.inflight.is_empty()).then_some(ErrorKind::Closed);
                        self.reset_opt(kind, now);
                        return false;
                    }
                }
            }
        }
        self.leftover.drain(..pos);
        true
    }

    fn reset(&mut self, kind: ErrorKind, now: Instant) {
        self.reset_opt(Some(kind), now);
    }

    /// Drops the connection (an error of `kind`, if any): what was in flight on it is
    /// unanswered. Reconnects after a pause.
    fn reset_opt(&mut self, kind: Option<ErrorKind>, now: Instant) {
        if let Some(kind) = kind {
            self.result.errors[kind as usize] += 1;
        }
        self.result.unanswered += self.inflight.len() as u64;
        self.inflight.clear();
        self.out.clear();
        self.leftover.clear();
        self.reader = ResponseReader::new();
        self.stream = None;
        self.connected = false;
        self.reconnect_at = Some(now + PUBLISHER_RETRY);
    }
}
