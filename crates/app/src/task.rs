//! Slow work a request can ask for: the pattern decides which thread pays for it.

use std::time::Duration;

use proto::Response;

pub const MAX_WORK_US: u64 = 1_000_000;
pub const MAX_BLOCK_MS: u64 = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// Burn this many microseconds of CPU.
    Work { us: u64 },
    /// Sleep this many milliseconds, holding the thread.
    Block { ms: u64 },
}

impl Task {
    pub fn run(self) -> Response {
        match self {
            Task::Work { us } => {
                let (rounds, digest) = burn_cpu(Duration::from_micros(us), || false);
                let body = format!("worked {us} us: {rounds} hash rounds, digest {digest:016x}\n");
                Response::owned(200, "text/plain", body.into_bytes())
            }
            Task::Block { ms } => {
                std::thread::sleep(Duration::from_millis(ms));
                Response::owned(200, "text/plain", format!("blocked {ms} ms\n").into_bytes())
            }
        }
    }
}

/// Hashes until this thread has used `cpu` of CPU time (not wall time: a preempted worker still
/// does the full amount of work), or until `stop` says so (it is asked every ~256 rounds).
/// Returns the rounds done and the digest.
pub(crate) fn burn_cpu(cpu: Duration, stop: impl Fn() -> bool) -> (u64, u64) {
    let start = thread_cpu_time();
    let mut digest = 0x9e37_79b9_7f4a_7c15_u64;
    let mut rounds = 0u64;
    while thread_cpu_time() - start < cpu && !stop() {
        for _ in 0..256 {
            // splitmix64: cheap, and the optimizer cannot skip it since the digest is printed.
            digest = digest.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = digest;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            digest ^= z ^ (z >> 31);
        }
        rounds += 256;
    }
    (rounds, digest)
}

fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
