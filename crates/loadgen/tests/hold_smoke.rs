//! A smoke test of scripts/hold.sh: idle keep-alive connections held by an event loop and by a
//! process per connection, debug builds, a few seconds each. It checks what the table says was
//! held and counted (the sampler must find every process of a tree that grows a child per
//! client), never how many bytes anything took.

use std::path::Path;
use std::process::Command;

/// The cells of the table row for `server`.
fn row<'a>(table: &'a str, server: &str) -> Vec<&'a str> {
    let line = table
        .lines()
        .find(|l| l.starts_with(&format!("| {server} |")))
        .unwrap_or_else(|| panic!("no row for {server} in\n{table}"));
    line.trim_matches('|').split('|').map(str::trim).collect()
}

fn number(cell: &str) -> u64 {
    cell.replace(',', "")
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {cell:?}"))
}

#[test]
fn hold_quick_idle_counts_every_connection_and_process() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = std::env::temp_dir().join(format!("hold-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let status = Command::new("bash")
        .arg(root.join("scripts/hold.sh"))
        .args([
            "--quick",
            "--mode",
            "idle",
            "--no-nginx",
            "--clients",
            "100",
        ])
        .args(["--profile", "dev", "--out"])
        .arg(&out)
        .args(["single-thread", "process-per-connection"])
        .env("CARGO", env!("CARGO"))
        .status()
        .unwrap();
    assert!(status.success(), "hold.sh failed");
    let table = std::fs::read_to_string(out.join("table.md")).unwrap();

    // Columns: server, held, answered, PSS, per connection, threads "idle → held", ...,
    // errors last.
    let st = row(&table, "single-thread");
    assert_eq!((number(st[1]), number(st[2])), (100, 100), "{table}");
    assert_eq!(st.last(), Some(&"0"), "{table}");

    let ppc = row(&table, "process-per-connection");
    assert_eq!((number(ppc[1]), number(ppc[2])), (100, 100), "{table}");
    let (idle, held) = ppc[5].split_once('→').expect("threads idle → held");
    let added = number(held.trim()) - number(idle.trim());
    assert!(
        added >= 100,
        "a process (and its threads) per connection: {added} threads added"
    );
    std::fs::remove_dir_all(&out).unwrap();
}
