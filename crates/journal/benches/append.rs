//! Appends per second, 1 and 50 threads, synchronous (`sync_to` after each append: the caller
//! is acknowledged only once its record is on disk, group commit shared with the other
//! threads) and asynchronous (no sync: the kernel writes back when it likes).
//!
//! `cargo bench -p journal` runs every scenario; `cargo bench -p journal -- sync` only those
//! whose name contains `sync`. The log goes under the target dir (a real disk: fdatasync there
//! costs what it costs); `JOURNAL_BENCH_DIR=/path` puts it elsewhere. Records carry 100-byte
//! payloads, as a small job or message record would.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use journal::{Config, Journal};

const RUN: Duration = Duration::from_secs(3);
const PAYLOAD: usize = 100;

struct Scenario {
    name: &'static str,
    threads: usize,
    sync: bool,
}

fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let scenarios = [
        Scenario {
            name: "sync, 1 thread",
            threads: 1,
            sync: true,
        },
        Scenario {
            name: "sync, 50 threads",
            threads: 50,
            sync: true,
        },
        Scenario {
            name: "async, 1 thread",
            threads: 1,
            sync: false,
        },
        Scenario {
            name: "async, 50 threads",
            threads: 50,
            sync: false,
        },
    ];
    println!(
        "{:<20} {:>12} {:>11} {:>13} {:>9} {:>9}",
        "scenario", "appends/s", "fdatasyncs", "appends/sync", "p50 us", "p99 us"
    );
    for s in &scenarios {
        if filter
            .as_ref()
            .is_some_and(|f| !s.name.contains(f.as_str()))
        {
            continue;
        }
        run(s);
    }
}

fn run(s: &Scenario) {
    let dir = std::env::var_os("JOURNAL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")))
        .join(format!("journal-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config = Config {
        dir: dir.clone(),
        segment_bytes: 64 << 20,
        retain_bytes: 256 << 20,
    };
    let (j, _) = Journal::open(config.clone()).expect("open");
    let j = Arc::new(j);
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(s.threads + 1));
    let workers: Vec<_> = (0..s.threads)
        .map(|t| {
            let (j, stop, start) = (j.clone(), stop.clone(), start.clone());
            let sync = s.sync;
            thread::spawn(move || {
                let payload = [t as u8; PAYLOAD];
                let mut latencies_ns = Vec::with_capacity(1 << 16);
                start.wait();
                while !stop.load(Ordering::Relaxed) {
                    let t0 = Instant::now();
                    let seq = j.append(1, &payload).expect("append");
                    if sync {
                        j.sync_to(seq).expect("sync_to");
                    }
                    latencies_ns.push(t0.elapsed().as_nanos() as u64);
                }
                latencies_ns
            })
        })
        .collect();
    start.wait();
    let before = j.stats();
    let t0 = Instant::now();
    thread::sleep(RUN);
    stop.store(true, Ordering::Relaxed);
    let mut latencies: Vec<u64> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let elapsed = t0.elapsed();
    let after = j.stats();
    latencies.sort_unstable();
    let appends = after.appends - before.appends;
    let fdatasyncs = after.fdatasyncs - before.fdatasyncs;
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    println!(
        "{:<20} {:>12.0} {:>11} {:>13.1} {:>9.1} {:>9.1}",
        s.name,
        appends as f64 / elapsed.as_secs_f64(),
        fdatasyncs,
        appends as f64 / fdatasyncs.max(1) as f64,
        pct(0.50),
        pct(0.99),
    );
    drop(j);
    // What the next start-up pays: recovery reads and checks every retained segment.
    let t0 = Instant::now();
    let (_, recovery) = Journal::open(config).expect("reopen");
    println!(
        "  reopen {:.0} ms: {recovery}",
        t0.elapsed().as_secs_f64() * 1e3
    );
    let _ = std::fs::remove_dir_all(&dir);
}
