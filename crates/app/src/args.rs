//! The application's flags, flattened into every server's (`runtime::ServerArgs`).

use std::path::PathBuf;
use std::time::Duration;

use flags::{duration, positive, size};

#[derive(clap::Args, Debug, Clone)]
pub struct AppArgs {
    /// Where the journal lives (jobs, messages) [default: ./data/PATTERN]. One server per
    /// directory at a time; a prefork server's workers share their master's.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// `sync`: acknowledge a write once fdatasync covers it (one fdatasync for every write
    /// waiting: group commit). `async`: once it is written; flushed every --commit-delay.
    #[arg(long, value_enum, default_value_t = Commit::Sync)]
    pub commit: Commit,

    /// With --commit async: how often the journal is flushed (Postgres's wal_writer_delay).
    #[arg(long, default_value = "200ms", value_parser = duration)]
    pub commit_delay: Duration,

    /// The journal rolls to a new segment file past this many MiB.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4095))]
    pub segment_mb: u64,

    /// Old segments are deleted while the journal holds more than this many MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    pub retain_mb: u64,

    /// Threads running jobs, in each process.
    #[arg(long, default_value_t = 2, value_parser = positive)]
    pub job_workers: usize,

    /// Jobs waiting for a job worker in a process at most; past it, POST /jobs gets 503.
    #[arg(long, default_value_t = 1000, value_parser = positive)]
    pub max_queued_jobs: usize,

    /// A Server-Sent Events stream with nothing to say for this long sends a comment, so that
    /// proxies keep it open.
    #[arg(long, default_value = "15s", value_parser = duration)]
    pub sse_keep_alive: Duration,

    /// POST /jobs and POST /messages without an Idempotency-Key get 400.
    #[arg(long)]
    pub require_idempotency_key: bool,

    /// An Idempotency-Key is remembered this long after its first use.
    #[arg(long, default_value = "24h", value_parser = duration)]
    pub idempotency_ttl: Duration,

    /// A job whose process stops renewing its lease this long is taken over by another
    /// process (or by the restarted server): jobs run at least once.
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub job_lease: Duration,

    /// Largest upload (tus `Tus-Max-Size`, and any streamed request body); larger gets 413.
    #[arg(long, default_value = "8G", value_parser = upload_size)]
    pub max_upload: u64,

    /// An unfinished upload untouched this long expires (tus `Upload-Expires`): 410, and its
    /// bytes are deleted.
    #[arg(long, default_value = "24h", value_parser = duration)]
    pub upload_expiry: Duration,
}

fn upload_size(s: &str) -> Result<u64, String> {
    match size(s)? {
        0 => Err("must be more than zero".into()),
        n => Ok(n as u64),
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Commit {
    Sync,
    Async,
}

impl AppArgs {
    /// `--data-dir`, or `./data/PATTERN`.
    pub fn data_dir(&self, pattern: &str) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("data").join(pattern))
    }
}
