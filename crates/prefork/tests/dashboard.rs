//! `GET /dashboard` in headless Chromium: see crates/dashboard-test.

use std::path::Path;

use dashboard_test::at;

#[test]
fn the_dashboard_in_a_browser() {
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-prefork.png");
    let bin = env!("CARGO_BIN_EXE_prefork");
    let watched = dashboard_test::check(bin, &["--workers", "2"], &shot);
    let page = at(&watched.load, "duringLoad");
    assert_eq!(at(page, "pattern").as_str(), Some("prefork"));
    // The master's pid in the header, the two worker processes' next to it.
    let master = at(page, "pid").as_str().unwrap_or_default();
    let rows = at(page, "workers").as_array().unwrap_or_default();
    let pids: Vec<&str> = rows.iter().filter_map(|r| at(r, "pid").as_str()).collect();
    assert_eq!(pids.len(), 2, "{page:?}");
    assert!(pids[0] != pids[1] && !pids.contains(&master), "{page:?}");
    let listed = at(page, "worker_pids").as_str().unwrap_or_default();
    assert_eq!(listed, format!(" · workers {}, {}", pids[0], pids[1]));
}
