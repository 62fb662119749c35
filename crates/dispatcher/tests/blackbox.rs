//! The shared black-box suite against the dispatcher, under both policies.

blackbox::suite!(env!("CARGO_BIN_EXE_dispatcher"), ["--workers", "4"]);

mod least_connections {
    blackbox::suite!(
        env!("CARGO_BIN_EXE_dispatcher"),
        ["--workers", "4", "--policy", "least-connections"]
    );
}
