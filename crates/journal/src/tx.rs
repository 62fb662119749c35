//! Appending: a [`Tx`] holds the process-shared append lock, pwrites frames at the end of the
//! active segment, rolls segments, and publishes on drop. Also the two things done under the
//! same lock: retention after a roll, and the repair after a holder died.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release, SeqCst};
use std::sync::{Arc, MutexGuard, PoisonError};

use crate::frame::{self, MAX_PAYLOAD};
use crate::segment;
use crate::shared::Guard;
use crate::{Journal, JournalStats};

/// This process's side of appending: its descriptor for the active segment and a frame buffer.
pub(crate) struct Writer {
    base: u64,
    file: Option<Arc<File>>,
    frame: Vec<u8>,
}

impl Writer {
    pub fn new(base: u64, file: Option<Arc<File>>) -> Writer {
        Writer {
            base,
            file,
            frame: Vec::new(),
        }
    }
}

/// What [`Tx::append`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub seq: u64,
    /// The record opened a new segment. Retention may delete older segments when this `Tx`
    /// ends: a caller that keeps live state as records re-appends it now, in the new segment.
    pub rolled: bool,
}

/// Exclusive appending, across the threads of this process and the processes forked from the
/// opener. Records appended become visible (and `head` moves) when the `Tx` is dropped. Not
/// `Send`: the thread that began it ends it.
pub struct Tx<'j> {
    journal: &'j Journal,
    /// `Some` until drop; the writer is released before the lock.
    held: Option<Held<'j>>,
    /// The last seq written (published or not).
    last: u64,
    /// Bytes of data in the active segment, including this Tx's frames.
    len: u64,
    appended: u64,
    bytes: u64,
    rolled: bool,
}

struct Held<'j> {
    writer: MutexGuard<'j, Writer>,
    _lock: Guard<'j>,
}

impl Journal {
    /// Takes the append lock (blocking while another thread or process holds it). While the
    /// `Tx` lives nobody else appends, so what [`read_after`](Self::read_after) shows up to
    /// [`Tx::last_seq`] is the whole log: check a condition, then append.
    /// Calling it again on a thread that already holds a `Tx` is an error (EDEADLK).
    pub fn begin(&self) -> io::Result<Tx<'_>> {
        self.forget_deleted();
        let s = &self.shared;
        let mut lock = s.append_lock.lock()?;
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        if lock.owner_died {
            let repaired = self.repair(&mut writer);
            if repaired.is_err() {
                self.poison();
            }
            lock.mark_consistent();
            repaired?;
        }
        self.check_poisoned()?;
        let base = s.end_base.load(Acquire);
        if writer.base != base || writer.file.is_none() {
            writer.file = Some(Arc::new(segment::open(&self.dir, base)?));
            writer.base = base;
        }
        Ok(Tx {
            journal: self,
            held: Some(Held {
                writer,
                _lock: lock,
            }),
            last: s.head.load(Acquire),
            len: s.end_len.load(Acquire),
            appended: 0,
            bytes: 0,
            rolled: false,
        })
    }

    /// [`begin`](Self::begin), one append, publish. Returns the record's seq.
    pub fn append(&self, kind: u8, payload: &[u8]) -> io::Result<u64> {
        let mut tx = self.begin()?;
        Ok(tx.append(kind, payload)?.seq)
    }

    /// After a roll, under the append lock: deletes the oldest segments while all of them
    /// together exceed `retain_bytes`, never the active one. `first_seq` moves before a file
    /// goes, so a reader is told `Gone` rather than finding a file missing.
    fn apply_retention(&self, active: u64) {
        let Ok(bases) = segment::list(&self.dir) else {
            return; // tried again after the next roll
        };
        let sizes: Vec<(u64, u64)> = bases
            .iter()
            .filter_map(|&b| {
                let len = fs::metadata(segment::path(&self.dir, b)).ok()?.len();
                Some((b, len))
            })
            .collect();
        let mut total: u64 = sizes.iter().map(|&(_, len)| len).sum();
        let mut deleted = 0;
        for pair in sizes.windows(2) {
            let ((base, len), (next, _)) = (pair[0], pair[1]);
            // Files below first_seq are left over from an interrupted retention: always go.
            if base >= active || (base >= self.first_seq() && total <= self.retain_bytes) {
                break;
            }
            self.shared.first_seq.fetch_max(next, Release);
            if fs::remove_file(segment::path(&self.dir, base)).is_ok() {
                total -= len;
                deleted += 1;
            }
        }
        if deleted > 0 {
            // Not fatal if it fails: an unlink lost in a crash brings back a whole old segment,
            // which recovery reads as the start of the log.
            let _ = self.dir_file.sync_all();
            let c = &self.shared.counters;
            c.segments_deleted.fetch_add(deleted, Relaxed);
        }
    }

    /// A holder of the append lock died (the lock said EOWNERDEAD). Whatever it wrote after
    /// the published head is garbage or unpublished: put the end of the log back right after
    /// record `head`, found from the disk (the dead holder may have died between the stores
    /// of a publish, so `end_base`/`end_len` are not trusted; `head` is one word, stored last).
    fn repair(&self, writer: &mut Writer) -> io::Result<()> {
        let s = &self.shared;
        let head = s.head.load(Acquire);
        let (base, len) = if segment::path(&self.dir, head + 1).exists() {
            // A segment a roll created right after record `head`: whatever is in it is not
            // published. Kept (not deleted) so its name keeps meaning the same file.
            (head + 1, 0)
        } else {
            self.end_of(head)?
        };
        for later in segment::list(&self.dir)?.into_iter().filter(|&b| b > base) {
            // Rolled to by the dead holder, never published.
            fs::remove_file(segment::path(&self.dir, later))?;
        }
        let file = segment::open(&self.dir, base)?;
        segment::reset_tail(&file, len, self.segment_bytes)?;
        self.sync_data(&file)?;
        self.sync_dir()?;
        writer.base = base;
        writer.file = Some(Arc::new(file));
        s.end_base.store(base, Release);
        s.end_len.store(len, Release);
        s.counters.lock_repairs.fetch_add(1, Release);
        // Finish a retention the dead holder may have been in the middle of.
        self.apply_retention(base);
        // It may have died before waking the watchers of its last publish.
        self.wake_watchers();
        Ok(())
    }
}

