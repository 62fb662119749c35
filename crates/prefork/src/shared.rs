//! The counters behind `/stats`, in memory every process shares: the one thing the master and
//! its workers share besides the listening socket.

use std::io;
use std::num::NonZeroUsize;

use runtime::{Stats, WorkerStats};

use crate::PATTERN;

/// The extra `/stats` counter of each slot: how many workers the master forked into it.
pub const SPAWNS: usize = 0;
const EXTRA: &[&str] = &["spawns"];

/// The server's `/stats` counters, one slot per worker, in a mapping every worker inherits.
pub fn stats(workers: usize) -> io::Result<Stats> {
    Ok(Stats::with_slots(PATTERN, slots(workers)?).with_extra(EXTRA))
}

/// Per-worker counters in an anonymous shared mapping, made before the first fork so that every
/// worker inherits it: each writes its own slot, and any of them can answer `/stats`.
///
/// A slot outlives its workers: `accepted` and `requests` add up over every worker forked into
/// it, so the totals are the server's since start; `open` is reset when the slot's last process
/// dies (its connections died with it); `spawns` counts the forks.
fn slots(n: usize) -> io::Result<&'static [WorkerStats]> {
    let bytes = n
        .checked_mul(size_of::<WorkerStats>())
        .and_then(NonZeroUsize::new);
    let bytes = bytes.ok_or_else(|| io::Error::other("--workers: no room for that many"))?;
    let prot = nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE;
    // SAFETY: a new anonymous mapping at an address the kernel picks aliases nothing.
    let base = unsafe {
        nix::sys::mman::mmap_anonymous(None, bytes, prot, nix::sys::mman::MapFlags::MAP_SHARED)
    }?;
    let slots = base.cast::<WorkerStats>();
    for i in 0..n {
        // SAFETY: `i < n` slots fit in the mapping, which is page-aligned (more than
        // WorkerStats needs) and not yet shared with anyone.
        unsafe { slots.add(i).write(WorkerStats::default()) };
    }
    // SAFETY: `n` initialized slots; the mapping is never unmapped, so it lives as long as the
    // process (and every process forked from it). WorkerStats is atomics only, so shared
    // references across processes are sound.
    Ok(unsafe { std::slice::from_raw_parts(slots.as_ptr(), n) })
}
