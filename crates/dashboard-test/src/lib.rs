//! The live dashboard (`GET /dashboard`) in a real browser: Debian's Chromium, headless, driven
//! by `clients/dashboard.mjs` (playwright-core). A server crate runs it from one test:
//!
//! ```no_run
//! // crates/<pattern>/tests/dashboard.rs
//! #[test]
//! fn the_dashboard_in_a_browser() {
//!     let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-x.png");
//!     dashboard_test::check(env!("CARGO_BIN_EXE_single-thread"), &[], &shot);
//! }
//! ```
//!
//! Two pages watch one server. Under load, the page's totals, per-worker bars and chart must
//! move and agree with `/stats`; a note posted in one page must reach the other within a
//! second; then the server is stopped (SIGTERM) and started again on the same port and journal,
//! and the pages must say "reconnecting", then show the new process and move again, with the
//! notes resumed (the old note once, a new one live). No console error and no uncaught
//! exception is allowed. Needs node, `npm ci --prefix clients` and
//! `/usr/bin/chromium` (or `$CHROMIUM`); .ci/run installs all three.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use blackbox::Server;
use blackbox::json::{self, Value};

/// What `clients/dashboard.mjs` read from the pages, for checks of the pattern's own.
#[derive(Debug)]
pub struct Watched {
    /// Its `load` step: the page `idle` and `duringLoad` (pattern, pid, worker_pids, totals,
    /// and per worker its pid, open, rps, held), and `chartPixels`.
    pub load: Value,
    /// Its report: `chatMs`, the page while the server was `down` and `afterRestart`, ...
    pub report: Value,
}

/// Runs the browser check against `bin ARGS...` and saves a screenshot of the page under load
/// at `screenshot`.
#[track_caller]
pub fn check(bin: &str, args: &[&str], screenshot: &Path) -> Watched {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "no Chromium at {chromium}: `apt-get install chromium` (or set CHROMIUM)"
    );
    let dir = blackbox::server::fresh_data_dir();
    let dir_arg = dir.display().to_string();
    let with_dir = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        v.extend(["--data-dir".to_string(), dir_arg.clone()]);
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let first_args = with_dir(&[]);
    let mut server = Server::start(bin, &strs(&first_args));
    let addr = server.addr();
    let _ = std::fs::remove_file(screenshot);
    let mut node = Node::start(addr, screenshot);

    let mut shown_during_load = None;
    let report = loop {
        let line = node.next();
        if let Some(why) = line.get("failed") {
            panic!("the browser check failed: {why:?}\n{line:?}");
        }
        if line.get("step").and_then(Value::as_str) == Some("load") {
            // What the page showed during the load, next to the server's own count since.
            shown_during_load = Some((line.clone(), blackbox::checks::fetch_stats(addr).0));
        }
        match line.get("ask").and_then(Value::as_str) {
            Some("stop") => {
                server.signal(libc::SIGTERM);
                let status = server.wait_exit(Duration::from_secs(10));
                assert!(status.is_some_and(|s| s.success()), "SIGTERM: {status:?}");
                node.say("stopped");
            }
            Some("start") => {
                let addr_arg = addr.to_string();
                let again = with_dir(&["--addr", &addr_arg]);
                server = Server::start(bin, &strs(&again));
                node.say(&format!("started {}", server.pid()));
            }
            _ => {}
        }
        if let Some(report) = line.get("report") {
            break report.clone();
        }
    };
    let (load, stats) = shown_during_load.expect("a `load` step before the report");
    eprintln!("clients/dashboard.mjs: {load:?}\n{report:?}");
    check_load(&load, &stats);
    check_chat_and_restart(&report, &server);
    check_console(&report);
    let size = std::fs::metadata(screenshot).map_or(0, |m| m.len());
    assert!(size > 10_000, "screenshot {screenshot:?}: {size} bytes");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Watched { load, report }
}

