//! Segment files, Kafka style: `{first_seq:020}.log`, so a directory listing sorts them in log
//! order and a seq's segment is the last one whose name is not above it.
//!
//! The active segment is preallocated to `segment_bytes` (as Postgres zero-fills a WAL segment):
//! an append then does not grow the file, and its fdatasync does not have to commit a new file
//! size to the filesystem journal (measured here: ~0.35 ms against ~1.2 ms when every append
//! grows the file). The space after the last record therefore reads as zeros; a segment that is
//! rolled away from is cut to its exact length first.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::frame::{self, HEADER, Header, MAX_PAYLOAD};

pub fn path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

/// The first seqs of the segments in `dir`, oldest first. Other files are not ours to judge.
pub fn list(dir: &Path) -> io::Result<Vec<u64>> {
    let mut bases = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(digits) = name.to_str().and_then(|n| n.strip_suffix(".log")) else {
            continue;
        };
        if digits.len() == 20
            && digits.bytes().all(|b| b.is_ascii_digit())
            && let Ok(base) = digits.parse()
        {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// Opens an existing segment for reading and writing (pread/pwrite only: never the file offset,
/// which a descriptor inherited across fork shares with the other processes).
pub fn open(dir: &Path, base: u64) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path(dir, base))
}

/// Creates the segment that starts at `base`, preallocated. The caller fsyncs the directory.
pub fn create(dir: &Path, base: u64, prealloc: u64) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path(dir, base))?;
    preallocate(&file, prealloc)?;
    Ok(file)
}

/// Extends the file with zeros to `len` bytes (no-op if already that long). Filesystems without
/// fallocate simply grow the file as records arrive.
pub fn preallocate(file: &File, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on a descriptor we own, with plain integer arguments.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(()),
        _ => Err(err),
    }
}

/// Makes everything from `len` on zeros again (cut, then preallocate): what a failed or
/// abandoned write left after the last published record must never be read as a record.
pub fn reset_tail(file: &File, len: u64, prealloc: u64) -> io::Result<()> {
    file.set_len(len)?;
    if len < prealloc {
        preallocate(file, prealloc)?;
    }
    Ok(())
}

/// What [`Scanner::frame_at`] found at an offset.
pub enum At {
    /// No byte at all: the end of the file (or of the bytes the scan may look at).
    End,
    /// Something that cannot be a whole frame: fewer bytes than a header, a length beyond
    /// [`MAX_PAYLOAD`], or a frame running past the end.
    Partial,
    /// A whole frame, its checksum verified or not.
    Frame { header: Header, crc_ok: bool },
}

/// Reads frames from a segment file front to back through a read-ahead buffer (pread, so the
/// descriptor's shared file offset is never used).
pub struct Scanner<'f> {
    file: &'f File,
    /// The scan never looks at bytes at or past this offset.
    limit: u64,
    buf: Vec<u8>,
    /// The file offset of `buf[0]`.
    start: u64,
    /// How much to read next time: small at first (a reader catching up by a record or two),
    /// doubling for long scans (recovery).
    ahead: usize,
}

const FIRST_READ: usize = 4 << 10;
const MAX_READ: usize = 1 << 20;

