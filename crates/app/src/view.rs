//! This process's view of the journal: every job's latest state, and the recent events
//! (messages and job changes) already formatted for readers. It catches up by reading the
//! records appended since it last looked, by any process; whoever needs it fresh calls
//! [`View::catch_up`] (the watcher thread after every append, a request before it reads).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use journal::{Journal, ReadError, Record};

use crate::idempotency::KeyEntry;
use crate::jobs::{accepted_reply, split_payload};
use crate::messages::message_created;
use crate::records::{self, Job, KeyReply, Lease, Message, Status, StoredReply};

/// Recent events kept formatted, at most this many...
const RING_EVENTS: usize = 8192;
/// ...and this many bytes.
const RING_BYTES: usize = 16 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Message,
    Job,
}

impl EventKind {
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Message => "message",
            EventKind::Job => "job",
        }
    }
}

/// A record as readers see it: its JSON, and the same as one Server-Sent Event.
#[derive(Debug)]
pub struct Event {
    pub seq: u64,
    pub kind: EventKind,
    pub json: Box<str>,
    /// `id: SEQ\nevent: KIND\ndata: JSON\n\n`, formatted once for every subscriber.
    pub sse: Box<[u8]>,
}

impl Event {
    pub fn new(seq: u64, kind: EventKind, json: String) -> Event {
        let sse = format!("id: {seq}\nevent: {}\ndata: {json}\n\n", kind.name());
        Event {
            seq,
            kind,
            json: json.into_boxed_str(),
            sse: sse.into_bytes().into_boxed_slice(),
        }
    }
}

#[derive(Default)]
pub(crate) struct View {
    /// The last seq applied.
    pub applied: u64,
    pub jobs: HashMap<u64, JobEntry>,
    events: VecDeque<Arc<Event>>,
    events_bytes: usize,
    /// Every event with a seq above this is in `events`.
    ring_from: u64,
    /// Cancel flags of the jobs this process is running, set when a cancel is applied.
    cancels: HashMap<u64, Arc<AtomicBool>>,
    /// The journal's first retained seq when last looked at.
    first: u64,
    /// The ids of the queued jobs.
    queued: std::collections::BTreeSet<u64>,
    /// Idempotency keys and their first replies.
    pub keys: HashMap<String, KeyEntry>,
    /// Queued-job records applied so far (new work, perhaps handed to this process).
    pub queued_records: u64,
}

pub(crate) struct JobEntry {
    pub job: Job,
    /// The seq of the record that said this: a finished job is forgotten once retention has
    /// deleted it.
    pub seq: u64,
}

