//! The journal across processes, as a prefork server uses it: opened once, then forked.
//!
//! Its own test binary with `harness = false`: the process that forks has exactly one thread,
//! so a child inherits no lock another thread held (the allocator's included) and may run
//! ordinary code. Children use the journal, then leave through `libc::_exit`. Every child is
//! killed and reaped if its test fails.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use common::{Scratch, frame_len, read_all};
use journal::Journal;

fn main() {
    let tests: &[(&str, fn())] = &[
        (
            "children_append_concurrently_and_everyone_sees_everything",
            children_append_concurrently_and_everyone_sees_everything,
        ),
        (
            "a_childs_append_wakes_the_parent",
            a_childs_append_wakes_the_parent,
        ),
        (
            "an_appender_killed_mid_frame_is_repaired",
            an_appender_killed_mid_frame_is_repaired,
        ),
        (
            "an_appender_killed_after_a_roll_is_repaired",
            an_appender_killed_after_a_roll_is_repaired,
        ),
    ];
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let mut passed = 0;
    for (name, test) in tests {
        if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        println!("test {name} ...");
        test();
        println!("test {name} ... ok");
        passed += 1;
    }
    println!("\n{passed} passed, 0 failed");
}

/// A forked child, killed (SIGKILL) and reaped on drop unless waited for.
struct Child {
    pid: libc::pid_t,
}

/// Runs `f` in a child process; its return value is the child's exit status (a panic: 101).
fn fork(f: impl FnOnce() -> i32) -> Child {
    // SAFETY: this process has one thread (see the header), so the child starts from a
    // consistent copy of everything.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let code = catch_unwind(AssertUnwindSafe(f)).unwrap_or(101);
        // SAFETY: leaves at once, running no destructor and no atexit handler of the parent's.
        unsafe { libc::_exit(code) };
    }
    Child { pid }
}

impl Child {
    /// Waits for the child to exit; returns its exit status.
    fn wait(mut self) -> i32 {
        let status = self.reap();
        assert!(libc::WIFEXITED(status), "child died: status {status:#x}");
        libc::WEXITSTATUS(status)
    }

    fn kill(mut self) {
        // SAFETY: our own child, not yet reaped, so the pid is still ours.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        let status = self.reap();
        assert!(libc::WIFSIGNALED(status));
    }

