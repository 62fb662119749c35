//! The shared black-box suite against the single-thread server, plus the test that shows what
//! this pattern is about: one slow handler stalls everyone, unless its work is offloaded.

use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_single-thread");

blackbox::suite!(BIN);

/// CPU-heavy work done on the event loop thread delays every other connection.
#[test]
fn heavy_work_blocks_the_loop() {
    let latency = blackbox::checks::heavy_delays_hello(BIN, &[], "/work?us=200000");
    assert!(
        latency > Duration::from_millis(150),
        "GET / took {latency:?} while the loop burned 200 ms of CPU: expected it to wait (> 150 ms)"
    );
}

/// With `--offload`, heavy work runs off the event loop and `GET /` stays fast.
#[test]
fn offloaded_work_does_not_block_the_loop() {
    // Best of three, so one scheduling hiccup on a busy 2-core machine does not fail the test.
    let best = (0..3)
        .map(|_| blackbox::checks::heavy_delays_hello(BIN, &["--offload"], "/work?us=200000"))
        .min()
        .expect("three measurements");
    assert!(
        best < Duration::from_millis(50),
        "GET / took {best:?} (best of 3) with --offload: expected the loop to stay free (< 50 ms)"
    );
}
