//! The journal's promises across a crash, for the one-process server (prefork runs the same
//! checks across processes): acknowledged writes survive kill -9, with `--commit sync` and
//! `--commit async` alike (a kill loses nothing that reached write(2): it is in the page
//! cache); damaged logs are recovered as the journal specifies.

const BIN: &str = env!("CARGO_BIN_EXE_single-thread");

#[test]
fn acked_writes_survive_kill_9_with_sync_commit() {
    let (recovery, acked) = blackbox::checks::acked_writes_survive_kill_9(BIN, &[], "sync");
    eprintln!("{acked} acknowledged before the kill; after it: {recovery}");
}

#[test]
fn acked_writes_survive_kill_9_with_async_commit() {
    let (recovery, acked) = blackbox::checks::acked_writes_survive_kill_9(BIN, &[], "async");
    eprintln!("{acked} acknowledged before the kill; after it: {recovery}");
}

#[test]
fn damaged_logs_are_recovered_or_refused() {
    blackbox::checks::recovery_of_damaged_logs(BIN, &[]);
}
