//! A smoke test of scripts/compare.sh: two patterns, every workload, short runs, debug
//! builds. It checks that the outputs exist and parse, never how fast anything was.

use std::path::Path;
use std::process::Command;

#[test]
fn compare_quick_on_two_patterns() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = std::env::temp_dir().join(format!("compare-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let patterns = ["single-thread", "dispatcher"];
    let status = Command::new("bash")
        .arg(root.join("scripts/compare.sh"))
        .args([
            "--quick",
            "--duration",
            "1",
            "--warmup",
            "0.2",
            "--idle",
            "200",
        ])
        .args(["--profile", "dev", "--out"])
        .arg(&out)
        .args(patterns)
        // The cargo that runs this test builds the binaries too.
        .env("CARGO", env!("CARGO"))
        .status()
        .unwrap();
    assert!(status.success(), "compare.sh failed");

    let runs = loadgen::report::load(&out).unwrap();
    let workloads = ["hello", "pipelined", "churn", "mix", "idle"];
    for p in patterns {
        for w in workloads {
            let run = runs
                .iter()
                .find(|r| r.pattern == p && r.workload == w)
                .unwrap_or_else(|| panic!("no run for {p} {w}"));
            assert!(run.loadgen.all_responses > 0, "{p} {w}: no replies");
            assert!(run.server_cpu_s.is_some(), "{p} {w}: no server CPU");
        }
    }
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(summary.contains("| single-thread |") && summary.contains("| dispatcher |"));
    assert!(summary.contains("## Requests per second"));
    let mut charts = vec![
        "throughput.svg".to_string(),
        "cpu-per-request.svg".to_string(),
    ];
    charts.extend(workloads.iter().map(|w| format!("latency-{w}.svg")));
    for chart in charts {
        let svg = std::fs::read_to_string(out.join(&chart)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{chart}"
        );
        assert!(svg.contains("single-thread"), "{chart} names no pattern");
    }
    std::fs::remove_dir_all(&out).unwrap();
}
