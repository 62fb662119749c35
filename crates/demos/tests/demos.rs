//! Every demo's quick path, `scripts/demo.sh --quick NAME`, runs to its verdict line.
//!
//! What the demos measure depends on the machine, so nothing here checks a number or a timing:
//! a demo passes when it exits 0 having printed a line that starts with `verdict:`. A demo that
//! cannot run here at all (a required tool missing, or no network namespaces for syn-queue)
//! exits 77, and its test passes with a note saying why. The demos run one at a time, also
//! under nextest's process per test (a lock file): they read kernel counters and compete for
//! the CPU, so they must not overlap.
//!
//! They need bash and python3; as root with iproute2 (ip, ss, tc, nstat) they show everything,
//! and tcpdump and perf add a packet trace (buffers) and a second wake-up count (herd). Each
//! uses the servers built in this test's own profile (`DEMO_PROFILE`), building what is
//! missing with cargo. commit and replication run PostgreSQL (Debian's postgresql package; as
//! root, as its postgres OS user) and exit 77 without it; their verdicts are also checked for
//! what PostgreSQL guarantees whatever the machine: a synchronous commit survives a crash, and
//! a read on a remote_apply standby sees the commit that returned before it.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A demo's quick path takes seconds; this leaves room for a slow, shared machine and for
/// cargo building a server the first time.
const TIMEOUT: Duration = Duration::from_secs(240);

/// Exit code of a demo that cannot run on this machine.
const CANNOT_RUN: i32 = 77;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Holds an exclusive lock on `<target>/demos.lock` while alive: one demo at a time across
/// processes (the Mutex above covers threads; the lock, nextest's process per test).
struct DemoLock {
    _file: std::fs::File,
}

impl DemoLock {
    fn take() -> DemoLock {
        let (target, _) = target_and_profile();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(target.join("demos.lock"))
            .expect("the demos' lock file");
        // SAFETY: flock takes an open descriptor, which `file` owns for as long as the lock lives.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
        DemoLock { _file: file }
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/demo.sh")
}

/// The target directory and profile this test was built in: `<target>/<profile>/deps/demos-*`.
fn target_and_profile() -> (PathBuf, String) {
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test runs from <target>/<profile>/deps");
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug")
        .to_string();
    let target = profile_dir
        .parent()
        .expect("a target directory")
        .to_path_buf();
    (target, profile)
}

/// Runs `scripts/demo.sh ARGS...`; returns its exit code (None if killed) and its output.
fn run_script(args: &[&str]) -> (Option<i32>, String) {
    let (target, profile) = target_and_profile();
    let mut child = Command::new("bash")
        .arg(script())
        .args(args)
        .env("DEMO_PROFILE", &profile)
        .env("CARGO_TARGET_DIR", &target)
        .env("CARGO", env!("CARGO"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bash runs scripts/demo.sh");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the demo") {
            break status;
        }
        if Instant::now() > deadline {
            // SIGTERM first: the script's trap removes what it started (namespaces, servers).
            // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let grace = Instant::now() + Duration::from_secs(20);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < grace {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            break child.wait().expect("the killed demo");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = format!(
        "{}{}",
        out.join().unwrap_or_default(),
        match err.join().unwrap_or_default() {
            e if e.is_empty() => String::new(),
            e => format!("--- stderr ---\n{e}"),
        }
    );
    (status.code(), output)
}

/// Runs one demo's quick path and checks that it printed its verdict; returns that line, or
/// None if the demo cannot run here.
fn demo(name: &str) -> Option<String> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let _lock = DemoLock::take();
    let started = Instant::now();
    let (code, output) = run_script(&["--quick", name]);
    eprintln!("{output}");
    match code {
        Some(CANNOT_RUN) => {
            eprintln!(
                "demo {name} skipped: it cannot run on this machine (see its `skipped:` line above)"
            );
            None
        }
        Some(0) => {
            let verdicts = output
                .lines()
                .filter(|l| l.starts_with("verdict: "))
                .count();
            assert_eq!(
                verdicts, 1,
                "demo {name} should end with one `verdict:` line, found {verdicts}:\n{output}"
            );
            output
                .lines()
                .find(|l| l.starts_with("verdict: "))
                .map(str::to_string)
        }
        other => panic!(
            "demo {name} failed (exit {other:?}) after {:?}:\n{output}",
            started.elapsed()
        ),
    }
}

#[test]
fn the_script_lists_every_demo() {
    let (code, output) = run_script(&[]);
    assert_eq!(code, Some(0), "{output}");
    let listed: Vec<&str> = output
        .lines()
        .filter_map(|l| l.strip_prefix("  "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(listed, demos::DEMOS, "scripts/demo.sh lists:\n{output}");
    for name in demos::DEMOS {
        let page = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../docs/demo-{name}.md"));
        assert!(page.exists(), "no page {}", page.display());
    }
}

#[test]
fn backlog() {
    demo("backlog");
}

#[test]
fn syn_queue() {
    demo("syn-queue");
}

#[test]
fn buffers() {
    demo("buffers");
}

#[test]
fn nagle() {
    demo("nagle");
}

#[test]
fn reuseport() {
    demo("reuseport");
}

#[test]
fn herd() {
    demo("herd");
}

#[test]
fn cow() {
    demo("cow");
}

#[test]
fn workers() {
    demo("workers");
}

#[test]
fn anatomy() {
    if let Some(verdict) = demo("anatomy") {
        for request in ["GET / ", "GET /work?us=2000 ", "POST /echo "] {
            assert!(
                verdict.contains(request),
                "no timeline for {request}: {verdict}"
            );
        }
    }
}

#[test]
fn commit() {
    if let Some(verdict) = demo("commit") {
        // "synchronous_commit=on: N commits/s, lost L of A acknowledged COMMITs; off: ..."
        let on = verdict
            .split_once("synchronous_commit=on: ")
            .and_then(|(_, rest)| rest.split(';').next())
            .unwrap_or_else(|| panic!("no synchronous_commit=on part in: {verdict}"));
        assert!(
            on.contains(", lost 0 of "),
            "an acknowledged synchronous COMMIT was lost in a crash: {verdict}"
        );
    }
}

#[test]
fn replication() {
    if let Some(verdict) = demo("replication") {
        // "; synchronous (remote_apply): S stale, ..." over local sockets, and
        // "; synchronous: S stale, ..." over the slow link where the machine allows one.
        let synchronous: Vec<&str> = verdict.split("; synchronous").skip(1).collect();
        assert!(!synchronous.is_empty(), "no synchronous part in: {verdict}");
        for part in synchronous {
            assert!(
                part.starts_with(" (remote_apply): 0 stale") || part.starts_with(": 0 stale"),
                "a read on the remote_apply standby missed a returned COMMIT: {verdict}"
            );
        }
    }
}
