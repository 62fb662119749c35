//! The provided-buffer ring: memory the kernel picks a buffer from when data arrives, so that a
//! connection waiting for its next request holds no receive buffer at all (a multishot receive
//! names a buffer *group*, not a buffer).
//!
//! ```text
//!   ring of entries (shared with the kernel)      buffers (ours; the kernel writes into them)
//!   ┌──────┬──────┬──────┬─────┐                  ┌──────────┬──────────┬─────
//!   │ addr │ addr │ addr │ ... │ ──points into──▶ │ buffer 0 │ buffer 1 │ ...
//!   │ len  │ len  │ len  │     │                  └──────────┴──────────┴─────
//!   │ bid  │ bid  │ bid  │     │
//!   └──────┴──────┴──────┴─────┘
//!     kernel takes from its head;  we give back at the tail (a u16 in entry 0's spare field)
//! ```
//!
//! A completion that used a buffer says which (`IORING_CQE_F_BUFFER`, the buffer id in the
//! flags' upper half); the buffer is ours until we put it back at the tail. If the ring is
//! empty when data arrives, the receive fails with ENOBUFS and its multishot ends.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::IoUring;
use io_uring::types::BufRingEntry;

pub struct BufRing {
    /// `entries` ring entries, page-aligned, registered with the kernel.
    ring: Mapping,
    /// `entries` buffers of `size` bytes each.
    bufs: Mapping,
    entries: u16,
    size: usize,
    /// Our copy of the tail: the next entry we fill.
    tail: u16,
    group: u16,
    registered: bool,
}

impl BufRing {
    /// Maps `entries` buffers of `size` bytes (`entries` a power of two, at most 32768), hands
    /// them all to the kernel, and registers them with `ring` as buffer group `group`.
    pub fn new(ring: &IoUring, group: u16, entries: u16, size: usize) -> io::Result<BufRing> {
        assert!(entries.is_power_of_two() && entries <= 1 << 15);
        let mut bufs = BufRing {
            ring: Mapping::new(usize::from(entries) * size_of::<BufRingEntry>())?,
            bufs: Mapping::new(usize::from(entries) * size)?,
            entries,
            size,
            tail: 0,
            group,
            registered: false,
        };
        for bid in 0..entries {
            bufs.give_back(bid);
        }
        // SAFETY: the ring memory is page-aligned (mmap), zeroed, `entries` entries long, and
        // lives until `unregister` (or, if that fails, forever: see `Drop`).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                bufs.ring.ptr.as_ptr() as u64,
                entries,
                group,
                0,
            )?;
        }
        bufs.registered = true;
        Ok(bufs)
    }

    pub fn group(&self) -> u16 {
        self.group
    }

    /// The `len` bytes the kernel received into buffer `bid`.
    ///
    /// The caller must have been handed `bid` by a completion and not have given it back yet.
    pub fn received(&self, bid: u16, len: usize) -> &[u8] {
        assert!(bid < self.entries && len <= self.size);
        // SAFETY: buffer `bid` lies inside the mapping (checked above). A completion handed it
        // to us, so the kernel has finished writing those `len` bytes, and will not write to it
        // again until `give_back` puts it at the tail, which needs `&mut self` and so cannot
        // happen while this borrow lives.
        unsafe {
            std::slice::from_raw_parts(
                self.bufs.ptr.as_ptr().add(usize::from(bid) * self.size),
                len,
            )
        }
    }

    /// Returns buffer `bid` to the kernel: it may receive into it again.
    pub fn give_back(&mut self, bid: u16) {
        assert!(bid < self.entries);
        let mask = self.entries - 1;
        let entries = self.ring.ptr.as_ptr().cast::<BufRingEntry>();
        // SAFETY: `tail & mask` indexes one of `entries` entries inside the ring mapping. The
        // kernel reads only entries between its head and the published tail, and this one is
        // past the tail until the store below publishes it.
        unsafe {
            let entry = &mut *entries.add(usize::from(self.tail & mask));
            entry.set_addr(self.bufs.ptr.as_ptr().add(usize::from(bid) * self.size) as u64);
            entry.set_len(self.size as u32);
            entry.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail is the u16 in entry 0's reserved field, inside the mapping, aligned,
        // and shared with the kernel, which reads it concurrently: hence the atomic store. Release
        // orders the entry written above before the tail that makes it visible.
        unsafe {
            let tail = BufRingEntry::tail(entries).cast_mut();
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }

    /// Stops the kernel using the buffers: call it once no receive that selects from them is
    /// in flight any more (after cancelling them all).
    pub fn unregister(&mut self, ring: &IoUring) -> io::Result<()> {
        if self.registered {
            ring.submitter().unregister_buf_ring(self.group)?;
            self.registered = false;
        }
        Ok(())
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        if self.registered {
            // Still registered: the kernel may yet write into the buffers, so the memory must
            // outlive it. Leaking a few pages beats a use-after-free.
            self.ring.leak();
            self.bufs.leak();
        }
    }
}

/// Anonymous, page-aligned, zeroed memory; unmapped on drop unless leaked.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing touches
        // no existing memory; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Mapping { ptr, len })
    }

    fn leak(&mut self) {
        self.len = 0;
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: `ptr` and `len` are exactly what mmap returned, unmapped once; no
            // reference into the mapping outlives `self` (they borrow the BufRing).
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}
