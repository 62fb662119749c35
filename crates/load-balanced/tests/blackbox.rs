//! The shared black-box suite, in both modes: every request through a worker (the default), and
//! cheap requests answered on the dispatch thread with workers that sleep at once.

const BIN: &str = env!("CARGO_BIN_EXE_load-balanced");

blackbox::suite!(BIN, ["--workers", "2"]);

mod inline_cheap_spin_0 {
    blackbox::suite!(
        super::BIN,
        ["--workers", "2", "--inline-cheap", "--spin-us", "0"]
    );
}
