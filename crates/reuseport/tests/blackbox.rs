//! The shared black-box suite against the reuseport server, with 4 listening sockets.

blackbox::suite!(env!("CARGO_BIN_EXE_reuseport"), ["--workers", "4"]);
