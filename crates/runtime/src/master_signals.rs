//! A forking master's signals (prefork, process-per-connection). Each handler only sets its
//! signal's flag and writes a byte to a socket pair; the master's loop sleeps in poll(2) on the
//! other end (the self-pipe trick), so a signal that arrives between looking at the flags and
//! going to sleep still wakes it. The master blocks the set ([`signal_set`]) across a fork,
//! and the new process unblocks it once its own handlers are in place.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use signal_hook::SigId;

pub struct MasterSignals {
    signals: &'static [libc::c_int],
    /// One per signal, in the order of `signals`.
    flags: Vec<Arc<AtomicBool>>,
    ids: Vec<SigId>,
    wake: Option<UnixStream>,
}

impl MasterSignals {
    pub fn install(signals: &'static [libc::c_int]) -> io::Result<MasterSignals> {
        let (wake, notify) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        let flags: Vec<_> = signals.iter().map(|_| Arc::default()).collect();
        let mut ids = Vec::new();
        for (&signal, flag) in signals.iter().zip(&flags) {
            // The flag first: it is set by the time the byte wakes the loop.
            ids.push(signal_hook::flag::register(signal, Arc::clone(flag))?);
            ids.push(signal_hook::low_level::pipe::register(
                signal,
                notify.try_clone()?,
            )?);
        }
        Ok(MasterSignals {
            signals,
            flags,
            ids,
            wake: Some(wake),
        })
    }

    /// Whether `signal` arrived since the last look, clearing it.
    pub fn take(&self, signal: libc::c_int) -> bool {
        let i = self.signals.iter().position(|&s| s == signal);
        i.is_some_and(|i| self.flags[i].swap(false, Ordering::SeqCst))
    }

    /// Sleeps until a signal arrives, `also` (a listening socket, if any) is readable, or
    /// `timeout` passes.
    pub fn sleep(&self, timeout: Duration, also: Option<BorrowedFd<'_>>) {
        let Some(wake) = &self.wake else {
            return;
        };
        let timeout = PollTimeout::try_from(timeout.max(Duration::from_millis(1)))
            .unwrap_or(PollTimeout::MAX);
        let mut fds = vec![PollFd::new(wake.as_fd(), PollFlags::POLLIN)];
        if let Some(fd) = also {
            fds.push(PollFd::new(fd, PollFlags::POLLIN));
        }
        // EINTR: a signal arrived, which is one of the things we wait for.
        let _ = nix::poll::poll(&mut fds, timeout);
        let signalled = fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN));
        if signalled {
            let mut drain = [0u8; 64];
            while matches!(io::Read::read(&mut &*wake, &mut drain), Ok(n) if n > 0) {}
        }
    }

    /// In a newly forked process: the master's handlers and self-pipe are none of its business.
    pub fn leave(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
        self.wake = None;
    }
}

/// `signals` as a set, to block across a fork and unblock in the new process.
pub fn signal_set(signals: &[libc::c_int]) -> SigSet {
    let mut set = SigSet::empty();
    for &signal in signals {
        if let Ok(signal) = Signal::try_from(signal) {
            set.add(signal);
        }
    }
    set
}
