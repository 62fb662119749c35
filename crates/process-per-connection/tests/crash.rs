//! The journal's promises across a crash, with a process per connection: acknowledged writes
//! survive kill -9 of the whole process group (the master, the jobs process and every
//! connection's child) under load, with `--commit sync` and `--commit async`; damaged logs: a
//! torn end is cut and reported in one line, damage in the middle stops the server at
//! start-up, naming the file and the offset.

const BIN: &str = env!("CARGO_BIN_EXE_process-per-connection");

blackbox::crash_suite!(BIN, []);
