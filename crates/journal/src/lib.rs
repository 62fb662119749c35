//! The durable append-only log every server process shares: jobs, messages, idempotency keys
//! and upload metadata are records in it, and readers are views over it. Opaque records here:
//! a seq, a kind byte and a payload. Kafka's log segments, Postgres's XLogFlush group commit,
//! SQLite WAL's checksummed frames.
//!
//! ```text
//!  dir/LOCK                       flock(LOCK_EX) + holder's pid: one server per directory
//!  dir/00000000000000000001.log   ┐ segments, named by their first seq; each a run of frames
//!  dir/00000000000000004097.log   │ len|crc32c|seq|kind|payload  (frame.rs)
//!  dir/00000000000000008193.log   ┘ the last is active: preallocated, zeros after its data
//!
//!  shared page (MAP_SHARED|MAP_ANONYMOUS, made by open before any fork; shared.rs)
//!  ┌──────────────────────────────────────────────────────────────────────────────┐
//!  │ append_lock, flush_lock      process-shared robust pthread mutexes          │
//!  │ head        last published seq       durable    last fdatasynced seq        │
//!  │ first_seq   oldest retained seq      end_base, end_len  where the next goes │
//!  │ generation  futex word, +1 per publish   watchers  threads waiting on it    │
//!  │ flushes     futex word, +1 per flush     poisoned, counters                 │
//!  └──────────────────────────────────────────────────────────────────────────────┘
//!  per process: its own descriptors and read index (seq → offset), caught up lazily
//! ```
//!
//! The rules:
//! - **Who writes.** Only the holder of `append_lock` (a [`Tx`]), in whichever process: it
//!   pwrites whole frames after `end_len` of the active segment, and on drop publishes
//!   `end_*`, then `head` (Release), bumps `generation` and wakes watchers. Nothing after
//!   `head` is visible to readers, so a caller holding a `Tx` can read the log, decide, and
//!   append (compare-and-append). Writes use pread/pwrite at explicit offsets only: a
//!   descriptor inherited across fork shares its file offset with the other processes.
//! - **Rolling.** A record that would take the active segment past `segment_bytes` goes to a
//!   new one (a bigger record gets a segment to itself). The old segment is cut to its data and
//!   fdatasynced *before* the new file exists, then the directory is fsynced; so syncing the
//!   active segment alone makes the whole log durable. After a roll, retention deletes the
//!   oldest segments while they exceed `retain_bytes` (never the active one); readers of
//!   deleted seqs get [`ReadError::Gone`].
//! - **Durable.** A record is durable once `durable() >= seq`: [`Journal::sync_to`] is a group
//!   commit, one fdatasync for everything published so far, shared by every waiting thread of
//!   every process. An fdatasync error poisons the journal for good (Postgres "fsyncgate": the
//!   kernel may have dropped the dirty pages, a retry would lie). Not syncing is the
//!   asynchronous mode: records reach the disk when the kernel writes them back.
//! - **Recovery.** `open` checks every frame of every segment. A torn end of the last segment
//!   (a crash mid-write; never acknowledged as durable) is cut and reported in one line; zeros
//!   after the last record are preallocated space; any other damage stops `open` with the file
//!   and offset (recover.rs). A holder that dies with
//!   `append_lock` (a SIGKILLed worker) is repaired by the next locker: it cuts whatever was
//!   written after the published head, then marks the mutex consistent.
//! - **Processes.** Open once, in the master, before forking and before starting threads (fork
//!   copies the calling thread only; a lock another thread held would stay held in the child).
//!   Children inherit the mapping, the directory lock and the descriptors; each process then
//!   reads through its own copy of the index, which catches up from the shared `head`.
//! - **Wake-ups.** One watcher thread per process loops on [`Journal::wait_for_change`], a
//!   FUTEX_WAIT on `generation` (shared, not private: it crosses processes). An append with
//!   no watcher makes no syscall. A watcher killed while waiting (or whose process exits)
//!   leaves `watchers` counted up: every publish then pays one needless wake syscall, nothing
//!   worse.

mod durable;
mod frame;
mod read;
mod recover;
mod segment;
mod shared;
mod tx;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use frame::MAX_PAYLOAD;
pub use read::{ReadError, Record};
pub use recover::{OpenError, Recovery, TornTail};
pub use tx::{Appended, Tx};

use read::Index;
use recover::io_err;
use shared::{SharedMap, futex_wait, futex_wake_all};
use tx::Writer;

/// Where the log lives and how big it may grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub dir: PathBuf,
    /// A segment rolls when the next record would take it past this (1 B ..= 4 GiB - 1).
    pub segment_bytes: u64,
    /// After a roll, the oldest segments are deleted while all of them together exceed this.
    pub retain_bytes: u64,
}

impl Config {
    /// 64 MiB segments, 1 GiB retained.
    pub fn new(dir: impl Into<PathBuf>) -> Config {
        Config {
            dir: dir.into(),
            segment_bytes: 64 << 20,
            retain_bytes: 1 << 30,
        }
    }
}

