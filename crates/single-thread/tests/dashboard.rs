//! `GET /dashboard` in headless Chromium: see crates/dashboard-test.

use std::path::Path;

#[test]
fn the_dashboard_in_a_browser() {
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-single-thread.png");
    let watched = dashboard_test::check(env!("CARGO_BIN_EXE_single-thread"), &[], &shot);
    let pattern = dashboard_test::at(&watched.report, "pattern");
    assert_eq!(pattern.as_str(), Some("single-thread"));
}
