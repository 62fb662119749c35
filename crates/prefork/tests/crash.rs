//! The journal's promises across a crash of the master and every worker at once (SIGKILL to
//! the process group): acknowledged writes survive, with sync and async commit; damaged logs
//! are recovered as the journal specifies.

const BIN: &str = env!("CARGO_BIN_EXE_prefork");

blackbox::crash_suite!(BIN, ["--workers", "3"]);
