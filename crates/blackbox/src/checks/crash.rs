//! What the journal promises across a crash, checked from outside: every write the server
//! acknowledged is there after a kill -9 and a restart, exactly once; a log damaged at its end
//! (a torn write) is cut there and the server starts; one damaged in the middle stops it,
//! naming the file and the offset.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::app::{json_body, post_message};
use super::{get, with};
use crate::client::Client;
use crate::json::Value;
use crate::server::{Server, describe_exit, fresh_data_dir};

/// Every message in the journal: seq → body (reads `/messages` page by page).
pub fn all_messages(addr: std::net::SocketAddr) -> BTreeMap<u64, String> {
    let mut c = Client::connect(addr);
    let mut out = BTreeMap::new();
    let mut after = 0;
    loop {
        let v = json_body(&c.request(get(&format!("/messages?after={after}&limit=1000"))));
        let list = v.get("messages").and_then(Value::as_array).unwrap_or(&[]);
        if list.is_empty() {
            return out;
        }
        for m in list {
            let seq = m.get("seq").and_then(Value::as_u64).expect("seq");
            let body = m.get("body").and_then(Value::as_str).unwrap_or_default();
            assert!(
                out.insert(seq, body.to_string()).is_none(),
                "seq {seq} twice"
            );
            after = seq;
        }
    }
}

/// 50 clients POST messages as fast as they can; the server and every process it forked are
/// SIGKILLed mid-load; restarted on the same journal, it has every acknowledged message, each
/// exactly once, under the seq its 201 named, and nothing else but writes that were under way.
/// Returns the recovery line and the number of messages acknowledged, for the caller to print.
pub fn acked_writes_survive_kill_9(bin: &str, args: &[&str], commit: &str) -> (String, usize) {
    const CLIENTS: usize = 50;
    let dir = fresh_data_dir();
    let dir_arg = dir.display().to_string();
    let args = with(
        args,
        &[
            "--data-dir",
            &dir_arg,
            "--commit",
            commit,
            "--max-conns",
            "1000",
        ],
    );
    let mut server = Server::start(bin, &args);
    let addr = server.addr();
    let acked: Arc<Mutex<BTreeMap<u64, String>>> = Arc::default();
    let sent: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (acked, sent, stop) = (acked.clone(), sent.clone(), stop.clone());
            thread::spawn(move || {
                let Ok(mut c) = Client::try_connect(addr, Duration::from_secs(5)) else {
                    return;
                };
                for n in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let body = format!("client {i} message {n}");
                    sent.lock().unwrap().insert(body.clone());
                    let request =
                        super::app::request_with_body("POST", "/messages", "", body.as_bytes());
                    if c.try_send(&request).is_err() {
                        return;
                    }
                    match c.try_read_response(crate::client::Expect::Body) {
                        Ok(r) if r.status == 201 => {
                            let seq = json_body(&r)
                                .get("seq")
                                .and_then(Value::as_u64)
                                .expect("seq");
                            acked.lock().unwrap().insert(seq, body);
                        }
                        _ => return,
                    }
                }
            })
        })
        .collect();
    // Until a good number are acknowledged, then the crash.
    let deadline = Instant::now() + Duration::from_secs(20);
    while acked.lock().unwrap().len() < 500 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    server.kill_all();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(
        acked.len() >= 100,
        "too few writes acknowledged before the crash: {}",
        acked.len()
    );

    let server = Server::start(bin, &args);
    let recovery = server
        .stderr_text()
        .lines()
        .find(|l| l.contains("journal "))
        .unwrap_or_default()
        .to_string();
    let found = all_messages(server.addr());
    for (seq, body) in &acked {
        assert_eq!(
            found.get(seq),
            Some(body),
            "acknowledged message {seq} ({body:?}) after the crash; recovery: {recovery}"
        );
    }
    let sent = sent.lock().unwrap();
    let mut bodies = BTreeSet::new();
    for (seq, body) in &found {
        assert!(sent.contains(body), "seq {seq}: {body:?} was never sent");
        assert!(bodies.insert(body), "{body:?} twice");
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    (recovery, acked.len())
}

/// The journal's first segment file in `dir`.
fn segment(dir: &Path) -> PathBuf {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("the data dir")
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    logs.into_iter().next().expect("a segment")
}

