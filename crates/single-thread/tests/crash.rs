//! The journal's promises across a crash, for the one-process server (prefork runs the same
//! checks across processes): acknowledged writes survive kill -9, with `--commit sync` and
//! `--commit async` alike (a kill loses nothing that reached write(2): it is in the page
//! cache); damaged logs are recovered as the journal specifies.

const BIN: &str = env!("CARGO_BIN_EXE_single-thread");

blackbox::crash_suite!(BIN, []);
