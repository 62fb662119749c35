//! The three ways the application answers: now; later (held until something moves or a timer
//! fires); or as a stream. Each driver implements "later" and "streamed" once for every route:
//! it keeps the [`Pending`] or [`Stream`], subscribes to the app's [`Hub`](crate::Hub), and
//! polls whenever the hub calls or the deadline passes.

use std::time::Instant;

use proto::Response;

use crate::App;

pub enum Reply {
    /// The reply, ready now.
    Now(Response),
    /// Held: poll it when the hub calls and at its deadline, until it gives the reply.
    Later(Pending),
    /// A streamed reply: send the head now, then whatever each poll produces.
    Stream(Response, Stream),
    /// The reply comes once the request's body, fed to the sink as it arrives, has ended (an
    /// upload: see [`BodySink::feed`](crate::BodySink::feed)).
    Body(Box<crate::BodySink>),
}

impl From<Response> for Reply {
    fn from(r: Response) -> Reply {
        Reply::Now(r)
    }
}

/// A reply that waits for something: a write to become durable, a message after some seq, a
/// job to finish. It always answers by its deadline, and at once when the server stops.
pub struct Pending {
    pub(crate) app: App,
    pub(crate) wait: Wait,
    pub(crate) until: Option<Instant>,
}

pub(crate) enum Wait {
    /// A reply about a write, sent once the write is durable.
    Durable { seq: u64, reply: Option<Response> },
    /// A long poll of /messages.
    Messages { after: u64, limit: usize },
    /// A job's final state: a long poll of /jobs/ID, or `Prefer: wait` on POST /jobs. Until
    /// the job finishes, nothing is sent before `durable` is on disk. With the request's
    /// Idempotency-Key, whose final reply is recorded when it is sent.
    Job {
        id: u64,
        durable: u64,
        accepted: bool,
        key: Option<crate::records::Key>,
    },
}

impl Drop for Pending {
    /// A `Prefer: wait` whose client went away before the reply: its key still gets a final
    /// reply (the 202 its job's creation implies), or retries would get 409 for as long as
    /// this process lives.
    fn drop(&mut self) {
        if let Wait::Job { id, key, .. } = &mut self.wait
            && let Some(key) = key.take()
            && let Some(reply) = self.app.accepted_now(*id)
        {
            self.app.record_final(key, &reply);
        }
    }
}

impl Pending {
    /// The reply, if it is ready at `now` (or the deadline has passed, or the server stops).
    pub fn poll(&mut self, now: Instant) -> Option<Response> {
        let expired = self.until.is_some_and(|until| now >= until) || self.app.is_stopping();
        self.app.clone().poll_wait(&mut self.wait, expired)
    }

    /// When to poll at the latest, whatever the hub says.
    pub fn deadline(&self) -> Option<Instant> {
        self.until
    }
}

/// A reply whose body is produced over time.
pub struct Stream {
    pub(crate) app: App,
    pub(crate) kind: StreamKind,
    pub(crate) next: Option<Instant>,
}

pub(crate) enum StreamKind {
    /// `GET /split`: the head in one write, the body in the next.
    Split { body: Option<&'static [u8]> },
    /// `GET /events`: the journal, as Server-Sent Events.
    Events(crate::events::Events),
    /// `GET /stats/stream`: `/stats` as an event every `interval`.
    Stats {
        interval: std::time::Duration,
        /// `retry:` went first.
        started: bool,
    },
    /// `GET /files/ID`: a finished upload, read as the peer takes it.
    File(crate::upload::FileStream),
}

impl Stream {
    /// Appends to `out` what is due at `now`, about `budget` bytes at most (at least one whole
    /// event; see `proto::Conn::stream_budget`). Returns whether the stream goes on; when it
    /// does not, the driver ends the reply (and a stream always ends when the server stops).
    /// If it stopped at the budget, its deadline is `now`: poll again once the output drains.
    pub fn poll(&mut self, now: Instant, out: &mut Vec<u8>, budget: usize) -> bool {
        match &mut self.kind {
            StreamKind::Split { body } => {
                if self.next.is_some_and(|due| now < due) && !self.app.is_stopping() {
                    return true;
                }
                out.extend_from_slice(body.take().unwrap_or_default());
                false
            }
            StreamKind::Events(ev) => {
                let app = self.app.clone();
                app.poll_events(ev, &mut self.next, now, out, budget)
            }
            StreamKind::Stats { interval, started } => {
                if self.app.is_stopping() {
                    return false;
                }
                if !*started {
                    // A page reconnects a second after a restart, not the browser's default 3.
                    out.extend_from_slice(b"retry: 1000\n\n");
                    *started = true;
                }
                if self.next.is_none_or(|due| now >= due) {
                    out.extend_from_slice(b"event: stats\ndata: ");
                    out.extend_from_slice(self.app.stats_json().trim_end().as_bytes());
                    out.extend_from_slice(b"\n\n");
                    self.next = Some(now + *interval);
                }
                true
            }
            StreamKind::File(file) => {
                let more = file.poll(out, budget, self.app.is_stopping());
                // More to read: again as soon as the peer takes this.
                self.next = more.then_some(now);
                more
            }
        }
    }

    /// When to poll at the latest, whatever the hub says.
    pub fn deadline(&self) -> Option<Instant> {
        self.next
    }
}