/// Where each record's frame starts in a segment, and where the data ends (frames are `u32
/// length, u32 crc, u64 seq, u8 kind, payload`; zeros after the data are preallocated space).
fn frames(bytes: &[u8]) -> (Vec<usize>, usize) {
    let (mut starts, mut at) = (Vec::new(), 0);
    while at + 17 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        if len == 0 && bytes[at..at + 17].iter().all(|&b| b == 0) {
            break;
        }
        starts.push(at);
        at += 17 + len;
    }
    (starts, at)
}

/// Writes 5 messages with a server, stops it, damages the log with `damage`, and starts it
/// again: `Ok(stderr)` if it started (then its messages are in `Ok`'s second part), `Err(stderr)`
/// if it refused.
fn restart_after(
    bin: &str,
    args: &[&str],
    damage: impl FnOnce(&mut Vec<u8>, &[usize], usize),
) -> Result<(String, Vec<String>), String> {
    let dir = fresh_data_dir();
    let dir_arg = dir.display().to_string();
    let args = with(args, &["--data-dir", &dir_arg]);
    {
        let mut server = Server::start(bin, &args);
        let mut c = Client::connect(server.addr());
        for i in 0..5 {
            post_message(&mut c, &format!("message {i}"));
        }
        server.signal(libc::SIGTERM);
        assert!(
            server
                .wait_exit(Duration::from_secs(10))
                .is_some_and(|s| s.success())
        );
    }
    let path = segment(&dir);
    let mut bytes = std::fs::read(&path).expect("read the segment");
    let (starts, end) = frames(&bytes);
    assert_eq!(starts.len(), 5, "five records");
    damage(&mut bytes, &starts, end);
    std::fs::write(&path, &bytes).expect("write the segment");

    let mut child = Command::new(bin)
        .args(["--addr", "127.0.0.1:0"])
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("start the server");
    let stderr = child.stderr.take().expect("piped");
    let text = Arc::new(Mutex::new(String::new()));
    let t = text.clone();
    thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let mut t = t.lock().unwrap();
            t.push_str(&line);
            t.push('\n');
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let result = loop {
        let now = text.lock().unwrap().clone();
        if let Some(addr) = now
            .split("listening on http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        {
            let messages = all_messages(addr).into_values().collect();
            break Ok((now, messages));
        }
        if let Ok(Some(status)) = child.try_wait() {
            thread::sleep(Duration::from_millis(50));
            let now = text.lock().unwrap().clone();
            assert!(!status.success(), "{}", describe_exit(status));
            break Err(now);
        }
        assert!(
            Instant::now() < deadline,
            "neither started nor refused: {now}"
        );
        thread::sleep(Duration::from_millis(10));
    };
    // SAFETY: kill has no memory-safety preconditions; the group is the one we started.
    unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

use std::os::unix::process::CommandExt;

/// Recovery of damaged logs, as the journal specifies: a record cut short at the end, or a
/// flipped byte in the last record (a torn write) is cut and reported in one line, and the
/// server starts with the records before it; a flipped byte in a record in the middle stops it
/// with an error naming the file and the offset.
pub fn recovery_of_damaged_logs(bin: &str, args: &[&str]) {
    let first4 =
        |messages: &[String]| messages == ["message 0", "message 1", "message 2", "message 3"];

    // Truncated in the middle of the last record.
    let (stderr, messages) = restart_after(bin, args, |bytes, starts, end| {
        let cut = starts[4] + (end - starts[4]) / 2;
        bytes.truncate(cut);
    })
    .unwrap_or_else(|e| panic!("a truncated last record should be cut, not refused: {e}"));
    assert!(stderr.contains("torn tail cut"), "{stderr}");
    assert!(first4(&messages), "{messages:?}");

    // A flipped byte in the last record.
    let (stderr, messages) = restart_after(bin, args, |bytes, _, end| bytes[end - 2] ^= 0x40)
        .unwrap_or_else(|e| panic!("a bad last record should be cut, not refused: {e}"));
    assert!(stderr.contains("torn tail cut"), "{stderr}");
    assert!(first4(&messages), "{messages:?}");

    // A flipped byte in a record in the middle: refused, naming the file and the offset.
    let mut at = 0;
    let stderr = restart_after(bin, args, |bytes, starts, _| {
        at = starts[2];
        bytes[starts[2] + 20] ^= 0x40;
    })
    .map(|(stderr, _)| stderr)
    .expect_err("a damaged record in the middle must stop the start-up");
    assert!(
        stderr.contains("corrupt")
            && stderr.contains(".log")
            && stderr.contains(&format!("offset {at}")),
        "the error should name the file and the offset {at}: {stderr}"
    );
}
