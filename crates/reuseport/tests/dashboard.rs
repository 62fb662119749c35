//! `GET /dashboard` in headless Chromium: see crates/dashboard-test.

use std::path::Path;

use dashboard_test::at;

#[test]
fn the_dashboard_in_a_browser() {
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-reuseport.png");
    let bin = env!("CARGO_BIN_EXE_reuseport");
    let watched = dashboard_test::check(bin, &["--workers", "2"], &shot);
    let page = at(&watched.load, "duringLoad");
    assert_eq!(at(page, "pattern").as_str(), Some("reuseport"));
    // Two listener threads in one process: no worker pids beside the server's.
    let rows = at(page, "workers").as_array().unwrap_or_default();
    assert_eq!(rows.len(), 2, "{page:?}");
    assert_eq!(at(page, "worker_pids").as_str(), Some(""), "{page:?}");
}
