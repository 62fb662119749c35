//! Per-worker counters, read by `GET /stats`. Workers only ever add to their own slot, with
//! relaxed atomics: the counts are for people, not for synchronisation.

use std::fmt::Write;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// Counters a pattern may add to each worker's slot (named by the pattern).
pub const EXTRA_COUNTERS: usize = 4;

/// One worker's counters. `repr(C)` and atomics only, so that a prefork master can place the
/// slots in memory shared with its worker processes.
#[repr(C)]
#[derive(Default, Debug)]
pub struct WorkerStats {
    pub pid: AtomicU32,
    /// The worker's thread id (0 until [`WorkerStats::bind_thread`]): `/stats` reads its
    /// context switches from `/proc/PID/task/TID/status`.
    pub tid: AtomicU32,
    pub accepted: AtomicU64,
    pub open: AtomicU64,
    pub requests: AtomicU64,
    /// Requests held right now (long polls, streams, replies waiting for a commit).
    pub held: AtomicU64,
    /// Wake-ups for a new connection that found none to accept: another worker took it. A lower
    /// bound on the herd: epoll re-checks readiness before it reports, so most loops woken for a
    /// connection already taken sleep again inside the kernel; their context switches show them.
    pub wasted_wakeups: AtomicU64,
    pub extra: [AtomicU64; EXTRA_COUNTERS],
}

impl WorkerStats {
    /// Marks the calling thread (and process) as this worker's.
    pub fn bind_thread(&self) {
        self.pid.store(std::process::id(), Relaxed);
        // SAFETY: gettid has no preconditions and cannot fail.
        self.tid.store(unsafe { libc::gettid() } as u32, Relaxed);
    }

    /// Voluntary and involuntary context switches of the worker's thread, if it is bound and alive.
    pub fn context_switches(&self) -> Option<(u64, u64)> {
        let (pid, tid) = (self.pid.load(Relaxed), self.tid.load(Relaxed));
        if tid == 0 {
            return None;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
        };
        Some((
            field("voluntary_ctxt_switches:")?,
            field("nonvoluntary_ctxt_switches:")?,
        ))
    }

    pub fn connection_opened(&self) {
        self.accepted.fetch_add(1, Relaxed);
        self.open.fetch_add(1, Relaxed);
    }

    pub fn connection_closed(&self) {
        self.open.fetch_sub(1, Relaxed);
    }

    pub fn request(&self) {
        self.requests.fetch_add(1, Relaxed);
    }

    pub fn hold(&self) {
        self.held.fetch_add(1, Relaxed);
    }

    pub fn release(&self) {
        self.held.fetch_sub(1, Relaxed);
    }

    pub fn wasted_wakeup(&self) {
        self.wasted_wakeups.fetch_add(1, Relaxed);
    }

    /// Adds to the pattern's counter `i` (named in [`Stats::with_extra`]).
    pub fn add_extra(&self, i: usize, n: u64) {
        self.extra[i].fetch_add(n, Relaxed);
    }
}

#[derive(Debug)]
pub struct Stats {
    pattern: &'static str,
    /// The server's process: the one that created the counters. In a prefork server that is the
    /// master, though any worker process may be the one answering `/stats`.
    pid: u32,
    started: Instant,
    workers: &'static [WorkerStats],
    extra_names: &'static [&'static str],
    /// Leave out of `/stats` the slots that never served anything (see [`Stats::sparse`]).
    sparse: bool,
}

impl Stats {
    /// Counters for `workers` workers of `pattern`, living as long as the process.
    pub fn new(pattern: &'static str, workers: usize) -> Stats {
        let slots: Vec<WorkerStats> = (0..workers).map(|_| WorkerStats::default()).collect();
        Stats::with_slots(pattern, Box::leak(slots.into_boxed_slice()))
    }

    /// Counters kept in memory the caller provides (a mapping shared across processes).
    pub fn with_slots(pattern: &'static str, workers: &'static [WorkerStats]) -> Stats {
        let pid = std::process::id();
        for w in workers {
            w.pid.store(pid, Relaxed);
        }
        Stats {
            pattern,
            pid,
            started: Instant::now(),
            workers,
            extra_names: &[],
            sparse: false,
        }
    }

    /// Names the pattern's extra counters, in slot order; they appear in `/stats` by name.
    pub fn with_extra(mut self, names: &'static [&'static str]) -> Stats {
        assert!(
            names.len() <= EXTRA_COUNTERS,
            "at most {EXTRA_COUNTERS} extra counters"
        );
        self.extra_names = names;
        self
    }

    /// `/stats` lists only the slots that have served something (and the first): for a
    /// pattern with a slot per possible process, most of which may never run.
    pub fn sparse(mut self) -> Stats {
        self.sparse = true;
        self
    }

    pub fn worker(&self, i: usize) -> &'static WorkerStats {
        &self.workers[i]
    }

    pub fn workers(&self) -> &'static [WorkerStats] {
        self.workers
    }

    /// The `/stats` document; `more` is inserted at its top level (`"key":value,...`).
    pub fn to_json(&self, more: &str) -> String {
        let mut s = String::with_capacity(128 + 160 * self.workers.len());
        let (mut accepted, mut open, mut requests, mut held) = (0, 0, 0, 0);
        let _ = write!(
            s,
            "{{\"pattern\":\"{}\",\"pid\":{},\"uptime_ms\":{},\"workers\":[",
            self.pattern,
            self.pid,
            self.started.elapsed().as_millis()
        );
        for (id, w) in self.workers.iter().enumerate() {
            let (a, o, r, h) = (
                w.accepted.load(Relaxed),
                w.open.load(Relaxed),
                w.requests.load(Relaxed),
                w.held.load(Relaxed),
            );
            (accepted, open, requests, held) = (accepted + a, open + o, requests + r, held + h);
            if self.sparse && id > 0 && (a, o, r, h) == (0, 0, 0, 0) {
                continue;
            }
            let sep = if id == 0 { "" } else { "," };
            let (pid, wasted) = (w.pid.load(Relaxed), w.wasted_wakeups.load(Relaxed));
            let _ = write!(
                s,
                "{sep}{{\"id\":{id},\"pid\":{pid},\"accepted\":{a},\"open\":{o},\"requests\":{r},\"held\":{h},\"wasted_wakeups\":{wasted}"
            );
            if let Some((voluntary, involuntary)) = w.context_switches() {
                let _ = write!(
                    s,
                    ",\"voluntary_csw\":{voluntary},\"involuntary_csw\":{involuntary}"
                );
            }
            for (name, v) in self.extra_names.iter().zip(&w.extra) {
                let _ = write!(s, ",\"{name}\":{}", v.load(Relaxed));
            }
            s.push('}');
        }
        let _ = write!(
            s,
            "],\"total\":{{\"accepted\":{accepted},\"open\":{open},\"requests\":{requests},\"held\":{held}}}"
        );
        if !more.is_empty() {
            s.push(',');
            s.push_str(more);
        }
        s.push_str("}\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_names_the_creating_process_and_sums_the_slots() {
        let stats = Stats::new("test", 2).with_extra(&["spawns"]);
        stats.worker(0).connection_opened();
        stats.worker(1).request();
        stats.worker(1).add_extra(0, 3);
        let json = stats.to_json("\"more\":1");
        let pid = std::process::id();
        assert!(json.contains(&format!("\"pid\":{pid},")), "{json}");
        assert!(json.contains("\"spawns\":3"), "{json}");
        assert!(
            json.contains(
                "\"total\":{\"accepted\":1,\"open\":1,\"requests\":1,\"held\":0},\"more\":1}"
            ),
            "{json}"
        );
    }
}
