//! Named threads whose failure ends the process: a server with a dead worker or acceptor would
//! serve on with a hole in it, so it exits 1 instead.

use std::io;
use std::thread::{self, JoinHandle};

/// Runs `work` on a thread named `name` (so `ps -T` shows its role). If `work` fails, the
/// process prints `PATTERN: NAME: error` and exits 1.
pub fn spawn(
    pattern: &'static str,
    name: String,
    work: impl FnOnce() -> io::Result<()> + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    thread::Builder::new().name(name.clone()).spawn(move || {
        if let Err(e) = work() {
            eprintln!("{pattern}: {name}: {e}");
            std::process::exit(1);
        }
    })
}

/// Waits for a thread to finish; a panic there is this process's error.
pub fn join(thread: JoinHandle<()>) -> io::Result<()> {
    let name = thread.thread().name().unwrap_or("a thread").to_string();
    thread
        .join()
        .map_err(|_| io::Error::other(format!("{name} panicked")))
}
