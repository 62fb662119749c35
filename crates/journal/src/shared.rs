//! The state every process of one journal shares: a page of anonymous `MAP_SHARED` memory made
//! by `open`, before any fork, so the opener's children map the same page. It holds two
//! process-shared robust mutexes, the published positions, two futex words and the counters.
//!
//! Robust mutexes because a prefork worker can be SIGKILLed while it holds one: the kernel
//! walks the dead thread's robust list, marks the lock word "owner died", and the next
//! `pthread_mutex_lock` returns `EOWNERDEAD` instead of blocking for ever. That caller repairs
//! what the dead one may have left half done, then calls `pthread_mutex_consistent`.

use std::cell::UnsafeCell;
use std::io;
use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::ops::Deref;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::Duration;

#[repr(C)]
pub struct Shared {
    /// Held by a `Tx`: one appender at a time across all processes.
    pub append_lock: RobustMutex,
    /// Held by the one process-wide flusher of a group commit.
    pub flush_lock: RobustMutex,
    /// The last published seq. Stored last when publishing (Release), so whoever reads it
    /// (Acquire) finds every record up to it on disk, in the page cache.
    pub head: AtomicU64,
    /// Every record up to this seq has been fdatasynced.
    pub durable: AtomicU64,
    /// The oldest retained seq: the first segment's base.
    pub first_seq: AtomicU64,
    /// Where the next record goes, as of the last publish: the active segment and the length of
    /// its data. Written only under `append_lock`.
    pub end_base: AtomicU64,
    pub end_len: AtomicU64,
    /// Futex word: bumped after each publish that moves the head (and by `wake_watchers`).
    pub generation: AtomicU32,
    /// Threads blocked on `generation`; a publish with none makes no syscall. 64 bits: a
    /// process that exits while its watcher waits leaves it counted up for good, and a process
    /// per connection does that once per connection (32 bits would wrap within days).
    pub watchers: AtomicU64,
    /// Futex word: bumped each time `flush_lock` is released, so a group commit's followers
    /// wait for the flush in progress to finish rather than for the lock.
    pub flushes: AtomicU32,
    /// Threads blocked on `flushes`.
    pub flush_waiters: AtomicU32,
    /// Non-zero once an fdatasync (or a repair) failed: nothing more is appended or synced.
    pub poisoned: AtomicU32,
    pub counters: Counters,
}

#[repr(C)]
#[derive(Default)]
pub struct Counters {
    pub appends: AtomicU64,
    pub bytes: AtomicU64,
    pub fdatasyncs: AtomicU64,
    pub synced_records: AtomicU64,
    pub segments_rolled: AtomicU64,
    pub segments_deleted: AtomicU64,
    pub lock_repairs: AtomicU64,
    pub futex_wakes: AtomicU64,
}

/// Owns the mapping; dereferences to the [`Shared`] in it.
pub struct SharedMap {
    ptr: NonNull<Shared>,
}

// SAFETY: `Shared` is made of atomics and process-shared pthread mutexes, which are built for
// concurrent use from any thread (and process); the pointer stays valid until `drop`.
unsafe impl Send for SharedMap {}
// SAFETY: as above.
unsafe impl Sync for SharedMap {}

impl SharedMap {
    pub fn new() -> io::Result<SharedMap> {
        // SAFETY: an anonymous mapping: no descriptor, no existing memory touched.
        let ptr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                size_of::<Shared>(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // Page-aligned and zero-filled; zero is a valid value of every atomic in `Shared`, and
        // of the mutexes until they are initialised just below.
        let map = SharedMap {
            ptr: NonNull::new(ptr.cast()).expect("mmap returned null"),
        };
        // SAFETY: nobody else can see the fresh mapping yet, and each mutex is set up once.
        unsafe {
            map.append_lock.init()?;
            map.flush_lock.init()?;
        }
        Ok(map)
    }
}

impl Deref for SharedMap {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        // SAFETY: the mapping lives as long as `self`, and `Shared` is only ever accessed
        // through shared references (its fields are atomics and `UnsafeCell`s).
        unsafe { self.ptr.as_ref() }
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // Unmaps this process's view only; other processes keep theirs. The mutexes are not
        // destroyed: another process may still use them.
        // SAFETY: the mapping was made by `new` with this size, and no reference into it
        // outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), size_of::<Shared>()) };
    }
}

