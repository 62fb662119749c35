//! A demo aid for `scripts/demo.sh cow`: an in-memory data set and Redis's BGSAVE.
//!
//! `--dataset-mb N` gives the server N MiB of "database" in 4 KiB pages. `POST /snapshot` forks
//! a child that writes the whole data set to `--snapshot-path` while the parent goes on serving,
//! and changing the data (`POST /dataset/touch?mb=M`). fork(2) copies no data: parent and child
//! share every page read-only until one of them writes to it, and then the kernel copies that
//! one page (copy-on-write). So the child sees the data as of the fork, with no lock and no copy
//! made in advance, and the memory it costs is the pages the parent changes while the child is
//! still writing.
//!
//! | request                    | reply (JSON)                                                 |
//! |----------------------------|--------------------------------------------------------------|
//! | `GET /dataset`             | size and current generation                                  |
//! | `POST /dataset/touch?mb=M` | rewrites the next M MiB of pages (round-robin) with the next generation |
//! | `POST /snapshot`           | 202: the child's pid, how long fork() took, the generation it saves; 409 while one runs |
//! | `GET /snapshot`            | the last snapshot: running, or done with its exit status     |
//!
//! Every 8-byte little-endian word of page `i` written at generation `g` holds `g << 32 | i`, so
//! the file can be checked without the server: each page whole, and none newer than the fork.
//!
//! fork() in a threaded process (the loop thread has the reaper thread below beside it, and the
//! `--offload` pool) is safe here only because the child does nothing but async-signal-safe
//! system calls (close_range, write, nanosleep, close, _exit): it never allocates, prints or
//! takes a lock that another thread might have held at the moment of the fork.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::{Request, Response};

const PAGE: usize = 4096;
const PAGES_PER_MIB: usize = (1 << 20) / PAGE;

/// One page of the data set, aligned so that it is exactly one page of memory: writing to it
/// copies one page, not two.
#[derive(Clone)]
#[repr(C, align(4096))]
struct Page([u8; PAGE]);

pub struct DataSet {
    pages: Vec<Page>,
    generation: u64,
    /// The next page `touch` rewrites.
    next: usize,
    path: PathBuf,
    /// The child sleeps this long after each MiB it writes, like Redis's `rdb-key-save-delay`,
    /// so that a demo can watch the pages being copied while the child still runs.
    delay_per_mib: Duration,
    last: Arc<Mutex<Option<Snapshot>>>,
    /// The reaper thread waits for each child, so that none stays a zombie.
    reaper: Sender<libc::pid_t>,
}

#[derive(Clone, Debug)]
struct Snapshot {
    child_pid: libc::pid_t,
    fork_us: u128,
    generation: u64,
    started: Instant,
    /// How long the child ran, and its exit code (minus the signal number if a signal killed it).
    finished: Option<(Duration, i32)>,
}

impl DataSet {
    /// `mb` MiB of pages, every one written once (generation 0), as a loaded database would be.
    pub fn new(mb: usize, path: PathBuf, delay_per_mib: Duration) -> std::io::Result<DataSet> {
        let mut pages = vec![Page([0; PAGE]); mb * PAGES_PER_MIB];
        for (i, page) in pages.iter_mut().enumerate() {
            stamp(page, 0, i);
        }
        let last = Arc::new(Mutex::new(None::<Snapshot>));
        let (reaper, pids) = channel::<libc::pid_t>();
        let record = last.clone();
        std::thread::Builder::new()
            .name("snapshot-reaper".into())
            .spawn(move || {
                for pid in pids {
                    let exit = wait_for(pid);
                    if let Some(s) = lock(&record).as_mut().filter(|s| s.child_pid == pid) {
                        s.finished = Some((s.started.elapsed(), exit));
                    }
                }
            })?;
        Ok(DataSet {
            pages,
            generation: 0,
            next: 0,
            path,
            delay_per_mib,
            last,
            reaper,
        })
    }

    /// The reply to one of the data set's requests, or `None` if the request is not one of them.
    pub fn route(&mut self, req: &Request<'_>) -> Option<Response> {
        let reply = match (req.method, req.path()) {
            ("GET", "/dataset") => json(
                200,
                format!(
                    "{{\"mb\":{},\"pages\":{},\"generation\":{}}}",
                    self.pages.len() / PAGES_PER_MIB,
                    self.pages.len(),
                    self.generation
                ),
            ),
            ("POST", "/dataset/touch") => match req.query_param("mb").map(str::parse::<usize>) {
                Some(Ok(mb)) => self.touch(mb),
                _ => Response::text(400, "expected /dataset/touch?mb=N\n"),
            },
            ("POST", "/snapshot") => self.snapshot(),
            ("GET", "/snapshot") => self.status(),
            _ => return None,
        };
        Some(reply)
    }

    /// Rewrites the next `mb` MiB of pages with a new generation. While a snapshot's child still
    /// shares them, each first write to a page costs a page fault and a 4 KiB copy.
    fn touch(&mut self, mb: usize) -> Response {
        let n = (mb * PAGES_PER_MIB).min(self.pages.len());
        let started = Instant::now();
        self.generation += 1;
        for _ in 0..n {
            let i = self.next;
            stamp(&mut self.pages[i], self.generation, i);
            self.next = (i + 1) % self.pages.len();
        }
        json(
            200,
            format!(
                "{{\"generation\":{},\"touched_pages\":{n},\"took_us\":{}}}",
                self.generation,
                started.elapsed().as_micros()
            ),
        )
    }

