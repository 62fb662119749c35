//! What makes this the io_uring pattern, seen from outside: turns that carry many requests,
//! receives that run out of provided buffers and are re-armed, receives cancelled for
//! backpressure, held requests woken through the ring's eventfd, no io-wq threads, and a clear
//! error where io_uring is not allowed.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use blackbox::checks::{GET_HELLO, fetch_stats, get, per_worker, post_echo, pseudo_random_bytes};
use blackbox::json::Value;
use blackbox::{Client, Server};

const BIN: &str = env!("CARGO_BIN_EXE_uring");

fn worker_counter(stats: &Value, name: &str) -> u64 {
    per_worker(stats, name).iter().sum()
}

/// 20 rounds of 50 pipelined requests on one connection: each round arrives in one receive
/// and leaves in one send, so the ring enters the kernel far fewer times than it serves
/// requests (one enter per request would mean no batching at all).
#[test]
fn a_turn_carries_many_requests() {
    const ROUNDS: usize = 20;
    const PIPELINED: usize = 50;
    let server = Server::start(BIN, &["--workers", "1"]);
    let mut c = Client::connect(server.addr());
    let batch = GET_HELLO.repeat(PIPELINED);
    for _ in 0..ROUNDS {
        c.send(&batch);
        for _ in 0..PIPELINED {
            c.read_response()
                .assert_status(200)
                .assert_body("Hello, World!");
        }
    }
    let (stats, text) = fetch_stats(server.addr());
    let requests = worker_counter(&stats, "requests");
    let enters = worker_counter(&stats, "enters");
    eprintln!("{requests} requests in {enters} io_uring_enter calls");
    assert!(requests > (ROUNDS * PIPELINED) as u64, "{text}");
    assert!(
        enters * 4 < requests,
        "{enters} enters for {requests} requests: turns should carry whole pipelines: {text}"
    );
}

/// With two 512-byte provided buffers, a 1 MiB upload on each of four connections empties the
/// buffer ring again and again: every receive that finds it empty ends with ENOBUFS and is
/// re-armed once the buffers are back. Every echo still comes back whole.
#[test]
fn receives_out_of_buffers_are_rearmed() {
    let server = Server::start(
        BIN,
        &[
            "--workers",
            "1",
            "--recv-buffers",
            "2",
            "--recv-buffer-size",
            "512",
        ],
    );
    let addr = server.addr();
    let uploads: Vec<_> = (0..4)
        .map(|i| {
            thread::spawn(move || {
                let body = pseudo_random_bytes(1 << 20, 0x1000 + i);
                let mut c = Client::connect(addr);
                let mut writer = c.stream().try_clone().expect("clone the socket");
                let request = post_echo(&body);
                let sender = thread::spawn(move || writer.write_all(&request));
                c.set_timeout(Duration::from_secs(20));
                let r = c.read_response();
                sender.join().expect("writer").expect("sending 1 MiB");
                r.assert_status(200);
                assert!(r.body == body, "echo {i} came back wrong");
            })
        })
        .collect();
    for u in uploads {
        u.join().expect("an upload failed");
    }
    let (stats, text) = fetch_stats(addr);
    let enobufs = worker_counter(&stats, "enobufs");
    eprintln!("receives that found no buffer: {enobufs}");
    assert!(enobufs > 0, "2 buffers should run dry under 4 MiB: {text}");
}

/// A client pipelines 64 echoes of 64 KiB (4 MiB of replies) into a small socket buffer while
/// reading slowly: the server's replies back up, it must stop receiving (cancel the multishot
/// receive) and start again as the replies drain. Every reply arrives whole and in order.
#[test]
fn backpressure_cancels_and_rearms_the_receive() {
    const N: usize = 64;
    let server = Server::start(BIN, &["--workers", "1", "--sndbuf", "16K"]);
    let mut c = Client::connect(server.addr());
    c.set_recv_buffer(16 * 1024).expect("SO_RCVBUF");
    let bodies: Vec<Vec<u8>> = (0..N)
        .map(|i| pseudo_random_bytes(64 * 1024, i as u64 + 7))
        .collect();
    let mut request = Vec::new();
    for body in &bodies {
        request.extend_from_slice(&post_echo(body));
    }
    let mut writer = c.stream().try_clone().expect("clone the socket");
    writer
        .set_write_timeout(Some(Duration::from_secs(30)))
        .expect("write timeout");
    let sender = thread::spawn(move || writer.write_all(&request));
    // Let the replies back up before reading any.
    thread::sleep(Duration::from_millis(200));
    c.set_timeout(Duration::from_secs(20));
    for (i, body) in bodies.iter().enumerate() {
        let r = c.read_response();
        r.assert_status(200);
        assert!(&r.body == body, "echo {i} of {N} came back wrong");
    }
    sender
        .join()
        .expect("writer")
        .expect("sending the pipeline");
    let (stats, text) = fetch_stats(server.addr());
    let cancels = worker_counter(&stats, "recv_cancels");
    eprintln!("receives cancelled: {cancels}");
    assert!(
        cancels > 0,
        "the replies backed up, yet no receive stopped: {text}"
    );
}

