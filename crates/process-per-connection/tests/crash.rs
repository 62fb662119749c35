//! The journal's promises across a crash, with a process per connection: acknowledged writes
//! survive kill -9 of the whole process group (the master, the jobs process and every
//! connection's child) under load, with `--commit sync` and `--commit async`; damaged logs: a
//! torn end is cut and reported in one line, damage in the middle stops the server at
//! start-up, naming the file and the offset.

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