    /// BGSAVE: fork, and let the child write the data set as it was at the fork.
    fn snapshot(&mut self) -> Response {
        if lock(&self.last)
            .as_ref()
            .is_some_and(|s| s.finished.is_none())
        {
            return json(409, "{\"error\":\"a snapshot is already running\"}".into());
        }
        // Opened before the fork, so that a bad path is this reply's error, not a silent child's.
        let file = match File::create(&self.path) {
            Ok(f) => f,
            Err(e) => {
                let msg = format!("cannot create {}: {e}\n", self.path.display());
                return Response::owned(500, "text/plain", msg.into_bytes());
            }
        };
        let started = Instant::now();
        // SAFETY: fork has no preconditions. The child runs only `write_and_exit`, which makes
        // async-signal-safe system calls and never returns (see the module comment).
        let pid = unsafe { libc::fork() };
        let fork_us = started.elapsed().as_micros();
        match pid {
            0 => write_and_exit(file.as_raw_fd(), &self.pages, self.delay_per_mib),
            -1 => {
                let msg = format!("fork: {}\n", std::io::Error::last_os_error());
                return Response::owned(500, "text/plain", msg.into_bytes());
            }
            _ => {}
        }
        drop(file);
        *lock(&self.last) = Some(Snapshot {
            child_pid: pid,
            fork_us,
            generation: self.generation,
            started,
            finished: None,
        });
        // The reaper lives as long as the data set; if it were gone, the parent's exit reaps.
        let _ = self.reaper.send(pid);
        json(
            202,
            format!(
                "{{\"child_pid\":{pid},\"fork_us\":{fork_us},\"generation\":{},\"pages\":{},\"path\":{:?}}}",
                self.generation,
                self.pages.len(),
                self.path.display().to_string()
            ),
        )
    }

    fn status(&self) -> Response {
        let Some(s) = lock(&self.last).clone() else {
            return json(200, "{\"state\":\"none\"}".into());
        };
        let head = format!(
            "\"child_pid\":{},\"fork_us\":{},\"generation\":{}",
            s.child_pid, s.fork_us, s.generation
        );
        let body = match s.finished {
            None => format!(
                "{{\"state\":\"running\",{head},\"elapsed_ms\":{}}}",
                s.started.elapsed().as_millis()
            ),
            Some((took, exit)) => format!(
                "{{\"state\":\"{}\",{head},\"elapsed_ms\":{},\"exit\":{exit}}}",
                if exit == 0 { "done" } else { "failed" },
                took.as_millis()
            ),
        };
        json(200, body)
    }
}

/// The child: write every page to `fd`, pausing after each MiB, and exit without running any of
/// the parent's clean-up (`_exit`, not `exit`). Exit code 1 means the write failed.
fn write_and_exit(fd: RawFd, pages: &[Page], delay_per_mib: Duration) -> ! {
    close_other_descriptors(fd);
    let pause = libc::timespec {
        tv_sec: delay_per_mib.as_secs() as libc::time_t,
        tv_nsec: delay_per_mib.subsec_nanos() as libc::c_long,
    };
    let mut code = 0;
    'pages: for (i, page) in pages.iter().enumerate() {
        let mut rest: &[u8] = &page.0;
        while !rest.is_empty() {
            // SAFETY: `rest` is valid for reads of `rest.len()` bytes.
            let n = unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) };
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            if n <= 0 {
                code = 1;
                break 'pages;
            }
            rest = &rest[n as usize..];
        }
        if (i + 1) % PAGES_PER_MIB == 0 && !delay_per_mib.is_zero() {
            // SAFETY: `pause` is a valid timespec; an early wake-up only shortens the pause.
            unsafe { libc::nanosleep(&pause, std::ptr::null_mut()) };
        }
    }
    // SAFETY: close and _exit are async-signal-safe; _exit never returns.
    unsafe {
        if libc::close(fd) != 0 {
            code = 1;
        }
        libc::_exit(code)
    }
}

/// The child inherited the listening socket and every connection. Holding them open would keep
/// a connection the parent closes from being closed (no FIN until the child exits too), so
/// close all but `keep`, as Redis's child closes its listening sockets.
fn close_other_descriptors(keep: RawFd) {
    let close_range = |first: RawFd, last: libc::c_uint| {
        // SAFETY: close_range only closes descriptors; it touches no memory of ours.
        unsafe { libc::syscall(libc::SYS_close_range, first as libc::c_uint, last, 0) == 0 }
    };
    let below = keep <= 3 || close_range(3, (keep - 1) as libc::c_uint);
    let above = close_range(keep + 1, libc::c_uint::MAX);
    if !(below && above) {
        // A kernel without close_range (before 5.9): one close per possible descriptor.
        for fd in (3..65_536).filter(|&fd| fd != keep) {
            // SAFETY: closing a descriptor that is not open only returns EBADF.
            unsafe { libc::close(fd) };
        }
    }
}

/// Waits for child `pid` to exit: its exit code, or minus the signal that killed it.
fn wait_for(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid, writable int.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return -255;
        }
    }
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -libc::WTERMSIG(status)
    }
}

/// Fills page `index` with its contents at `generation`.
fn stamp(page: &mut Page, generation: u64, index: usize) {
    let word = (generation << 32 | index as u64).to_le_bytes();
    for w in page.0.chunks_exact_mut(8) {
        w.copy_from_slice(&word);
    }
}

fn json(status: u16, body: String) -> Response {
    Response::owned(status, "application/json", body.into_bytes())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_carry_their_generation_and_index() {
        let mut page = Page([0; PAGE]);
        stamp(&mut page, 3, 7);
        assert!(
            page.0
                .chunks_exact(8)
                .all(|w| u64::from_le_bytes(w.try_into().unwrap()) == 3 << 32 | 7)
        );
        assert_eq!(std::mem::align_of::<Page>(), PAGE);
        assert_eq!(std::mem::size_of::<Page>(), PAGE);
    }
}
