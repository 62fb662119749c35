//! The loadgen binary: its JSON, and one line per bad argument.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::thread;

const LOADGEN: &str = env!("CARGO_BIN_EXE_loadgen");

/// Each bad argument gets exactly one line on stderr, naming the flag, and exit code 2.
#[test]
fn bad_arguments_get_one_line() {
    for (args, flag) in [
        (&["-c", "0", "http://127.0.0.1:1/"][..], "--connections"),
        (&["--rate", "0", "http://127.0.0.1:1/"], "--rate"),
        (&["--close", "maybe", "http://127.0.0.1:1/"], "--close"),
        (&["-r", "0:GET /", "http://127.0.0.1:1/"], "--request"),
        (&["--duration", "5d", "http://127.0.0.1:1/"], "--duration"),
        (&["--bogus", "http://127.0.0.1:1/"], "--bogus"),
        (
            &[
                "--close",
                "client",
                "--pipeline",
                "2",
                "http://127.0.0.1:1/",
            ],
            "--pipeline",
        ),
        (&["https://127.0.0.1:1/"], "URL"),
    ] {
        let out = Command::new(LOADGEN).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
    let help = Command::new(LOADGEN).arg("--help").output().unwrap();
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("[WEIGHT:]METHOD PATH"));
}

/// --json prints one object with the fields scripts read.
#[test]
fn json_output() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                // One request per read is enough here: no pipelining.
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        return;
                    }
                    let reply = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
                    if conn.write_all(reply).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let out = Command::new(LOADGEN)
        .args([
            "-c",
            "2",
            "-n",
            "100",
            "--json",
            &format!("http://{addr}/nothing"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["requests"], 100);
    assert_eq!(v["status"]["404"], 100);
    assert_eq!(v["classes"][0]["name"], "GET /nothing");
    for key in ["p50", "p90", "p99", "p99.9", "max"] {
        assert!(v["latency_us"][key].is_number(), "{key}");
    }
    for kind in ["connect", "read", "write", "timeout", "closed", "parse"] {
        assert_eq!(v["errors"][kind], 0, "{kind}");
    }
}
