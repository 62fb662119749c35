//! What the application writes in the journal: one kind byte and a JSON payload per record
//! (readable with `strings` on a segment file), job inputs after it as they came.

use serde::{Deserialize, Serialize};

pub const MESSAGE: u8 = 1;
/// A job's whole state after a change: the latest one wins, so any one record says it all. The
/// first record of a job (and each copy carried into a new segment) is followed by a newline
/// and the job's input, raw; later ones point at it (`input_seq`).
pub const JOB: u8 = 2;
/// A process renews the leases of every job it holds, in one record.
pub const LEASE: u8 = 4;
/// An idempotency key's reply: the final one of a `Prefer: wait` job, or any live key carried
/// into a new segment.
pub const IDEMPOTENCY: u8 = 5;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub ts_ms: u64,
    pub body: String,
    /// The Idempotency-Key it was posted with: in the same record as what it protects, so a
    /// crash can never leave one without the other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Key>,
}

/// An Idempotency-Key and what it was first used for.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub key: String,
    /// SHA-256 of the request's method, target and body, hex.
    pub fingerprint: String,
    pub expires_ms: u64,
    /// The process that answers the first request.
    pub by: Owner,
    /// The first request waits (`Prefer: wait`): its reply is final only when recorded.
    #[serde(default)]
    pub waits: bool,
}

/// A reply as sent, to be sent again to a retry with the same key.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct StoredReply {
    pub status: u16,
    pub content_type: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// An IDEMPOTENCY record.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct KeyReply {
    pub key: Key,
    pub reply: StoredReply,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl Status {
    pub fn is_finished(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Canceled)
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Work {
    /// Burn this many microseconds of CPU.
    WorkUs(u64),
    /// Sleep this many milliseconds.
    SleepMs(u64),
}

/// Which process holds a job: a pid, within one run of the server (a restarted server has a
/// new `boot`, so every job of an older boot is an orphan at once).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub boot: u64,
    pub pid: u32,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Job {
    pub id: u64,
    pub status: Status,
    pub work: Work,
    /// Fail at the end instead of succeeding (to see what a failed job looks like).
    #[serde(default)]
    pub fail: bool,
    /// The seq of the JOB_INPUT record, if the job has an input.
    pub input_seq: Option<u64>,
    pub input_bytes: u64,
    pub created_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    pub result: Option<serde_json::Value>,
    pub owner: Owner,
    pub lease_until_ms: u64,
    /// Runs begun so far: more than one after a takeover.
    pub attempts: u32,
    /// The Idempotency-Key it was created with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Key>,
}

impl Job {
    /// What clients see: the job, and which process holds it (the pattern's lesson: a prefork
    /// worker that dies hands its jobs to another), not the lease bookkeeping.
    pub fn public(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "id": self.id.to_string(),
            "status": self.status,
            "created_ms": self.created_ms,
            "pid": self.owner.pid,
            "attempts": self.attempts,
        });
        let o = v.as_object_mut().expect("an object");
        if let Some(t) = self.started_ms {
            o.insert("started_ms".into(), t.into());
        }
        if let Some(t) = self.finished_ms {
            o.insert("finished_ms".into(), t.into());
        }
        if let Some(r) = &self.result {
            o.insert("result".into(), r.clone());
        }
        v
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub owner: Owner,
    pub until_ms: u64,
    pub jobs: Vec<u64>,
}

/// Milliseconds since the Unix epoch: record times must mean the same in every process and
/// after a restart.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
