//! Reading: each process keeps its own index, seq → (segment, offset), a `u32` per record.
//! `open` builds it from recovery's scan (forked children inherit a copy); after that a reader
//! catches it up lazily, when the shared `head` is ahead of it, by scanning the new frames at
//! the end of the last indexed segment or in the segments after it. Reads are preads of whole
//! runs of frames, outside the index lock.

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, PoisonError};

use crate::Journal;
use crate::frame;
use crate::recover::Scanned;
use crate::segment::{self, At, Scanner};

/// One record, borrowed from the reader's buffer for the duration of the callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub seq: u64,
    pub kind: u8,
    pub payload: &'a [u8],
}

/// Why [`Journal::read_after`] could not read.
#[derive(Debug)]
pub enum ReadError {
    /// The records asked for were deleted by retention; `first` is the oldest retained seq
    /// (read from `first - 1` to resume).
    Gone { first: u64 },
    /// The disk failed, or a published record no longer checks out.
    Io(io::Error),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Gone { first } => {
                write!(f, "records gone: the oldest retained seq is {first}")
            }
            ReadError::Io(e) => write!(f, "journal read: {e}"),
        }
    }
}

impl std::error::Error for ReadError {}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> ReadError {
        ReadError::Io(e)
    }
}

/// Bytes read per pread (at least one whole record).
const READ_BATCH: u64 = 256 * 1024;

pub(crate) struct Index {
    segs: VecDeque<Seg>,
}

struct Seg {
    base: u64,
    file: Arc<File>,
    /// Offset of record `base + i`.
    offsets: Vec<u32>,
    /// Where the last indexed record ends.
    end: u64,
}

impl Seg {
    /// The first seq not indexed here.
    fn next_seq(&self) -> u64 {
        self.base + self.offsets.len() as u64
    }
}

/// A run of whole frames in one segment: `count` records from seq `first`, bytes `start..end`.
struct Run {
    file: Arc<File>,
    start: u64,
    end: u64,
    first: u64,
    count: u64,
}

impl Index {
    pub fn from_recovery(segments: Vec<Scanned>) -> Index {
        let segs = segments
            .into_iter()
            .map(|s| Seg {
                base: s.base,
                file: Arc::new(s.file),
                offsets: s.offsets,
                end: s.len,
            })
            .collect();
        Index { segs }
    }

    pub fn file_of(&self, base: u64) -> Option<Arc<File>> {
        self.segs
            .iter()
            .find(|s| s.base == base)
            .map(|s| s.file.clone())
    }

    /// Closes the descriptors of segments retention deleted (their disk space is freed only
    /// when every process has closed them).
    fn forget_before(&mut self, first: u64) {
        while self.segs.front().is_some_and(|s| s.base < first) {
            self.segs.pop_front();
        }
    }

