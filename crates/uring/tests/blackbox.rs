//! The shared black-box suite against the io_uring server, with 2 rings.

blackbox::suite!(env!("CARGO_BIN_EXE_uring"), ["--workers", "2"]);
