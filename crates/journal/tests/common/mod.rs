//! A scratch directory under the target dir (a real disk: fdatasync there costs what it costs
//! in production, which the group-commit test relies on), removed on drop.

#![allow(dead_code)] // each test binary uses its own part

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use journal::{Config, Journal, Record};

pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "journal-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        Scratch(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A config with small segments, so that tests roll and retain.
    pub fn config(&self, segment_bytes: u64, retain_bytes: u64) -> Config {
        Config {
            dir: self.0.clone(),
            segment_bytes,
            retain_bytes,
        }
    }

    /// 64 KiB segments (quick to preallocate and to scan on reopen), nothing deleted.
    pub fn small(&self) -> Config {
        self.config(64 << 10, 1 << 30)
    }

    /// The segment files, oldest first.
    pub fn segments(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        files.sort();
        files
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Every retained record after `after`, as (seq, kind, payload).
pub fn read_all(j: &Journal, after: u64) -> Vec<(u64, u8, Vec<u8>)> {
    let mut out = Vec::new();
    j.read_after(after, usize::MAX, |r: Record<'_>| {
        out.push((r.seq, r.kind, r.payload.to_vec()))
    })
    .unwrap();
    out
}

/// The size of the frame holding `payload_len` bytes.
pub fn frame_len(payload_len: usize) -> u64 {
    17 + payload_len as u64
}