/// Counters shared by every process of the journal, and its positions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JournalStats {
    pub appends: u64,
    /// Frame bytes appended (headers included).
    pub bytes: u64,
    pub fdatasyncs: u64,
    /// Records made durable by `sync_to` and by rolls (each counted once).
    pub synced_records: u64,
    pub segments_rolled: u64,
    pub segments_deleted: u64,
    /// Appenders that died holding the lock, repaired after.
    pub lock_repairs: u64,
    /// FUTEX_WAKE syscalls made for watchers.
    pub futex_wakes: u64,
    /// Threads in `wait_for_change` right now.
    pub watchers: u64,
    pub head: u64,
    pub durable: u64,
    pub first_seq: u64,
}

/// The log. `Send + Sync`: share it through an `Arc` within a process; it survives `fork`.
pub struct Journal {
    dir: PathBuf,
    segment_bytes: u64,
    retain_bytes: u64,
    shared: SharedMap,
    /// For fsyncing the directory after creating or deleting a segment.
    dir_file: File,
    /// Holds the flock; closed (so released) when the last process holding a copy drops it.
    _lock_file: File,
    /// This process's descriptor for the active segment, used under `append_lock`.
    writer: Mutex<Writer>,
    index: Mutex<Index>,
    /// The `first_seq` below which this process's index holds no segment.
    forgot_before: AtomicU64,
    /// The flusher's descriptor for the active segment, and the `lock_repairs` count it was
    /// opened under (a repair may delete a segment whose name a later roll reuses).
    sync_file: Mutex<Option<(u64, u64, Arc<File>)>>,
}

impl Journal {
    /// Creates `dir` if missing, takes its lock, recovers the log and maps the shared state.
    /// Starts no thread: a prefork master calls it, then forks.
    pub fn open(config: Config) -> Result<(Journal, Recovery), OpenError> {
        if config.segment_bytes == 0 || config.segment_bytes > u64::from(u32::MAX) {
            return Err(OpenError::Config(format!(
                "segment_bytes must be 1..={}, not {}",
                u32::MAX,
                config.segment_bytes
            )));
        }
        let dir = config.dir;
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let lock_file = lock_dir(&dir)?;
        let dir_file = File::open(&dir).map_err(io_err(&dir))?;

        let (mut segments, torn) = recover::scan_all(&dir)?;
        if segments.is_empty() {
            let file = segment::create(&dir, 1, config.segment_bytes).map_err(io_err(&dir))?;
            dir_file.sync_all().map_err(io_err(&dir))?;
            segments.push(recover::Scanned {
                base: 1,
                file,
                offsets: Vec::new(),
                len: 0,
            });
        }
        let first_seq = segments[0].base;
        let active = segments.last().unwrap();
        let (end_base, end_len) = (active.base, active.len);
        let head = active.base + active.offsets.len() as u64 - 1;
        segment::preallocate(&active.file, config.segment_bytes)
            .map_err(io_err(&segment::path(&dir, end_base)))?;
        let recovery = Recovery {
            dir: dir.clone(),
            segments: segments.len(),
            records: head + 1 - first_seq,
            first_seq,
            last_seq: head,
            torn,
        };

        let shared = SharedMap::new().map_err(io_err(&dir))?;
        shared.head.store(head, Relaxed);
        shared.durable.store(head, Relaxed); // recovery synced every segment
        shared.first_seq.store(first_seq, Relaxed);
        shared.end_base.store(end_base, Relaxed);
        shared.end_len.store(end_len, Relaxed);

        let index = Index::from_recovery(segments);
        let writer = Writer::new(end_base, index.file_of(end_base));
        let journal = Journal {
            dir,
            segment_bytes: config.segment_bytes,
            retain_bytes: config.retain_bytes,
            shared,
            dir_file,
            _lock_file: lock_file,
            writer: Mutex::new(writer),
            index: Mutex::new(index),
            forgot_before: AtomicU64::new(first_seq),
            sync_file: Mutex::new(None),
        };
        Ok((journal, recovery))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The last appended seq, by any process (0: nothing ever appended).
    pub fn head(&self) -> u64 {
        self.shared.head.load(Acquire)
    }

    /// The oldest retained seq (`head() + 1` when none is retained).
    pub fn first_seq(&self) -> u64 {
        self.shared.first_seq.load(Acquire)
    }

    /// Every record up to this seq is on disk.
    pub fn durable(&self) -> u64 {
        self.shared.durable.load(Acquire)
    }

    /// The futex word that moves when the head does. Read it, read the log, then
    /// [`wait_for_change`](Self::wait_for_change) with it: no append can slip in between.
    pub fn generation(&self) -> u32 {
        self.shared.generation.load(SeqCst)
    }

    /// Blocks until the generation differs from `seen` or `timeout` passes; returns the
    /// generation then (equal to `seen` on timeout). Returns at once if it already differs.
    pub fn wait_for_change(&self, seen: u32, timeout: Duration) -> u32 {
        self.forget_deleted();
        let s = &self.shared;
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let now = s.generation.load(SeqCst);
            if now != seen {
                return now;
            }
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return now,
                },
                None => None,
            };
            // Counted before the kernel compares the word, so a publisher that bumps it after
            // our load above either sees us counted (and wakes us) or we see its bump.
            s.watchers.fetch_add(1, SeqCst);
            futex_wait(&s.generation, seen, left);
            s.watchers.fetch_sub(1, SeqCst);
        }
    }

    /// Bumps the generation and wakes every watcher of every process (e.g. at shutdown, so
    /// watcher threads look at their stop flag).
    pub fn wake_watchers(&self) {
        self.shared.generation.fetch_add(1, SeqCst);
        self.wake_if_watched();
    }

    fn wake_if_watched(&self) {
        let s = &self.shared;
        if s.watchers.load(SeqCst) > 0 {
            s.counters.futex_wakes.fetch_add(1, Relaxed);
            futex_wake_all(&s.generation);
        }
    }

    pub fn stats(&self) -> JournalStats {
        let s = &self.shared;
        let c = &s.counters;
        JournalStats {
            appends: c.appends.load(Relaxed),
            bytes: c.bytes.load(Relaxed),
            fdatasyncs: c.fdatasyncs.load(Relaxed),
            synced_records: c.synced_records.load(Relaxed),
            segments_rolled: c.segments_rolled.load(Relaxed),
            segments_deleted: c.segments_deleted.load(Relaxed),
            lock_repairs: c.lock_repairs.load(Relaxed),
            futex_wakes: c.futex_wakes.load(Relaxed),
            watchers: s.watchers.load(Relaxed),
            head: self.head(),
            durable: self.durable(),
            first_seq: self.first_seq(),
        }
    }

    fn check_poisoned(&self) -> io::Result<()> {
        if self.shared.poisoned.load(Acquire) != 0 {
            return Err(io::Error::other(
                "journal poisoned: an fdatasync failed, so written data may be lost; \
                 restart to recover from what is on disk",
            ));
        }
        Ok(())
    }

    fn poison(&self) {
        self.shared.poisoned.store(1, SeqCst);
    }

    /// fdatasync, counted; a failure poisons the journal (never retried: the kernel may have
    /// dropped the pages it could not write, so a second try could succeed and lie).
    fn sync_data(&self, file: &File) -> io::Result<()> {
        if let Err(e) = file.sync_data() {
            self.poison();
            return Err(e);
        }
        self.shared.counters.fdatasyncs.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Makes a segment's creation (or deletion) durable.
    fn sync_dir(&self) -> io::Result<()> {
        if let Err(e) = self.dir_file.sync_all() {
            self.poison();
            return Err(e);
        }
        Ok(())
    }
}