/// A process-shared, robust, error-checking pthread mutex, living in the shared mapping.
#[repr(transparent)]
pub struct RobustMutex(UnsafeCell<libc::pthread_mutex_t>);

impl RobustMutex {
    /// # Safety
    /// Once, before any use, while no other thread or process can reach the mutex.
    unsafe fn init(&self) -> io::Result<()> {
        let mut attr = MaybeUninit::<libc::pthread_mutexattr_t>::uninit();
        // SAFETY: the attribute object is initialised by the first call before any other use
        // and destroyed once; the mutex memory is ours alone (the caller's contract).
        unsafe {
            check(libc::pthread_mutexattr_init(attr.as_mut_ptr()))?;
            let attr = attr.as_mut_ptr();
            let result = check(libc::pthread_mutexattr_setpshared(
                attr,
                libc::PTHREAD_PROCESS_SHARED,
            ))
            .and_then(|()| {
                check(libc::pthread_mutexattr_setrobust(
                    attr,
                    libc::PTHREAD_MUTEX_ROBUST,
                ))
            })
            // Error-checking: a thread that calls `begin` while it already holds a `Tx` gets
            // EDEADLK instead of deadlocking.
            .and_then(|()| {
                check(libc::pthread_mutexattr_settype(
                    attr,
                    libc::PTHREAD_MUTEX_ERRORCHECK,
                ))
            })
            .and_then(|()| check(libc::pthread_mutex_init(self.0.get(), attr)));
            libc::pthread_mutexattr_destroy(attr);
            result
        }
    }

    pub fn lock(&self) -> io::Result<Guard<'_>> {
        // SAFETY: an initialised mutex in a live mapping.
        let rc = unsafe { libc::pthread_mutex_lock(self.0.get()) };
        self.acquired(rc)
    }

    /// `None` if another thread holds it.
    pub fn try_lock(&self) -> io::Result<Option<Guard<'_>>> {
        // SAFETY: an initialised mutex in a live mapping.
        let rc = unsafe { libc::pthread_mutex_trylock(self.0.get()) };
        if rc == libc::EBUSY {
            return Ok(None);
        }
        self.acquired(rc).map(Some)
    }

    fn acquired(&self, rc: libc::c_int) -> io::Result<Guard<'_>> {
        let owner_died = match rc {
            0 => false,
            libc::EOWNERDEAD => true,
            libc::ENOTRECOVERABLE => {
                return Err(io::Error::other(
                    "journal lock unrecoverable: a holder died and its repair did not finish",
                ));
            }
            rc => return Err(io::Error::from_raw_os_error(rc)),
        };
        Ok(Guard {
            mutex: self,
            owner_died,
            _not_send: PhantomData,
        })
    }
}

/// A held [`RobustMutex`]; unlocks on drop. Not `Send`: the locking thread must unlock.
pub struct Guard<'m> {
    mutex: &'m RobustMutex,
    /// The previous holder died holding the lock: whatever it protects may be half updated.
    /// Repair it, then call [`Guard::mark_consistent`].
    pub owner_died: bool,
    _not_send: PhantomData<*const ()>,
}

impl Guard<'_> {
    pub fn mark_consistent(&mut self) {
        if self.owner_died {
            // SAFETY: we hold the mutex (it returned EOWNERDEAD to us).
            unsafe { libc::pthread_mutex_consistent(self.mutex.0.get()) };
            self.owner_died = false;
        }
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        // Unlocking with `owner_died` still set leaves the mutex unrecoverable: every later
        // locker gets ENOTRECOVERABLE, which is the right end for a repair that never ran.
        // SAFETY: we hold the mutex, and this is the thread that locked it (Guard is !Send).
        unsafe { libc::pthread_mutex_unlock(self.mutex.0.get()) };
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// Blocks while `*word == expected`, at most `timeout` (`None`: no limit). May return early
/// (a wake-up, a signal, or the word already differing): callers re-check their condition.
/// Not FUTEX_PRIVATE: the word is in a shared mapping and the wake may come from another process.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: FUTEX_WAIT only reads the word (a live AtomicU32) and the timespec.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
            ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wakes every thread, in any process, blocked in [`futex_wait`] on `word`.
pub fn futex_wake_all(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE does not access memory beyond hashing the word's address.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            ptr::null::<libc::timespec>(),
            ptr::null::<u32>(),
            0u32,
        );
    }
}