impl Tx<'_> {
    /// The last seq in the log as this `Tx` sees it: the published head, then each record it
    /// appended.
    pub fn last_seq(&self) -> u64 {
        self.last
    }

    /// Appends one record at the end of the active segment (one pwrite), rolling first if it
    /// would not fit. Visible to readers when the `Tx` is dropped.
    pub fn append(&mut self, kind: u8, payload: &[u8]) -> io::Result<Appended> {
        let j = self.journal;
        if payload.len() > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("record of {} bytes, above {MAX_PAYLOAD}", payload.len()),
            ));
        }
        j.check_poisoned()?;
        let frame_len = frame::frame_len(payload.len());
        let rolled = self.len > 0 && self.len + frame_len > j.segment_bytes;
        if rolled {
            self.roll()?;
        }
        let seq = self.last + 1;
        let writer = &mut *self.held.as_mut().expect("live Tx").writer;
        frame::encode(seq, kind, payload, &mut writer.frame);
        let file = writer.file.as_ref().expect("begin opened the segment");
        if let Err(e) = file.write_all_at(&writer.frame, self.len) {
            // Part of the frame may be there: zero it again so that no reader or recovery
            // takes it for a record. If even that fails, the log cannot be trusted.
            if segment::reset_tail(file, self.len, j.segment_bytes).is_err() {
                j.poison();
            }
            return Err(e);
        }
        self.len += frame_len;
        self.last = seq;
        self.appended += 1;
        self.bytes += frame_len;
        Ok(Appended { seq, rolled })
    }

    /// Closes the active segment and opens the next, in the order that keeps the log
    /// recoverable at every step: cut the old one to its data, fdatasync it, create the new
    /// one, fsync the directory.
    fn roll(&mut self) -> io::Result<()> {
        let j = self.journal;
        let writer = &mut *self.held.as_mut().expect("live Tx").writer;
        let old = writer.file.as_ref().expect("begin opened the segment");
        old.set_len(self.len)?;
        j.sync_data(old)?;
        let base = self.last + 1;
        let new = segment::create(&j.dir, base, j.segment_bytes)?;
        j.sync_dir()?;
        writer.file = Some(Arc::new(new));
        writer.base = base;
        self.len = 0;
        self.rolled = true;
        let s = &j.shared;
        s.counters.segments_rolled.fetch_add(1, Relaxed);
        // Every published record is in the segment just synced or an earlier one.
        j.advance_durable(s.head.load(Acquire));
        Ok(())
    }
}

impl Drop for Tx<'_> {
    /// Publishes what was appended (end position, then head), applies retention after a roll,
    /// releases the lock, and wakes watchers.
    fn drop(&mut self) {
        let j = self.journal;
        let s = &j.shared;
        let held = self.held.take().expect("dropped once");
        if self.appended > 0 || self.rolled {
            s.end_base.store(held.writer.base, Release);
            s.end_len.store(self.len, Release);
            s.head.store(self.last, Release);
            let c = &s.counters;
            c.appends.fetch_add(self.appended, Relaxed);
            c.bytes.fetch_add(self.bytes, Relaxed);
        }
        if self.appended > 0 {
            s.generation.fetch_add(1, SeqCst);
        }
        if self.rolled {
            j.apply_retention(held.writer.base);
        }
        drop(held);
        if self.appended > 0 {
            j.wake_if_watched();
        }
    }
}

impl Journal {
    /// Publishes `durable >= seq` and counts the records that became durable.
    pub(crate) fn advance_durable(&self, seq: u64) {
        let s = &self.shared;
        let before = s.durable.fetch_max(seq, AcqRel);
        if seq > before {
            s.counters.synced_records.fetch_add(seq - before, Relaxed);
        }
    }
}

impl std::fmt::Debug for Tx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx")
            .field("last_seq", &self.last)
            .field("appended", &self.appended)
            .finish()
    }
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let JournalStats {
            head,
            durable,
            first_seq,
            ..
        } = self.stats();
        f.debug_struct("Journal")
            .field("dir", &self.dir)
            .field("first_seq", &first_seq)
            .field("head", &head)
            .field("durable", &durable)
            .finish()
    }
}
