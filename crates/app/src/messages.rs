//! Messages: the notes' chat. `POST /messages` appends one to the journal; `GET /messages`
//! reads them after a seq (Kafka-style offsets): at once (short polling) or, with `wait`, held
//! until one is appended or the wait passes (long polling).

use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::Response;

use crate::idempotency::Written;
use crate::problem::{json, problem};
use crate::records::{self, Message, now_ms};
use crate::reply::{Pending, Reply, Wait};
use crate::view::{Event, EventKind, read_events};
use crate::{App, Routable};

/// The largest message body.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Messages per reply, by default and at most.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;
/// The longest long poll: under the usual proxy timeout (60 s).
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(60);

impl App {
    #[inline(never)]
    pub(crate) fn post_message<R: Routable + ?Sized>(&self, req: &R) -> Reply {
        let body = req.body();
        if body.len() > MAX_MESSAGE {
            return problem(413, format!("a message is at most {MAX_MESSAGE} bytes")).into();
        }
        let Ok(text) = std::str::from_utf8(body) else {
            return problem(400, "a message is UTF-8 text").into();
        };
        self.keyed_write(req, |app, tx, key| {
            let record = Message {
                ts_ms: now_ms(),
                body: text.to_string(),
                key,
            };
            let payload = serde_json::to_vec(&record).expect("a message serializes");
            let seq = app.append(tx, records::MESSAGE, &payload)?;
            Ok(Written::Now {
                seq,
                reply: message_created(seq),
            })
        })
    }

    #[inline(never)]
    pub(crate) fn get_messages<R: Routable + ?Sized>(&self, req: &R) -> Reply {
        let after = match req.query_param("after").map(str::parse::<u64>) {
            None => 0,
            Some(Ok(n)) => n,
            Some(Err(_)) => return problem(400, "after: expected a seq (a whole number)").into(),
        };
        let limit = match req.query_param("limit").map(str::parse::<usize>) {
            None => DEFAULT_LIMIT,
            Some(Ok(n)) if (1..=MAX_LIMIT).contains(&n) => n,
            Some(_) => return problem(400, format!("limit: expected 1 to {MAX_LIMIT}")).into(),
        };
        let wait = match wait_param(req) {
            Ok(wait) => wait,
            Err(r) => return r.into(),
        };
        match self.poll_messages(after, limit, wait.is_none()) {
            Some(reply) => reply.into(),
            None => Reply::Later(Pending {
                app: self.clone(),
                wait: Wait::Messages { after, limit },
                until: wait.map(|w| Instant::now() + w),
            }),
        }
    }

    /// The reply to a poll of the messages after `after`: now if there are any, if `after` is
    /// beyond the head (a client ahead of a restarted server resets), or if `expired`.
    pub(crate) fn poll_messages(
        &self,
        after: u64,
        limit: usize,
        expired: bool,
    ) -> Option<Response> {
        let journal = self.journal();
        let view = self.view();
        let head = view.applied;
        let first = journal.first_seq();
        if after + 1 < first {
            return Some(gone(first));
        }
        if after > head {
            return Some(messages_reply(head, &[]));
        }
        let events = match view.events_after(after, limit, Some(EventKind::Message)) {
            Some(events) => events,
            None => {
                drop(view);
                match read_events(journal, after, limit, Some(EventKind::Message)) {
                    Ok(events) => events,
                    Err(journal::ReadError::Gone { first }) => return Some(gone(first)),
                    Err(e) => return Some(problem(500, format!("reading the journal: {e}"))),
                }
            }
        };
        (!events.is_empty() || expired).then(|| messages_reply(head, &events))
    }
}

/// 201, `{"seq": N}`: what `POST /messages` answers (and a retry with its key, again).
pub(crate) fn message_created(seq: u64) -> Response {
    json(201, &serde_json::json!({ "seq": seq }))
}

/// `{"head": H, "messages": [...]}`, from events already in JSON.
fn messages_reply(head: u64, events: &[Arc<Event>]) -> Response {
    let mut body = format!("{{\"head\":{head},\"messages\":[");
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&e.json);
    }
    body.push_str("]}\n");
    Response::owned(200, "application/json", body.into_bytes())
        .with_header("Cache-Control", "no-store")
}

/// 410: the records asked for were deleted by retention.
pub(crate) fn gone(first: u64) -> Response {
    problem(
        410,
        format!(
            "those records were deleted by retention; the oldest kept is seq {first} \
             (ask for after={})",
            first - 1
        ),
    )
}

/// The `wait` query parameter (`30s`, `500ms`, `2`), at most [`MAX_WAIT`].
pub(crate) fn wait_param<R: Routable + ?Sized>(req: &R) -> Result<Option<Duration>, Response> {
    match req.query_param("wait") {
        None => Ok(None),
        Some(v) => match flags::duration_or_zero(v) {
            Ok(d) => Ok(Some(d.min(MAX_WAIT))),
            Err(e) => Err(problem(400, format!("wait: {e}"))),
        },
    }
}