impl View {
    /// Applies every record appended since the last call. A record this code cannot read is
    /// skipped with a message: the log is the truth, and a newer server may have written it.
    pub fn catch_up(&mut self, journal: &Journal) {
        while journal.head() > self.applied {
            let mut batch = Vec::new();
            let read = journal.read_after(self.applied, 1024, |r: Record<'_>| {
                batch.push((r.seq, r.kind, r.payload.to_vec()));
            });
            match read {
                Ok(0) => break,
                Ok(_) => {}
                Err(ReadError::Gone { first }) => {
                    // Retention deleted records this process had not read yet (it slept
                    // through a roll): what was live was carried into the new segment.
                    self.applied = first - 1;
                    self.ring_from = self.ring_from.max(self.applied);
                    continue;
                }
                Err(ReadError::Io(e)) => {
                    eprintln!("app: reading the journal after seq {}: {e}", self.applied);
                    break;
                }
            }
            for (seq, kind, payload) in batch {
                self.apply(seq, kind, &payload);
                self.applied = seq;
            }
        }
        self.forget_deleted(journal.first_seq());
    }

    fn apply(&mut self, seq: u64, kind: u8, payload: &[u8]) {
        match kind {
            records::MESSAGE => match serde_json::from_slice::<Message>(payload) {
                Ok(m) => {
                    let json = serde_json::json!({"seq": seq, "ts_ms": m.ts_ms, "body": m.body});
                    self.push_event(Event::new(seq, EventKind::Message, json.to_string()));
                    if let Some(key) = m.key {
                        let reply = StoredReply::of(&message_created(seq));
                        self.keys
                            .entry(key.key.clone())
                            .or_insert(KeyEntry { key, reply, seq });
                    }
                }
                Err(e) => unreadable(seq, kind, &e),
            },
            records::JOB => match serde_json::from_slice::<Job>(split_payload(payload).0) {
                Ok(job) => {
                    if job.status == Status::Canceled
                        && let Some(flag) = self.cancels.get(&job.id)
                    {
                        flag.store(true, Ordering::Relaxed);
                    }
                    let json = job.public().to_string();
                    self.push_event(Event::new(seq, EventKind::Job, json));
                    if job.status == Status::Queued {
                        self.queued_records += 1;
                        self.queued.insert(job.id);
                    } else {
                        self.queued.remove(&job.id);
                    }
                    // The job's first record implies its key's first reply (a 202), final
                    // unless the request waits for the job.
                    if let Some(key) = &job.key
                        && !self.keys.contains_key(&key.key)
                    {
                        let reply = StoredReply::of(&accepted_reply(&job));
                        let entry = KeyEntry {
                            key: key.clone(),
                            reply,
                            seq,
                        };
                        self.keys.insert(key.key.clone(), entry);
                    }
                    self.jobs.insert(job.id, JobEntry { job, seq });
                }
                Err(e) => unreadable(seq, kind, &e),
            },
            records::LEASE => match serde_json::from_slice::<Lease>(payload) {
                Ok(lease) => {
                    for id in lease.jobs {
                        if let Some(e) = self.jobs.get_mut(&id)
                            && e.job.owner == lease.owner
                            && !e.job.status.is_finished()
                        {
                            e.job.lease_until_ms = lease.until_ms;
                        }
                    }
                }
                Err(e) => unreadable(seq, kind, &e),
            },
            records::IDEMPOTENCY => match serde_json::from_slice::<KeyReply>(payload) {
                Ok(r) => {
                    let entry = KeyEntry {
                        key: r.key,
                        reply: r.reply,
                        seq,
                    };
                    self.keys.insert(entry.key.key.clone(), entry);
                }
                Err(e) => unreadable(seq, kind, &e),
            },
            // Kinds of later features are theirs.
            _ => {}
        }
    }

    fn push_event(&mut self, event: Event) {
        self.events_bytes += event.sse.len() + event.json.len();
        self.events.push_back(Arc::new(event));
        while self.events.len() > RING_EVENTS || self.events_bytes > RING_BYTES {
            let Some(old) = self.events.pop_front() else {
                break;
            };
            self.events_bytes -= old.sse.len() + old.json.len();
            self.ring_from = old.seq;
        }
    }

    /// Finished jobs whose last record retention deleted are forgotten, as the log has.
    fn forget_deleted(&mut self, first_seq: u64) {
        if first_seq > self.first {
            self.first = first_seq;
            self.jobs
                .retain(|_, e| e.seq >= first_seq || !e.job.status.is_finished());
            // Expired keys go too (live ones were carried into the new segment).
            let now = crate::records::now_ms();
            self.keys.retain(|_, e| e.key.expires_ms > now);
        }
    }

    /// The events after `after`, oldest first, at most `max`, if they are all still in the
    /// ring; `None` if some are older than it (read them from the journal instead).
    pub fn events_after(
        &self,
        after: u64,
        max: usize,
        kind: Option<EventKind>,
    ) -> Option<Vec<Arc<Event>>> {
        if after < self.ring_from {
            return None;
        }
        let start = self.events.partition_point(|e| e.seq <= after);
        let picked = self
            .events
            .range(start..)
            .filter(|e| kind.is_none_or(|k| e.kind == k))
            .take(max)
            .cloned()
            .collect();
        Some(picked)
    }

    /// Calls `f` with each event after `after` (of `kind`, if given), in order, until it
    /// returns false; `None` if the ring no longer holds them. No copy of the list is made:
    /// a fan-out calls this once per subscriber.
    pub fn each_event_after(
        &self,
        after: u64,
        kind: Option<EventKind>,
        mut f: impl FnMut(&Event) -> bool,
    ) -> Option<()> {
        if after < self.ring_from {
            return None;
        }
        let start = self.events.partition_point(|e| e.seq <= after);
        for e in self.events.range(start..) {
            if kind.is_none_or(|k| e.kind == k) && !f(e) {
                break;
            }
        }
        Some(())
    }

    pub fn watch_cancel(&mut self, id: u64) -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(false));
        self.cancels.insert(id, flag.clone());
        flag
    }

    pub fn unwatch_cancel(&mut self, id: u64) {
        self.cancels.remove(&id);
    }

    /// The queued jobs, in every process.
    pub fn queued(&self) -> impl Iterator<Item = &Job> {
        self.queued
            .iter()
            .filter_map(|id| self.jobs.get(id).map(|e| &e.job))
    }

    /// Jobs queued and running, in every process.
    pub fn job_counts(&self) -> (usize, usize) {
        let mut counts = (0, 0);
        for e in self.jobs.values() {
            match e.job.status {
                Status::Queued => counts.0 += 1,
                Status::Running => counts.1 += 1,
                _ => {}
            }
        }
        counts
    }
}

/// Reads the events after `after` from the journal itself (the slow path, for a reader further
/// behind than the ring).
pub(crate) fn read_events(
    journal: &Journal,
    after: u64,
    max: usize,
    kind: Option<EventKind>,
) -> Result<Vec<Arc<Event>>, ReadError> {
    let mut view = View {
        applied: after,
        ring_from: after,
        ..View::default()
    };
    let mut out = Vec::new();
    let head = journal.head();
    while out.len() < max && view.applied < head {
        let mut batch = Vec::new();
        journal.read_after(view.applied, 256, |r: Record<'_>| {
            batch.push((r.seq, r.kind, r.payload.to_vec()));
        })?;
        if batch.is_empty() {
            break;
        }
        for (seq, k, payload) in batch {
            view.apply(seq, k, &payload);
            view.applied = seq;
        }
        out.extend(
            view.events
                .drain(..)
                .filter(|e| kind.is_none_or(|k| e.kind == k)),
        );
        view.events_bytes = 0;
    }
    out.truncate(max);
    Ok(out)
}

fn unreadable(seq: u64, kind: u8, e: &serde_json::Error) {
    eprintln!("app: skipping journal record {seq} (kind {kind}): {e}");
}
