//! What `open` does before anything else: read every segment, check every frame, cut a torn
//! tail, and refuse to start on anything else that is wrong.
//!
//! A crash can leave the end of the last segment half-written: the last frame runs past the end
//! of the file, or its checksum fails and nothing but zeros follows it. That tail was never
//! made durable, so no caller was told it was (sync_to had not returned for it): cut it, say so
//! in one log line, and go on. A bad frame with data after it, a bad frame in an earlier
//! segment, or a gap in the seqs is damage that no crash of this code produces: stop, naming
//! the file and the offset, and let a person decide.

use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::segment::{self, At, Scanner};

/// What recovery found; its `Display` is one log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub dir: PathBuf,
    pub segments: usize,
    /// Records retained, `first_seq..=last_seq`.
    pub records: u64,
    pub first_seq: u64,
    /// 0 for a log that never had a record.
    pub last_seq: u64,
    pub torn: Option<TornTail>,
}

/// A half-written end of the log, cut off by recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub file: PathBuf,
    /// Where the cut was made: the file now ends here.
    pub offset: u64,
    /// Bytes of the torn write dropped, through its last non-zero byte (zeros after it are
    /// preallocated space, not data).
    pub dropped: u64,
}

impl fmt::Display for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "journal {}: ", self.dir.display())?;
        if self.records == 0 {
            write!(f, "no records, next seq {}", self.last_seq + 1)?;
        } else {
            write!(
                f,
                "{} records, seq {}..={}",
                self.records, self.first_seq, self.last_seq
            )?;
        }
        write!(f, " in {} segment(s)", self.segments)?;
        match &self.torn {
            None => write!(f, "; clean"),
            Some(t) => write!(
                f,
                "; torn tail cut: {} at offset {}, {} byte(s) dropped",
                t.file.display(),
                t.offset,
                t.dropped
            ),
        }
    }
}

/// Why `open` failed.
#[derive(Debug)]
pub enum OpenError {
    Io {
        path: PathBuf,
        source: io::Error,
    },
    /// Another live journal holds the directory (its pid, if it had written it yet).
    Locked {
        dir: PathBuf,
        pid: Option<u32>,
    },
    /// Damage that is not a torn tail. Nothing was changed on disk.
    Corrupt {
        file: PathBuf,
        offset: u64,
        reason: String,
    },
    Config(String),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            OpenError::Locked {
                dir,
                pid: Some(pid),
            } => {
                write!(f, "journal {} is in use by pid {pid}", dir.display())
            }
            OpenError::Locked { dir, pid: None } => {
                write!(f, "journal {} is in use by another process", dir.display())
            }
            OpenError::Corrupt {
                file,
                offset,
                reason,
            } => write!(
                f,
                "journal corrupt: {} at offset {offset}: {reason}",
                file.display()
            ),
            OpenError::Config(msg) => write!(f, "journal config: {msg}"),
        }
    }
}

impl std::error::Error for OpenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            OpenError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

pub fn io_err(path: &Path) -> impl FnOnce(io::Error) -> OpenError + '_ {
    move |source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One segment as recovery left it: checked, cut if torn, synced.
pub struct Scanned {
    pub base: u64,
    pub file: File,
    /// Offset of record `base + i`.
    pub offsets: Vec<u32>,
    /// Where its data ends (the file may be longer: preallocated zeros).
    pub len: u64,
}

/// Checks every segment in `dir`, oldest first, cutting a torn tail of the last one.
pub fn scan_all(dir: &Path) -> Result<(Vec<Scanned>, Option<TornTail>), OpenError> {
    let bases = segment::list(dir).map_err(io_err(dir))?;
    let mut out: Vec<Scanned> = Vec::with_capacity(bases.len());
    let mut torn = None;
    for (i, &base) in bases.iter().enumerate() {
        let path = segment::path(dir, base);
        let corrupt = |offset, reason: String| OpenError::Corrupt {
            file: path.clone(),
            offset,
            reason,
        };
        if let Some(prev) = out.last().filter(|s| s.offsets.is_empty()) {
            return Err(OpenError::Corrupt {
                file: segment::path(dir, prev.base),
                offset: 0,
                reason: "empty segment before the last one".into(),
            });
        }
        let expected = out.last().map_or(base, |s| s.base + s.offsets.len() as u64);
        if base == 0 {
            return Err(corrupt(0, "seq 0 names no segment: seqs start at 1".into()));
        }
        if base != expected {
            return Err(corrupt(
                0,
                format!("segment starts at seq {base}, expected {expected}"),
            ));
        }
        let last = i + 1 == bases.len();
        let file = segment::open(dir, base).map_err(io_err(&path))?;
        let file_len = file.metadata().map_err(io_err(&path))?.len();
        let mut scanner = Scanner::new(&file, file_len);
        let mut offsets = Vec::new();
        let mut off = 0u64;
        let mut cut = None;
        loop {
            let seq = base + offsets.len() as u64;
            let (frame_end, flaw) = match scanner.frame_at(off).map_err(io_err(&path))? {
                At::End => break,
                At::Frame {
                    header,
                    crc_ok: true,
                } if header.seq == seq => {
                    let Ok(at) = u32::try_from(off) else {
                        return Err(corrupt(off, "segment larger than 4 GiB".into()));
                    };
                    offsets.push(at);
                    off += header.frame_len();
                    continue;
                }
                At::Frame {
                    header,
                    crc_ok: true,
                } => {
                    return Err(corrupt(
                        off,
                        format!("record has seq {}, expected {seq}", header.seq),
                    ));
                }
                At::Frame { header, .. } if header.is_zero() => (
                    off + header.frame_len(),
                    "zero bytes where a record should be",
                ),
                At::Frame { header, .. } => (off + header.frame_len(), "checksum mismatch"),
                At::Partial => (file_len, "frame runs past the end of the file"),
            };
            // Everything from `off` on is invalid. In the last segment, if no data follows the
            // flawed frame, it is the torn end of an interrupted write (or only zeros: free
            // preallocated space).
            match scanner.data_end(off).map_err(io_err(&path))? {
                None if last => {}
                Some(end) if last && end <= frame_end => cut = Some((off, end - off)),
                Some(_) if last => {
                    return Err(corrupt(off, format!("{flaw}, with more data after it")));
                }
                _ => return Err(corrupt(off, flaw.to_string())),
            }
            break;
        }
        if let Some((at, dropped)) = cut {
            // Cut the torn write off for good before anything is appended after it.
            file.set_len(at).map_err(io_err(&path))?;
            file.sync_all().map_err(io_err(&path))?;
            torn = Some(TornTail {
                file: path.clone(),
                offset: at,
                dropped,
            });
        } else {
            // Whatever the last writer appended is durable from here on: `durable` starts at
            // the head (a crash of the process, not of the machine, leaves unsynced data).
            file.sync_data().map_err(io_err(&path))?;
        }
        out.push(Scanned {
            base,
            file,
            offsets,
            len: off,
        });
    }
    Ok((out, torn))
}
