//! What the master and every child share in memory, mapped before the first fork: the
//! counters behind `/stats` (slot 0 is the jobs process's, and each connection child writes the
//! slot the master gave it), and the stop flag.
//!
//! Children come and go, so a slot is not a process but a place a process occupies while it
//! lives: the master hands a child the lowest free slot at fork and frees it when it reaps the
//! child. So `/stats` lists, after the jobs process, one slot for each child that can be alive
//! at once (the bound on connections); a free slot shows pid 0. `accepted` and `requests` add
//! up over every child a slot has had, so the sums over `workers` are the server's since start;
//! `open` and `held` are reset when the slot's child is reaped (whatever it held died with it),
//! so `total.open` is how many connection children are serving now; `forks` counts the
//! processes forked into the slot.

use std::io;
use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};

use runtime::{Stats, WorkerStats};

use crate::PATTERN;

/// The jobs process's slot; the connection children have slots 1 to N.
pub const JOBS_SLOT: usize = 0;

/// The extra `/stats` counter of each slot: how many processes the master forked into it.
pub const FORKS: usize = 0;
const EXTRA: &[&str] = &["forks"];

/// The server's `/stats` counters: the jobs process's slot and `children` slots for the
/// connection children, in a mapping every child inherits.
pub fn stats(children: usize) -> io::Result<Stats> {
    let stats = Stats::with_slots(PATTERN, slots(children + 1)?)
        .with_extra(EXTRA)
        .sparse();
    for slot in stats.workers() {
        vacate(slot);
    }
    Ok(stats)
}

/// Marks a slot free: no process in it (the master, when it reaps the slot's process). What a
/// dead child still counted as open or held died with it.
pub fn vacate(slot: &WorkerStats) {
    slot.pid.store(0, Relaxed);
    slot.tid.store(0, Relaxed);
    slot.open.store(0, Relaxed);
    slot.held.store(0, Relaxed);
}

/// The graceful stop, as every child sees it: the master raises it, then wakes every process's
/// journal watcher, and each child looks at it when its watcher tells the app's hub.
#[derive(Clone, Copy)]
pub struct StopFlag(&'static AtomicBool);

impl StopFlag {
    pub fn new() -> io::Result<StopFlag> {
        let flag = shared_mapping(size_of::<AtomicBool>())?.cast::<AtomicBool>();
        // SAFETY: the new mapping is page-aligned and zeroed, and a zero byte is a valid
        // AtomicBool (false); it is never unmapped, and atomics may be shared across processes.
        Ok(StopFlag(unsafe { flag.as_ref() }))
    }

    pub fn raise(&self) {
        self.0.store(true, SeqCst);
    }

    pub fn is_raised(&self) -> bool {
        self.0.load(SeqCst)
    }
}

/// `n` slots in an anonymous shared mapping, made before the first fork so that every child
/// inherits it.
fn slots(n: usize) -> io::Result<&'static [WorkerStats]> {
    let bytes = n.checked_mul(size_of::<WorkerStats>());
    let bytes = bytes.ok_or_else(|| io::Error::other("--max-children: no room for that many"))?;
    let slots = shared_mapping(bytes)?.cast::<WorkerStats>();
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

/// A new anonymous shared mapping of `bytes` (at least one), zeroed: memory every process
/// forked afterwards shares with this one.
fn shared_mapping(bytes: usize) -> io::Result<NonNull<std::ffi::c_void>> {
    let bytes = NonZeroUsize::new(bytes).ok_or_else(|| io::Error::other("an empty mapping"))?;
    let prot = nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE;
    // SAFETY: a new anonymous mapping at an address the kernel picks aliases nothing.
    let base = unsafe {
        nix::sys::mman::mmap_anonymous(None, bytes, prot, nix::sys::mman::MapFlags::MAP_SHARED)
    }?;
    Ok(base)
}
