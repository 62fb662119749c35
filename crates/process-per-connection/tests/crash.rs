//! The journal's promises across a crash of the master and every child at once (SIGKILL to
//! the process group), with 50 clients posting, so 50 connection children appending: every
//! acknowledged write survives, with sync and async commit; damaged logs are recovered as the
//! journal specifies.

const BIN: &str = env!("CARGO_BIN_EXE_process-per-connection");

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