    fn reap(&mut self) -> i32 {
        let mut status = 0;
        // SAFETY: waits for our own child.
        let rc = unsafe { libc::waitpid(self.pid, &mut status, 0) };
        assert_eq!(rc, self.pid);
        self.pid = 0;
        status
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.pid > 0 {
            // SAFETY: our own child, not yet reaped.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                libc::waitpid(self.pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

/// A pipe a child writes one byte to when it has reached a point; the parent blocks on it.
struct Signal {
    read: libc::c_int,
    write: libc::c_int,
}

impl Signal {
    fn new() -> Signal {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into the array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        Signal {
            read: fds[0],
            write: fds[1],
        }
    }

    fn send(&self) {
        // SAFETY: one byte from a live buffer to our pipe.
        assert_eq!(
            unsafe { libc::write(self.write, [1u8].as_ptr().cast(), 1) },
            1
        );
    }

    /// In the parent: blocks until the child sent (true) or exited without sending (false).
    fn received(self) -> bool {
        let mut b = 0u8;
        // SAFETY: closes the parent's write end (so a dead child means EOF), then reads one
        // byte into a live buffer.
        unsafe {
            libc::close(self.write);
            let n = libc::read(self.read, (&mut b as *mut u8).cast(), 1);
            libc::close(self.read);
            n == 1
        }
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes into a live timespec. CLOCK_MONOTONIC is one clock for every process.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn children_append_concurrently_and_everyone_sees_everything() {
    let dir = Scratch::new("procs");
    // Small segments: the processes roll segments under each other.
    let (j, _) = Journal::open(dir.config(4096, 1 << 30)).unwrap();
    const WRITERS: u64 = 4;
    const EACH: u64 = 300;
    let record = |w: u64, i: u64| (w * EACH + i).to_le_bytes();
    let children: Vec<Child> = (1..WRITERS)
        .map(|w| {
            let j = &j;
            fork(move || {
                for i in 0..EACH {
                    let seq = j.append(w as u8, &record(w, i)).unwrap();
                    if i % 10 == 0 {
                        j.sync_to(seq).unwrap();
                        assert!(j.durable() >= seq);
                    }
                }
                0
            })
        })
        .collect();
    // The parent is writer 0.
    for i in 0..EACH {
        j.append(0, &record(0, i)).unwrap();
    }
    for child in children {
        assert_eq!(child.wait(), 0);
    }
    let total = WRITERS * EACH;
    assert_eq!(j.head(), total);
    let stats = j.stats();
    assert_eq!(stats.appends, total);
    assert!(stats.segments_rolled > 5);
    let check = |records: Vec<(u64, u8, Vec<u8>)>| {
        let seqs: Vec<u64> = records.iter().map(|r| r.0).collect();
        assert_eq!(seqs, (1..=total).collect::<Vec<_>>());
        let mut next = [0u64; WRITERS as usize];
        for (_, w, data) in records {
            let w = w as u64;
            assert_eq!(data, record(w, next[w as usize]));
            next[w as usize] += 1;
        }
        assert_eq!(next, [EACH; WRITERS as usize]);
    };
    // The parent reads what the children wrote.
    check(read_all(&j, 0));
    // A new child reads it all too, through its inherited index.
    let reader = fork(|| {
        check(read_all(&j, 0));
        0
    });
    assert_eq!(reader.wait(), 0);
}

fn a_childs_append_wakes_the_parent() {
    let dir = Scratch::new("wake");
    let (j, _) = Journal::open(dir.small()).unwrap();
    let mut latencies = Vec::new();
    for _ in 0..5 {
        let seen = j.generation();
        let child = fork(|| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while j.stats().watchers == 0 {
                if Instant::now() > deadline {
                    return 2; // the parent never waited
                }
                std::hint::spin_loop();
            }
            j.append(0, &monotonic_ns().to_le_bytes()).unwrap();
            0
        });
        let now = j.wait_for_change(seen, Duration::from_secs(10));
        let woke = monotonic_ns();
        assert_ne!(now, seen, "not woken within 10 s");
        let mut sent = 0;
        j.read_after(j.head() - 1, 1, |r| {
            sent = u64::from_le_bytes(r.payload.try_into().unwrap())
        })
        .unwrap();
        latencies.push(Duration::from_nanos(woke.saturating_sub(sent)));
        assert_eq!(child.wait(), 0);
    }
    latencies.sort();
    println!("  append in a child -> parent awake: {latencies:?}");
    // Typically tens of microseconds; the bound leaves room for a busy machine.
    assert!(latencies[2] < Duration::from_millis(100), "{latencies:?}");
}

/// The first `n` records, 100-byte frames, and a child that appends `unpublished` records in a
/// Tx, writes half a frame after them, and is SIGKILLed holding the lock.
fn kill_mid_tx(j: &Journal, dir: &Scratch, unpublished: u64) {
    let body = [5u8; 83];
    let signal = Signal::new();
    let child = fork(|| {
        let mut tx = j.begin().unwrap();
        for _ in 0..unpublished {
            tx.append(9, &body).unwrap();
        }
        // Half of one more frame, where the next record would go.
        let seg = dir.segments().pop().unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        let at = (tx.last_seq() - seg_base(&seg) + 1) * 100;
        std::os::unix::fs::FileExt::write_all_at(&file, &[0xAB; 50], at).unwrap();
        signal.send();
        loop {
            // SAFETY: waits for a signal; SIGKILL ends it.
            unsafe { libc::pause() };
        }
    });
    assert!(signal.received(), "the child failed before the kill");
    child.kill();
}

fn seg_base(path: &std::path::Path) -> u64 {
    path.file_stem().unwrap().to_str().unwrap().parse().unwrap()
}

fn an_appender_killed_mid_frame_is_repaired() {
    let dir = Scratch::new("kill");
    let config = dir.config(1 << 20, 1 << 30);
    let (j, _) = Journal::open(config.clone()).unwrap();
    let body = [1u8; 83];
    for _ in 0..10 {
        j.append(1, &body).unwrap();
    }
    kill_mid_tx(&j, &dir, 1);
    // The dead child's record was never published.
    assert_eq!(j.head(), 10);
    assert_eq!(j.stats().lock_repairs, 0);
    // The next appender repairs: its record goes where the dead one's went (shorter, so the
    // rest of the dead frame must be gone too).
    assert_eq!(j.append(2, b"after").unwrap(), 11);
    assert_eq!(j.stats().lock_repairs, 1);
    let records = read_all(&j, 0);
    assert_eq!(records.len(), 11);
    assert_eq!(records[10], (11, 2, b"after".to_vec()));
    drop(j);
    // Nothing of the dead child is left on disk: a clean recovery, no torn tail.
    let (j, rec) = Journal::open(config).unwrap();
    assert_eq!((rec.last_seq, &rec.torn), (11, &None), "{rec}");
    assert_eq!(read_all(&j, 10), vec![(11, 2, b"after".to_vec())]);
}

fn an_appender_killed_after_a_roll_is_repaired() {
    let dir = Scratch::new("kill-roll");
    // 100-byte frames, 10 per segment.
    let config = dir.config(1000, 1 << 30);
    let (j, _) = Journal::open(config.clone()).unwrap();
    let body = [1u8; 83];
    for _ in 0..15 {
        j.append(1, &body).unwrap();
    }
    // The child fills segment 11 (16..=20), rolls to segment 21 for record 21, writes half a
    // frame after it, and dies.
    kill_mid_tx(&j, &dir, 6);
    assert_eq!(j.head(), 15);
    assert_eq!(dir.segments().len(), 3);
    assert_eq!(j.append(2, &body).unwrap(), 16);
    // The unpublished segment is gone; record 16 went into segment 11, after record 15.
    let names: Vec<u64> = dir.segments().iter().map(|p| seg_base(p)).collect();
    assert_eq!(names, [1, 11]);
    for _ in 17..=25 {
        j.append(3, &body).unwrap();
    }
    let records = read_all(&j, 0);
    assert_eq!(records.len(), 25);
    assert!(
        records[15..].iter().all(|r| r.1 != 9),
        "a dead record came back"
    );
    drop(j);
    let (_, rec) = Journal::open(config).unwrap();
    assert_eq!(
        (rec.last_seq, rec.segments, &rec.torn),
        (25, 3, &None),
        "{rec}"
    );
    assert_eq!(frame_len(body.len()), 100);
}
