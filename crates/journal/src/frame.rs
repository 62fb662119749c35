//! One record on disk, SQLite-WAL style: a checksummed frame.
//!
//! ```text
//!   0        4        8                16  17
//!   ┌────────┬────────┬────────────────┬───┬──────────────┐
//!   │ len    │ crc32c │ seq            │ k │ payload      │   little-endian
//!   └────────┴────────┴────────────────┴───┴──────────────┘
//!     u32      u32      u64              u8  len bytes
//!                       └──── crc32c covers seq, kind and payload ────┘
//! ```
//!
//! The seq is inside the checksum, so a frame copied to the wrong place, or a stale frame from an
//! earlier life of the file, does not pass for the record that belongs there. The length is not:
//! a damaged length shows up as a frame that runs past the end of the file, or as a checksum
//! computed over the wrong bytes.

/// Bytes before the payload.
pub const HEADER: usize = 17;

/// The largest payload a record may carry. Far above anything the application stores; it bounds
/// what recovery will try to read when a damaged length field claims more.
pub const MAX_PAYLOAD: usize = 1 << 30;

/// A frame's fixed part, as read from disk (not yet checked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub len: u32,
    pub crc: u32,
    pub seq: u64,
    pub kind: u8,
}

impl Header {
    pub fn read(bytes: &[u8; HEADER]) -> Header {
        Header {
            len: u32::from_le_bytes(bytes[0..4].try_into().unwrap()),
            crc: u32::from_le_bytes(bytes[4..8].try_into().unwrap()),
            seq: u64::from_le_bytes(bytes[8..16].try_into().unwrap()),
            kind: bytes[16],
        }
    }

    /// Header plus payload.
    pub fn frame_len(&self) -> u64 {
        HEADER as u64 + u64::from(self.len)
    }

    /// All zero: what a preallocated or never-written part of a file reads as.
    pub fn is_zero(&self) -> bool {
        *self
            == Header {
                len: 0,
                crc: 0,
                seq: 0,
                kind: 0,
            }
    }

    /// Whether `payload` (exactly `len` bytes) is what this header's checksum was computed over.
    pub fn checks(&self, payload: &[u8]) -> bool {
        payload.len() == self.len as usize && self.crc == checksum(self.seq, self.kind, payload)
    }
}

/// The size of the frame that carries `payload_len` bytes.
pub fn frame_len(payload_len: usize) -> u64 {
    (HEADER + payload_len) as u64
}

/// Replaces `out` with the frame of one record. `payload.len()` must be at most [`MAX_PAYLOAD`].
pub fn encode(seq: u64, kind: u8, payload: &[u8], out: &mut Vec<u8>) {
    debug_assert!(payload.len() <= MAX_PAYLOAD);
    out.clear();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&checksum(seq, kind, payload).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
}

/// The frame at the start of `buf`, if `buf` holds all of it: its header and payload. The
/// checksum is not checked here (see [`Header::checks`]).
pub fn split(buf: &[u8]) -> Option<(Header, &[u8])> {
    let header = Header::read(buf.get(..HEADER)?.try_into().unwrap());
    let payload = buf.get(HEADER..HEADER + header.len as usize)?;
    Some((header, payload))
}

fn checksum(seq: u64, kind: u8, payload: &[u8]) -> u32 {
    let mut fixed = [0u8; 9];
    fixed[..8].copy_from_slice(&seq.to_le_bytes());
    fixed[8] = kind;
    crc32c::crc32c_append(crc32c::crc32c(&fixed), payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        for (seq, kind, payload) in [
            (1u64, 0u8, &b""[..]),
            (2, 7, b"hello"),
            (u64::MAX, 255, &[0xAB; 1000][..]),
        ] {
            encode(seq, kind, payload, &mut buf);
            assert_eq!(buf.len() as u64, frame_len(payload.len()));
            let (header, got) = split(&buf).expect("whole frame");
            assert_eq!((header.seq, header.kind, got), (seq, kind, payload));
            assert_eq!(header.frame_len(), buf.len() as u64);
            assert!(header.checks(got));
            assert!(!header.is_zero());
        }
    }

    #[test]
    fn split_needs_the_whole_frame() {
        let mut buf = Vec::new();
        encode(3, 1, b"abcdef", &mut buf);
        for cut in 0..buf.len() {
            assert!(split(&buf[..cut]).is_none(), "cut at {cut}");
        }
        // Trailing bytes (the next frame) are not part of this one.
        buf.extend_from_slice(b"next");
        let (header, payload) = split(&buf).unwrap();
        assert_eq!((header.len, payload), (6, &b"abcdef"[..]));
    }

    #[test]
    fn checksum_catches_every_flipped_bit() {
        let mut buf = Vec::new();
        encode(42, 9, b"payload bytes", &mut buf);
        // Every bit from the crc field on: crc, seq, kind, payload. (A flipped length bit changes
        // the frame's extent instead: covered by the recovery tests.)
        for bit in 32..buf.len() * 8 {
            let mut bad = buf.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let (header, payload) = split(&bad).unwrap();
            assert!(!header.checks(payload), "bit {bit} flipped unnoticed");
        }
    }

    #[test]
    fn zero_bytes_are_no_frame() {
        let zeros = [0u8; HEADER];
        let (header, payload) = split(&zeros).unwrap();
        assert!(header.is_zero());
        assert!(!header.checks(payload));
    }
}
