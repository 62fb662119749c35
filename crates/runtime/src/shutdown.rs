//! SIGTERM/SIGINT as an ordinary event: a handler that only writes to a pipe (signal-hook),
//! read by whichever loop owns the signals, which then wakes every other loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::event_loop::LoopHandle;

#[derive(Default)]
pub struct Shutdown {
    requested: AtomicBool,
    loops: Mutex<Vec<Arc<LoopHandle>>>,
}

impl Shutdown {
    pub fn new() -> Arc<Shutdown> {
        Arc::default()
    }

    /// Wake this loop when shutdown begins.
    pub fn register(&self, handle: Arc<LoopHandle>) {
        self.loops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle);
        // A loop registered after the signal must still see it.
        if self.is_requested() {
            self.trigger();
        }
    }

    pub fn trigger(&self) {
        self.requested.store(true, Ordering::SeqCst);
        for handle in self.loops.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            handle.wake();
        }
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Relaxed)
    }
}

/// The signals that mean "finish what you are doing and exit 0".
pub const STOP_SIGNALS: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGINT];