/// Takes `dir/LOCK` (flock, held by the open file description, so forked children hold it
/// too) and writes our pid into it for whoever finds it taken.
fn lock_dir(dir: &Path) -> Result<File, OpenError> {
    let path = dir.join("LOCK");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err(&path))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::WouldBlock {
            return Err(io_err(&path)(err));
        }
        let mut text = String::new();
        let pid = file
            .read_to_string(&mut text)
            .ok()
            .and_then(|_| text.trim().parse().ok());
        return Err(OpenError::Locked {
            dir: dir.to_path_buf(),
            pid,
        });
    }
    let pid = format!("{}\n", std::process::id());
    file.set_len(0)
        .and_then(|()| file.write_all_at(pid.as_bytes(), 0))
        .map_err(io_err(&path))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("journal-unit-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_journal_can_be_shared_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Journal>();
    }

    #[test]
    fn a_failed_fdatasync_poisons_for_good() {
        let dir = scratch("poison");
        let config = Config {
            dir: dir.clone(),
            segment_bytes: 4096,
            retain_bytes: 1 << 20,
        };
        let (j, _) = Journal::open(config).unwrap();
        let seq = j.append(0, b"before").unwrap();
        // The flusher's descriptor for the active segment is swapped for one that cannot be
        // synced (fsync on /dev/null fails with EINVAL): a stand-in for an I/O error.
        let base = j.shared.end_base.load(Relaxed);
        let null = Arc::new(File::open("/dev/null").unwrap());
        *j.sync_file.lock().unwrap() = Some((base, 0, null));
        let syncs = j.stats().fdatasyncs;
        assert!(j.sync_to(seq).is_err());
        assert!(
            j.durable() < seq,
            "durable published after a failed fdatasync"
        );
        // Never retried, and nothing more is appended.
        *j.sync_file.lock().unwrap() = None;
        assert!(j.sync_to(seq).is_err());
        assert!(j.append(0, b"after").is_err());
        assert!(j.begin().is_err());
        assert_eq!(j.stats().fdatasyncs, syncs);
        assert_eq!(j.head(), seq);
        // What was published stays readable.
        let mut got = Vec::new();
        j.read_after(0, 10, |r| got.push(r.payload.to_vec()))
            .unwrap();
        assert_eq!(got, [b"before".to_vec()]);
        drop(j);
        let _ = fs::remove_dir_all(&dir);
    }
}