/// Under load the numbers moved, and agree with the server's `/stats` taken just after.
#[track_caller]
fn check_load(load: &Value, stats: &Value) {
    let served = num(stats, "total.requests");
    assert!(
        num(load, "duringLoad.requests") >= num(load, "idle.requests") + 300.0,
        "requests did not move on the page: {load:?}"
    );
    assert!(
        num(load, "duringLoad.requests") <= served,
        "the page shows more requests than the server served ({served}): {load:?}"
    );
    assert!(num(load, "duringLoad.rps") > 0.0, "{load:?}");
    assert!(
        num(load, "duringLoad.samples") >= 2.0,
        "the chart has samples: {load:?}"
    );
    assert!(
        num(load, "chartPixels") > 50.0,
        "the requests/s chart drew no line: {load:?}"
    );
    // One row per worker of /stats, with its pid.
    let rows = at(load, "duringLoad.workers")
        .as_array()
        .unwrap_or_default();
    let workers = at(stats, "workers").as_array().unwrap_or_default();
    assert_eq!(rows.len(), workers.len(), "{load:?}\n{stats:?}");
    for (row, w) in rows.iter().zip(workers) {
        assert_eq!(
            at(row, "pid").as_str().and_then(|p| p.parse().ok()),
            at(w, "pid").as_f64(),
            "{row:?} vs {w:?}"
        );
    }
    assert!(
        rows.iter().any(|r| num(r, "rps") > 0.0),
        "no worker's requests/s moved: {load:?}"
    );
    // Two pages, each holding /stats/stream and /events open.
    assert!(num(load, "duringLoad.held") >= 4.0, "{load:?}");
    assert!(num(load, "duringLoad.open") >= 4.0, "{load:?}");
}

#[track_caller]
fn check_chat_and_restart(report: &Value, server: &Server) {
    // From the submit in one page to the note in the other's list.
    let chat_ms = num(report, "chatMs");
    assert!(
        (0.0..1000.0).contains(&chat_ms),
        "a note took {chat_ms} ms to reach the other page"
    );
    assert_eq!(
        at(report, "afterRestart.pid").as_str(),
        Some(server.pid().to_string().as_str()),
        "the page shows the new process: {report:?}"
    );
    assert!(
        num(report, "afterRestart.rps") > 0.0,
        "requests/s after the restart: {report:?}"
    );
    assert_eq!(
        num(report, "firstNoteShown"),
        1.0,
        "the note from before the restart, once"
    );
}

/// No console error and no uncaught exception in either page, even while the server is down
/// (Chromium does not log an EventSource's refused reconnections).
#[track_caller]
fn check_console(report: &Value) {
    let errors = at(report, "errors").as_array().unwrap_or_default();
    assert!(errors.is_empty(), "console errors: {errors:?}");
}

static NULL: Value = Value::Null;

/// The member at a dotted path (`a.b.c`), or null.
pub fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.')
        .fold(v, |v, key| v.get(key).unwrap_or(&NULL))
}

/// The number at a dotted path; NaN (which fails every comparison) when there is none.
pub fn num(v: &Value, path: &str) -> f64 {
    at(v, path).as_f64().unwrap_or(f64::NAN)
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn clients_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../clients")
}

/// `node clients/dashboard.mjs`, its stdout lines arriving on a channel; killed on drop.
struct Node {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Node {
    fn start(addr: SocketAddr, screenshot: &Path) -> Node {
        let dir = clients_dir();
        assert!(
            dir.join("node_modules/playwright-core").exists(),
            "playwright-core is not installed: run `npm ci --prefix clients`"
        );
        let mut child = Command::new("node")
            .arg(dir.join("dashboard.mjs"))
            .arg(format!("http://{addr}/"))
            .arg(screenshot)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node (install Node.js 18 or later)");
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Node {
            child,
            stdin,
            lines,
        }
    }

    /// The next line the script printed, parsed. The script gives up by itself after 60 s.
    #[track_caller]
    fn next(&self) -> Value {
        let line = match self.lines.recv_timeout(Duration::from_secs(70)) {
            Ok(line) => line,
            Err(e) => panic!("clients/dashboard.mjs: {e} (see its stderr above)"),
        };
        json::parse(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    #[track_caller]
    fn say(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("write to clients/dashboard.mjs");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
