//! The shared black-box suite against prefork in blocking mode (Apache prefork): each worker
//! process serves one connection at a time, so there are as many workers as the suite's checks
//! hold keep-alive connections open at once (the SIGTERM check: 8 load clients, 4 in-flight
//! requests and a spare); the other connections wait in the kernel's accept queue.

blackbox::suite!(
    env!("CARGO_BIN_EXE_prefork"),
    ["--mode", "blocking", "--workers", "16"]
);