impl<'f> Scanner<'f> {
    pub fn new(file: &'f File, limit: u64) -> Scanner<'f> {
        Scanner {
            file,
            limit,
            buf: Vec::new(),
            start: 0,
            ahead: FIRST_READ,
        }
    }

    pub fn frame_at(&mut self, off: u64) -> io::Result<At> {
        let head = self.bytes(off, HEADER)?;
        if head.is_empty() {
            return Ok(At::End);
        }
        let Ok(head) = <&[u8; HEADER]>::try_from(head) else {
            return Ok(At::Partial);
        };
        let header = Header::read(head);
        if header.len as usize > MAX_PAYLOAD {
            return Ok(At::Partial);
        }
        let whole = self.bytes(off, header.frame_len() as usize)?;
        match frame::split(whole) {
            Some((header, payload)) => Ok(At::Frame {
                header,
                crc_ok: header.checks(payload),
            }),
            None => Ok(At::Partial),
        }
    }

    /// The offset just past the last non-zero byte in `[from, limit)`, or `None` if all of it
    /// is zero (or empty).
    pub fn data_end(&mut self, from: u64) -> io::Result<Option<u64>> {
        let mut last = None;
        let mut off = from;
        while let Some((data, hole)) = data_region(self.file, off)? {
            // Only the regions the filesystem says hold data: a preallocated, never written
            // extent is a hole to SEEK_DATA on ext4 and XFS, so megabytes of it are not read.
            off = data;
            while off < hole {
                let len = self
                    .ahead
                    .min(usize::try_from(hole - off).unwrap_or(usize::MAX));
                let chunk = self.bytes(off, len)?;
                if chunk.is_empty() {
                    return Ok(last);
                }
                if let Some(i) = last_non_zero(chunk) {
                    last = Some(off + i as u64 + 1);
                }
                off += chunk.len() as u64;
            }
        }
        Ok(last)
    }

    /// Up to `len` bytes at `off` (fewer only at the end), from the buffer, refilled as needed.
    fn bytes(&mut self, off: u64, len: usize) -> io::Result<&[u8]> {
        let buffered = self.start..self.start + self.buf.len() as u64;
        let want_end = off.saturating_add(len as u64).min(self.limit);
        if off < buffered.start || want_end > buffered.end {
            let want = len.max(self.ahead) as u64;
            let want = want.min(self.limit.saturating_sub(off)) as usize;
            self.buf.resize(want, 0);
            let got = read_at_most(self.file, &mut self.buf, off)?;
            self.buf.truncate(got);
            self.start = off;
            self.ahead = (self.ahead * 2).min(MAX_READ);
        }
        let i = (off - self.start) as usize;
        let end = (i + len).min(self.buf.len());
        Ok(&self.buf[i.min(end)..end])
    }
}

/// The next region at or after `off` that may hold data, `(start, end)`; `None` if only holes
/// follow. Where SEEK_DATA is not supported, all of the rest of the file.
fn data_region(file: &File, off: u64) -> io::Result<Option<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let Ok(at) = libc::off_t::try_from(off) else {
        return Ok(None);
    };
    // SAFETY: lseek on a descriptor we own. It moves the file offset, which this crate never
    // uses for reading or writing (and recovery runs before a fork could share it).
    let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
    if data < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(Some((off, u64::MAX))),
            _ => Err(err),
        };
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
    if hole < 0 {
        return Ok(Some((data as u64, u64::MAX)));
    }
    Ok(Some((data as u64, hole as u64)))
}

/// The index of the last non-zero byte. Preallocated space is megabytes of zeros: test them
/// 64 bytes at a time (which the compiler vectorizes), then find the byte.
fn last_non_zero(bytes: &[u8]) -> Option<usize> {
    let blocks = bytes.chunks(64);
    let n = blocks.len();
    let block = blocks
        .rev()
        .position(|b| b.iter().fold(0, |acc, &x| acc | x) != 0)?;
    let start = (n - 1 - block) * 64;
    let end = (start + 64).min(bytes.len());
    bytes[start..end]
        .iter()
        .rposition(|&b| b != 0)
        .map(|i| start + i)
}

/// Reads until `buf` is full or the file ends; returns how many bytes were read.
pub fn read_at_most(file: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::last_non_zero;

    #[test]
    fn last_non_zero_finds_the_last_byte() {
        assert_eq!(last_non_zero(&[]), None);
        assert_eq!(last_non_zero(&[0; 1000]), None);
        for len in [1, 63, 64, 65, 200] {
            for at in [0, len / 2, len - 1] {
                let mut bytes = vec![0u8; len];
                bytes[at] = 3;
                assert_eq!(last_non_zero(&bytes), Some(at), "len {len} at {at}");
                bytes[0] = 1;
                assert_eq!(last_non_zero(&bytes), Some(at), "len {len} at {at}");
            }
        }
    }
}
