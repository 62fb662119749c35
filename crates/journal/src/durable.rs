//! Group commit, as Postgres's XLogFlush: whoever gets the flush lock fdatasyncs once for
//! everything published so far, not just for its own record; the others wait for that flush
//! to finish (without queueing on the lock), find their record covered, and return without a
//! syscall of their own. Under load each fdatasync covers the records of every thread that
//! arrived while the previous one ran.
//!
//! One fdatasync of the active segment is enough: a roll fdatasyncs the old segment before the
//! next one exists, so every segment before the active one is already durable.

use std::fs::File;
use std::io;
use std::sync::atomic::Ordering::{Acquire, SeqCst};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use crate::Journal;
use crate::segment;
use crate::shared::{futex_wait, futex_wake_all};

/// A follower re-checks at least this often: a flusher SIGKILLed mid-flush never signals, and
/// its robust lock is only freed for whoever tries it again.
const FOLLOWER_RECHECK: Duration = Duration::from_millis(50);

impl Journal {
    /// Blocks until every record up to `seq` is on disk. `seq` must be published (at most
    /// `head()`: a record appended in a `Tx` is published when the `Tx` is dropped).
    /// An fdatasync error is returned once and poisons the journal: every later `sync_to`,
    /// `begin` and `append` fails.
    pub fn sync_to(&self, seq: u64) -> io::Result<()> {
        let s = &self.shared;
        if seq > self.head() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("sync_to({seq}): not appended yet (head {})", self.head()),
            ));
        }
        loop {
            self.check_poisoned()?;
            if self.durable() >= seq {
                return Ok(());
            }
            // Read before trying the lock: a flush that ends after this moves it, so the wait
            // below cannot miss it.
            let flushes = s.flushes.load(SeqCst);
            match s.flush_lock.try_lock()? {
                Some(mut lock) => {
                    // A flusher that died mid-fdatasync changed nothing we rely on: its flush
                    // is simply done again.
                    lock.mark_consistent();
                    let result = if self.durable() >= seq {
                        Ok(())
                    } else {
                        self.flush()
                    };
                    drop(lock);
                    s.flushes.fetch_add(1, SeqCst);
                    if s.flush_waiters.load(SeqCst) > 0 {
                        futex_wake_all(&s.flushes);
                    }
                    result?;
                }
                None => {
                    // A flush is running: wait for it to end (it may cover us), then look again.
                    s.flush_waiters.fetch_add(1, SeqCst);
                    futex_wait(&s.flushes, flushes, Some(FOLLOWER_RECHECK));
                    s.flush_waiters.fetch_sub(1, SeqCst);
                }
            }
        }
    }

    /// One fdatasync for everything published now. Called with the flush lock held.
    fn flush(&self) -> io::Result<()> {
        let s = &self.shared;
        loop {
            // Head first: the publish that stored it had stored `end_base` before, so the
            // segment read next holds record `target` or comes after it (then a roll already
            // synced `target`).
            let target = s.head.load(Acquire);
            let base = s.end_base.load(Acquire);
            let file = match self.sync_file(base) {
                Ok(file) => file,
                // A repair removed a segment the dead appender had half published: look again.
                Err(e)
                    if e.kind() == io::ErrorKind::NotFound && s.end_base.load(Acquire) != base =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            };
            self.sync_data(&file)?;
            self.advance_durable(target);
            return Ok(());
        }
    }

    /// This process's descriptor for segment `base`, opened once per segment.
    fn sync_file(&self, base: u64) -> io::Result<Arc<File>> {
        let repairs = self.shared.counters.lock_repairs.load(Acquire);
        let mut cached = self
            .sync_file
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((b, r, file)) = &*cached
            && *b == base
            && *r == repairs
        {
            return Ok(file.clone());
        }
        let file = Arc::new(segment::open(&self.dir, base)?);
        *cached = Some((base, repairs, file.clone()));
        Ok(file)
    }
}