/// At --max-conns, a multishot accept still takes the whole accept queue: connections past the
/// bound wait in the worker, unread, until a connection closes and lets the next one in.
#[test]
fn connections_past_the_bound_wait_their_turn() {
    let server = Server::start(BIN, &["--workers", "1", "--max-conns", "2"]);
    // The readiness probe has closed: two connections fill the bound, the third waits.
    let mut rest = blackbox::checks::next_connection_waits_at_the_bound(&server, 2);
    for c in &mut rest {
        c.request(GET_HELLO).assert_status(200);
    }
}

/// A long poll is held in the ring; a message posted on another connection wakes it through
/// the app's hub and the ring's eventfd, well before its 10 s wait is up.
#[test]
fn a_long_poll_is_woken_by_a_post() {
    let server = Server::start(BIN, &["--workers", "2", "--commit", "async"]);
    let mut poll = Client::connect(server.addr());
    poll.set_timeout(Duration::from_secs(15));
    poll.send(get("/messages?after=0&wait=10s"));
    wait_until("the long poll to be held", || {
        worker_counter(&fetch_stats(server.addr()).0, "held") == 1
    });
    let posted = Instant::now();
    let mut post = Client::connect(server.addr());
    let body = "hello, ring";
    post.request(format!(
        "POST /messages HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ))
    .assert_status(201);
    let r = poll.read_response();
    let waited = posted.elapsed();
    r.assert_status(200);
    assert!(
        r.body_text().contains(body),
        "the long poll should carry the message:\n{r:?}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "the long poll took {waited:?} after the post: not woken, only timed out"
    );
}

/// At SIGTERM a held long poll is answered at once (with what there is), and the server exits 0.
#[test]
fn sigterm_answers_a_held_long_poll() {
    let mut server = Server::start(BIN, &["--workers", "2"]);
    let mut poll = Client::connect(server.addr());
    poll.set_timeout(Duration::from_secs(15));
    poll.send(get("/messages?after=0&wait=30s"));
    wait_until("the long poll to be held", || {
        worker_counter(&fetch_stats(server.addr()).0, "held") == 1
    });
    server.signal(libc::SIGTERM);
    let r = poll.read_response();
    r.assert_status(200);
    let status = server.wait_exit(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "the server should exit 0 after SIGTERM: {status:?}"
    );
}

/// Every operation runs inline or off a poll wake-up: no io-wq worker thread (`iou-wrk-N`)
/// appears, so the process has exactly its own threads.
#[test]
fn no_io_worker_threads() {
    let server = Server::start(BIN, &["--workers", "2"]);
    let mut c = Client::connect(server.addr());
    for _ in 0..100 {
        c.request(GET_HELLO).assert_status(200);
    }
    c.request(post_echo(&[7; 100_000])).assert_status(200);
    let names = thread_names(server.pid());
    assert!(
        names.iter().filter(|n| n.starts_with("worker-")).count() == 2,
        "threads: {names:?}"
    );
    assert!(
        !names.iter().any(|n| n.starts_with("iou-wrk")),
        "an operation was punted to an io-wq thread: {names:?}"
    );
}

/// Where io_uring_setup is refused (here by a seccomp filter, as a container runtime's default
/// profile does), the server says so in one line and exits 1, for both errors such a filter
/// can give.
#[test]
#[cfg(target_arch = "x86_64")]
fn refused_io_uring_is_one_line_and_exit_1() {
    for (errno, expect) in [(libc::EPERM, "seccomp"), (libc::ENOSYS, "unavailable")] {
        let mut command = Command::new(BIN);
        let dir = blackbox::server::fresh_data_dir();
        command
            .args(["--addr", "127.0.0.1:0", "--data-dir"])
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs in the child between fork and exec, and makes only prctl
        // calls (async-signal-safe) on a filter that lives on its own stack.
        unsafe { command.pre_exec(move || deny_io_uring_setup(errno)) };
        let mut child = command.spawn().expect("start the server");
        let mut stderr = String::new();
        let pipe = child.stderr.as_mut().expect("stderr");
        pipe.read_to_string(&mut stderr).expect("read stderr");
        let status = child.wait().expect("wait");
        let _ = std::fs::remove_dir_all(&dir);
        eprintln!("errno {errno}: {}", stderr.trim_end());
        assert_eq!(status.code(), Some(1), "errno {errno}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line expected: {stderr}");
        assert!(
            lines[0].starts_with("uring: ") && lines[0].contains(expect),
            "the line should name the cause ({expect}): {stderr}"
        );
    }
}

/// Installs a seccomp filter that fails io_uring_setup with `errno` and allows everything else.
#[cfg(target_arch = "x86_64")]
fn deny_io_uring_setup(errno: i32) -> std::io::Result<()> {
    const NR_IO_URING_SETUP: u32 = 425;
    let stmt = |code: u16, k: u32| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let mut filter = [
        // The syscall number is the first field of struct seccomp_data.
        stmt((libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16, 0),
        jeq(NR_IO_URING_SETUP, 0, 1),
        stmt(
            (libc::BPF_RET | libc::BPF_K) as u16,
            libc::SECCOMP_RET_ERRNO | errno as u32,
        ),
        stmt(
            (libc::BPF_RET | libc::BPF_K) as u16,
            libc::SECCOMP_RET_ALLOW,
        ),
    ];
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes integers only; PR_SET_SECCOMP reads the
    // program, which points to `filter`, both alive for the call.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &program as *const libc::sock_fprog,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn thread_names(pid: u32) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/PID/task");
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

/// Polls `done` every 10 ms; fails after 5 s.
#[track_caller]
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "waited 5 s for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}
