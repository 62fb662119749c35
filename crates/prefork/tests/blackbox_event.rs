//! The shared black-box suite against prefork in event mode (nginx): four worker processes,
//! each an epoll loop on the inherited listening socket.

blackbox::suite!(
    env!("CARGO_BIN_EXE_prefork"),
    ["--mode", "event", "--workers", "4"]
);
