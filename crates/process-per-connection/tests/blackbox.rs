//! The shared black-box suite against the process-per-connection server, with its defaults:
//! up to 1024 connection children, more than the suite's 200 concurrent clients need.

blackbox::suite!(env!("CARGO_BIN_EXE_process-per-connection"));
