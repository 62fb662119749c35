//! The shared black-box suite against the multi-acceptor, with the listener shared plainly
//! (every worker wakes) and with EPOLLEXCLUSIVE.

blackbox::suite!(env!("CARGO_BIN_EXE_multi-acceptor"), ["--workers", "4"]);

mod exclusive {
    blackbox::suite!(
        env!("CARGO_BIN_EXE_multi-acceptor"),
        ["--workers", "4", "--exclusive"]
    );
}
