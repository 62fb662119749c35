//! Server push: `GET /events` is one long response that never ends (WHATWG HTML, Server-sent
//! events): every journal record from then on becomes an event, `id: SEQ`, `event: message` or
//! `event: job`, `data: JSON`. A client that reconnects sends `Last-Event-ID` (or `?after=`) and
//! gets exactly what it missed, then the live ones. The stream is one [`Stream`] that each
//! driver polls when the hub calls: the event bytes are formatted once per process, in the
//! view's ring, and copied to every subscriber.

use std::time::Instant;

use proto::Response;

use crate::messages::gone;
use crate::problem::problem;
use crate::reply::{Reply, Stream, StreamKind};
use crate::view::{EventKind, read_events};
use crate::{App, Routable};

/// Events copied into a stream per poll at most (the rest on the next poll).
const BATCH: usize = 1024;

/// Where one subscriber stands.
pub(crate) struct Events {
    /// Every record up to this seq has been sent (or filtered out).
    cursor: u64,
    kind: Option<EventKind>,
    /// `retry:` goes first.
    started: bool,
    last_sent: Instant,
}

impl App {
    #[inline(never)]
    pub(crate) fn get_events<R: Routable + ?Sized>(&self, req: &R) -> Reply {
        let kind = match req.query_param("type") {
            None => None,
            Some("message") => Some(EventKind::Message),
            Some("job") => Some(EventKind::Job),
            Some(_) => return problem(400, "type: expected message or job").into(),
        };
        let resume = req
            .header("last-event-id")
            .map(|v| String::from_utf8_lossy(v).trim().to_string())
            .or_else(|| req.query_param("after").map(str::to_string));
        let head = self.view().applied;
        let cursor = match resume.as_deref().map(str::parse::<u64>) {
            None => head,
            // An id beyond the head (a journal that lost its tail): go live from here.
            Some(Ok(after)) => after.min(head),
            Some(Err(_)) => {
                return problem(400, "Last-Event-ID (or after): expected a seq").into();
            }
        };
        let first = self.journal().first_seq();
        if cursor + 1 < first {
            // The browser stops reconnecting on a non-200.
            return gone(first).into();
        }
        let head = Response::stream(200, "text/event-stream")
            .with_header("Cache-Control", "no-store")
            // nginx and others buffer responses unless told not to.
            .with_header("X-Accel-Buffering", "no");
        let now = Instant::now();
        let stream = Stream {
            app: self.clone(),
            kind: StreamKind::Events(Events {
                cursor,
                kind,
                started: false,
                last_sent: now,
            }),
            next: Some(now),
        };
        Reply::Stream(head, stream)
    }

    /// Appends what is due to a subscriber; false once the stream must end (the server stops,
    /// or the subscriber fell behind what retention kept: it reconnects and gets 410).
    pub(crate) fn poll_events(
        &self,
        ev: &mut Events,
        next: &mut Option<Instant>,
        now: Instant,
        out: &mut Vec<u8>,
        budget: usize,
    ) -> bool {
        if self.is_stopping() {
            return false;
        }
        if !ev.started {
            out.extend_from_slice(b"retry: 2000\n\n");
            ev.started = true;
        }
        // The hub calls for every append and every commit: most calls have nothing new for
        // a subscriber already at the head, and need not take the view's lock.
        let mut more = false;
        if self.journal().head() > ev.cursor {
            let (after, kind) = (ev.cursor, ev.kind);
            let mut cursor = after;
            let mut sent = 0;
            let mut take = |e: &crate::view::Event| {
                if sent == BATCH || (sent > 0 && out.len() + e.sse.len() > budget) {
                    more = true;
                    return false;
                }
                out.extend_from_slice(&e.sse);
                cursor = e.seq;
                sent += 1;
                true
            };
            let view = self.view();
            let applied = view.applied;
            let mut full = false;
            if view.each_event_after(after, kind, &mut take).is_none() {
                // Past the ring (a subscriber far behind): from the journal's files.
                drop(view);
                let events = match read_events(self.journal(), after, BATCH, kind) {
                    Ok(events) => events,
                    Err(_) => return false,
                };
                full = events.len() == BATCH;
                for e in &events {
                    if !take(e) {
                        break;
                    }
                }
            }
            more |= full;
            // All matching events up to `applied` are in hand unless the batch was full, or
            // the budget ran out first.
            ev.cursor = if more { cursor } else { applied.max(cursor) };
        }
        let keep_alive = self.inner.sse_keep_alive;
        if !out.is_empty() {
            ev.last_sent = now;
        } else if now >= ev.last_sent + keep_alive {
            out.extend_from_slice(b": keep-alive\n\n");
            ev.last_sent = now;
        }
        *next = Some(match more {
            // More to send: poll again as soon as the output drains.
            true => now,
            false => ev.last_sent + keep_alive,
        });
        true
    }
}
