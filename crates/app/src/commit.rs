//! When a write is acknowledged. `--commit sync`: once fdatasync covers it. One committer
//! thread per process syncs for every request waiting in it, and the journal's group commit
//! shares each fdatasync between processes too (Postgres's XLogFlush): one flush acknowledges
//! every write made before it. `--commit async`: at once, after write(2); a flusher syncs every
//! `--commit-delay` (Postgres's wal_writer_delay), so a kill -9 loses nothing written (it is in
//! the page cache) but a power cut can lose up to that much.

use std::io;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::hub::lock;
use crate::{App, AppArgs, Commit};

pub(crate) struct Committer {
    mode: Commit,
    delay: Duration,
    /// The highest seq a request waits to see durable.
    wanted: Mutex<u64>,
    more: Condvar,
}

impl Committer {
    pub fn new(args: &AppArgs) -> Committer {
        Committer {
            mode: args.commit,
            delay: args.commit_delay,
            wanted: Mutex::new(0),
            more: Condvar::new(),
        }
    }

    /// Whether acknowledgements wait for durability.
    pub fn waits(&self) -> bool {
        self.mode == Commit::Sync
    }

    /// A request waits for `seq` to be durable: wake the committer.
    pub fn want(&self, seq: u64) {
        let mut wanted = lock(&self.wanted);
        if seq > *wanted {
            *wanted = seq;
            self.more.notify_one();
        }
    }
}

pub(crate) fn start(app: &App) -> io::Result<()> {
    let app = app.clone();
    let name = match app.inner.commit.mode {
        Commit::Sync => "committer",
        Commit::Async => "flusher",
    };
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || match app.inner.commit.mode {
            Commit::Sync => commit_on_demand(&app),
            Commit::Async => flush_periodically(&app),
        })?;
    Ok(())
}

/// Sleeps until a request waits for durability, then makes everything written so far durable
/// in one fdatasync and tells the hub, whose subscribers answer every request it covered.
fn commit_on_demand(app: &App) {
    let (c, journal) = (&app.inner.commit, app.journal());
    loop {
        let mut wanted = lock(&c.wanted);
        while *wanted <= journal.durable() {
            wanted = c.more.wait(wanted).unwrap_or_else(|e| e.into_inner());
        }
        drop(wanted);
        sync_or_die(app);
        app.hub().notify();
    }
}

fn flush_periodically(app: &App) {
    let (c, journal) = (&app.inner.commit, app.journal());
    loop {
        std::thread::sleep(c.delay);
        if journal.head() > journal.durable() {
            sync_or_die(app);
        }
    }
}

/// An fdatasync error is fatal: the kernel may have dropped the pages it could not write, so
/// a retry that succeeds would lie (Postgres's "fsyncgate"). The process exits with 2, which a
/// prefork master takes as "do not respawn".
fn sync_or_die(app: &App) {
    let journal = app.journal();
    if let Err(e) = journal.sync_to(journal.head()) {
        eprintln!(
            "{}: making the journal durable failed: {e}; no write can be promised any more, exiting",
            app.inner.pattern
        );
        std::process::exit(2);
    }
}
