//! The journal's promises across a crash of the master and every worker at once (SIGKILL to
//! the process group): acknowledged writes survive, with sync and async commit; damaged logs
//! are recovered as the journal specifies.

const BIN: &str = env!("CARGO_BIN_EXE_prefork");

#[test]
fn acked_writes_survive_kill_9_with_sync_commit() {
    let (recovery, acked) =
        blackbox::checks::acked_writes_survive_kill_9(BIN, &["--workers", "3"], "sync");
    eprintln!("{acked} acknowledged before the kill; after it: {recovery}");
}

#[test]
fn acked_writes_survive_kill_9_with_async_commit() {
    let (recovery, acked) =
        blackbox::checks::acked_writes_survive_kill_9(BIN, &["--workers", "3"], "async");
    eprintln!("{acked} acknowledged before the kill; after it: {recovery}");
}

#[test]
fn damaged_logs_are_recovered_or_refused() {
    blackbox::checks::recovery_of_damaged_logs(BIN, &["--workers", "2"]);
}