    /// Indexes every record up to `head` (published, so whole on disk).
    fn catch_up(&mut self, j: &Journal, head: u64) -> io::Result<()> {
        let first = j.first_seq();
        self.forget_before(first);
        loop {
            let next = self.segs.back().map_or(first, Seg::next_seq);
            if next > head {
                return Ok(());
            }
            if let Some(seg) = self.segs.back_mut() {
                let mut scanner = Scanner::new(&seg.file, u64::MAX);
                let mut seq = next;
                while seq <= head {
                    match scanner.frame_at(seg.end)? {
                        At::Frame {
                            header,
                            crc_ok: true,
                        } if header.seq == seq => {
                            seg.offsets.push(seg.end as u32);
                            seg.end += header.frame_len();
                            seq += 1;
                        }
                        // The segment ends here (cut at a roll, or preallocated zeros): the
                        // record is in the next one.
                        At::End => break,
                        At::Frame { header, .. } if header.is_zero() => break,
                        _ => {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!(
                                    "{}: offset {}: record {seq} does not check out",
                                    segment::path(&j.dir, seg.base).display(),
                                    seg.end
                                ),
                            ));
                        }
                    }
                }
                if seq > head {
                    return Ok(());
                }
                if seg.offsets.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "{}: record {seq} is not at its start",
                            segment::path(&j.dir, seg.base).display()
                        ),
                    ));
                }
            }
            // Record `next` starts a segment of its own.
            let next = self.segs.back().map_or(first, Seg::next_seq);
            match segment::open(&j.dir, next) {
                Ok(file) => self.segs.push_back(Seg {
                    base: next,
                    file: Arc::new(file),
                    offsets: Vec::new(),
                    end: 0,
                }),
                Err(e) if e.kind() == io::ErrorKind::NotFound && j.first_seq() > next => {
                    // Retention deleted it meanwhile: start over from the new first segment.
                    self.segs.clear();
                    return self.catch_up(j, head);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The run of records from `from` (indexed, not past `to`) within one segment, at most
    /// `max` records and about `READ_BATCH` bytes. `None` if `from` is not indexed.
    fn run(&self, from: u64, to: u64, max: u64) -> Option<Run> {
        let i = self
            .segs
            .partition_point(|s| s.base <= from)
            .checked_sub(1)?;
        let seg = &self.segs[i];
        let k = usize::try_from(from - seg.base).ok()?;
        let start = u64::from(*seg.offsets.get(k)?);
        let rest = &seg.offsets[k..];
        let by_bytes = rest.partition_point(|&o| u64::from(o) - start < READ_BATCH);
        let count = (by_bytes as u64).min(to - from + 1).min(max).max(1);
        let end = rest.get(count as usize).map_or(seg.end, |&o| u64::from(o));
        Some(Run {
            file: seg.file.clone(),
            start,
            end,
            first: from,
            count,
        })
    }

    /// Where the record after `seq` would start: its segment and offset (`seq` indexed, or
    /// indexable, i.e. published).
    fn end_of(&mut self, j: &Journal, seq: u64) -> io::Result<(u64, u64)> {
        self.catch_up(j, seq)?;
        match self.segs.back() {
            Some(seg) if seg.next_seq() == seq + 1 => Ok((seg.base, seg.end)),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("record {seq} not found in the segments"),
            )),
        }
    }
}

impl Journal {
    /// Calls `f` for the records with seq > `after`, oldest first, at most `max` of them;
    /// returns how many. Sees every record published (by any process) before the call.
    /// `after >= head()`: `Ok(0)`. Records after `after` deleted by retention:
    /// [`ReadError::Gone`].
    pub fn read_after(
        &self,
        after: u64,
        max: usize,
        mut f: impl FnMut(Record<'_>),
    ) -> Result<usize, ReadError> {
        let head = self.head();
        if after >= head || max == 0 {
            return Ok(0);
        }
        let mut next = after + 1;
        let mut done = 0u64;
        let mut buf = Vec::new();
        while done < max as u64 && next <= head {
            let run = {
                let mut index = self.index.lock().unwrap_or_else(PoisonError::into_inner);
                index.catch_up(self, head)?;
                let first = self.first_seq();
                match index.run(next, head, max as u64 - done) {
                    Some(run) if next >= first => run,
                    // A retention between two runs: what was read stays read.
                    _ if done > 0 => break,
                    _ => return Err(ReadError::Gone { first }),
                }
            };
            // Outside the lock: other readers index and read meanwhile, and `f` may call back
            // into the journal.
            buf.resize((run.end - run.start) as usize, 0);
            run.file.read_exact_at(&mut buf, run.start)?;
            let mut rest = &buf[..];
            for seq in run.first..run.first + run.count {
                let (header, payload) = frame::split(rest)
                    .filter(|(h, _)| h.seq == seq)
                    .ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("record {seq} changed on disk after it was indexed"),
                        )
                    })?;
                f(Record {
                    seq,
                    kind: header.kind,
                    payload,
                });
                rest = &rest[header.frame_len() as usize..];
            }
            done += run.count;
            next += run.count;
        }
        Ok(done as usize)
    }

    /// After retention (by any process) moved `first_seq`: lets go of deleted segments here.
    /// Called by appenders and watchers, so a process that rarely reads does not keep deleted
    /// files alive.
    pub(crate) fn forget_deleted(&self) {
        let first = self.first_seq();
        if self.forgot_before.load(Relaxed) != first {
            let mut index = self.index.lock().unwrap_or_else(PoisonError::into_inner);
            index.forget_before(first);
            self.forgot_before.store(first, Relaxed);
        }
    }

    /// For the repair after a dead appender: where the record after `seq` goes.
    pub(crate) fn end_of(&self, seq: u64) -> io::Result<(u64, u64)> {
        let mut index = self.index.lock().unwrap_or_else(PoisonError::into_inner);
        index.end_of(self, seq)
    }
}
