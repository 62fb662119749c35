//! Real tus clients that nobody here wrote upload to the server: tus-js-client (npm, in node)
//! and tuspy (PyPI, in python3), run from `clients/` (`tus-upload.mjs`, `tus_upload.py`). They
//! upload in chunks; in parallel parts joined by concatenation; with each PATCH sent as a POST
//! and `X-HTTP-Method-Override`; and through a [`Proxy`] that cuts the first PATCH mid-body,
//! after which they must resume from the offset the server kept (a HEAD, then a PATCH from
//! there) without sending again what the server acknowledged. Each download must have the
//! file's SHA-256.
//!
//! Needs node with `npm ci --prefix clients`, and python3 with
//! `python3 -m pip install -r clients/requirements.txt` (`.ci/run` does both); without them
//! these checks fail, saying what to install.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use sha2::Digest as _;

use super::pseudo_random_bytes;
use crate::client::Client;
use crate::json::{self, Value};
use crate::proxy::{Forwarded, Proxy};
use crate::server::{Server, fresh_data_dir};

/// How long one client run may take (a run takes about a second).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);
/// Retry delays for tus-js-client, in ms: short, so that a resume costs little time.
const JS_RETRY_DELAYS: &str = "0,50,100,200,400,800";
const MIB: usize = 1 << 20;

/// tus-js-client uploads 3 MiB (and a bit) in 1 MiB PATCHes; the download has the file's
/// SHA-256.
pub fn tus_js_chunked_upload(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let file = SourceFile::new(3 * MIB + 12_345, 41);
    let endpoint = format!("http://{}/files/", server.addr());
    let report = tus_js(&endpoint, &file, &["--chunk-size", &MIB.to_string()]);
    let path = succeeded(&report, &file);
    let patches = statuses(&report, "PATCH");
    assert_eq!(
        patches, [204; 4],
        "four PATCHes of at most 1 MiB, each 204: {report:?}"
    );
    file.assert_download(server.addr(), &path);
}

/// tus-js-client with `parallelUploads: 3`: three partial uploads at once, then a final one
/// that concatenates them (`Upload-Concat: final;...`); the download has the file's SHA-256.
pub fn tus_js_parallel_uploads(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let file = SourceFile::new(3 * MIB + 777, 42);
    let endpoint = format!("http://{}/files/", server.addr());
    let report = tus_js(&endpoint, &file, &["--parallel", "3"]);
    let path = succeeded(&report, &file);
    assert_eq!(
        statuses(&report, "POST"),
        [201; 4],
        "three partial uploads and the final one: {report:?}"
    );
    let mut c = Client::connect(server.addr());
    let r = c.request(format!(
        "HEAD {path} HTTP/1.1\r\nHost: blackbox\r\nTus-Resumable: 1.0.0\r\n\r\n"
    ));
    r.assert_status(200);
    let concat = r.header("Upload-Concat").unwrap_or_default();
    assert!(
        concat.starts_with("final;") && concat.split(' ').count() == 3,
        "the upload is the final of three parts:\n{r:?}"
    );
    file.assert_download(server.addr(), &path);
}

/// tus-js-client with `overridePatchMethod`, for environments that cannot send PATCH: each
/// PATCH goes as a POST with `X-HTTP-Method-Override: PATCH`, which the server must honour.
pub fn tus_js_method_override(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let file = SourceFile::new(MIB + 99, 46);
    let endpoint = format!("http://{}/files/", server.addr());
    let chunk = (MIB / 2).to_string();
    let report = tus_js(
        &endpoint,
        &file,
        &["--chunk-size", &chunk, "--override-patch", "true"],
    );
    let path = succeeded(&report, &file);
    assert_eq!(
        (statuses(&report, "POST"), statuses(&report, "PATCH")),
        (vec![201, 204, 204, 204], vec![]),
        "the creation, then three PATCHes sent as POSTs: {report:?}"
    );
    file.assert_download(server.addr(), &path);
}

/// tus-js-client sends the whole file in one PATCH through a proxy that cuts it at 40%: the
/// client retries, asks the offset (HEAD) and resumes from exactly the bytes the server kept.
/// PATCH bodies add up to the file size and a little more at most; SHA-256 matches.
pub fn tus_js_resumes_after_cut(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let file = SourceFile::new(2 * MIB + 4321, 43);
    let proxy = Proxy::cutting_first_patch(server.addr(), file.len() as u64 * 2 / 5);
    let endpoint = format!("http://{}/files/", proxy.addr());
    let report = tus_js(&endpoint, &file, &["--retry-delays", JS_RETRY_DELAYS]);
    let path = succeeded(&report, &file);
    assert_resumed(&proxy, &report, &file, &path);
    file.assert_download(server.addr(), &path);
}

/// tuspy uploads 3 MiB (and a bit) in 1 MiB PATCHes; the download has the file's SHA-256.
pub fn tuspy_chunked_upload(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let file = SourceFile::new(3 * MIB + 12_345, 44);
    let endpoint = format!("http://{}/files/", server.addr());
    let report = tuspy(&endpoint, &file, &["--chunk-size", &MIB.to_string()]);
    let path = succeeded(&report, &file);
    file.assert_download(server.addr(), &path);
}

/// tuspy uploads in 1 MiB PATCHes through a proxy that cuts the first at 40%: it retries from
/// the offset the server kept (HEAD, then PATCH) and finishes; SHA-256 matches.
pub fn tuspy_resumes_after_cut(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let file = SourceFile::new(2 * MIB + 4321, 45);
    let proxy = Proxy::cutting_first_patch(server.addr(), MIB as u64 * 2 / 5);
    let endpoint = format!("http://{}/files/", proxy.addr());
    let chunk = MIB.to_string();
    let flags = [
        "--chunk-size",
        &chunk,
        "--retries",
        "5",
        "--retry-delay",
        "0.05",
    ];
    let report = tuspy(&endpoint, &file, &flags);
    let path = succeeded(&report, &file);
    assert_resumed(&proxy, &report, &file, &path);
    file.assert_download(server.addr(), &path);
}

/// The cut happened in a PATCH of `path`, and after it the client asked the offset (HEAD) and
/// sent a PATCH from exactly where the cut left the upload: nothing acknowledged was sent twice.
#[track_caller]
fn assert_resumed(proxy: &Proxy, report: &Value, file: &SourceFile, path: &str) {
    let requests = proxy.requests();
    let Some(at) = requests.iter().position(|r| r.cut) else {
        panic!("the proxy never cut a PATCH: {}", summary(&requests));
    };
    let cut = &requests[at];
    let shown = summary(&requests);
    assert!(
        cut.method == "PATCH" && cut.target == path,
        "the cut PATCH is not one of {path}: {shown}"
    );
    let kept = cut.upload_offset.unwrap_or(0) + cut.body_bytes;
    let after = &requests[at + 1..];
    let head = after
        .iter()
        .position(|r| r.method == "HEAD" && r.target == path);
    let resume = after
        .iter()
        .position(|r| r.method == "PATCH" && r.target == path && r.upload_offset == Some(kept));
    assert!(
        matches!((head, resume), (Some(h), Some(p)) if h < p),
        "after the cut at offset {kept}: expected a HEAD, then a PATCH from {kept}: {shown}"
    );
    let retries = report.get("retries").and_then(Value::as_u64).unwrap_or(0);
    assert!(
        retries >= 1,
        "the client saw the cut and retried: {report:?}"
    );
    let size = file.len() as u64;
    let patched = proxy.patch_body_bytes();
    assert!(
        patched >= size && patched * 10 < size * 14,
        "PATCH bodies add up to {patched} bytes for a {size}-byte file: expected the file and \
         at most what was in flight at the cut: {shown}"
    );
}

/// One line per request, for failure messages.
fn summary(requests: &[Forwarded]) -> String {
    requests
        .iter()
        .map(|r| {
            format!(
                "\n  #{} {} {} offset {:?} body {}{}",
                r.connection,
                r.method,
                r.target,
                r.upload_offset,
                r.body_bytes,
                if r.cut { " CUT" } else { "" }
            )
        })
        .collect()
}

/// The report says the upload succeeded with every byte; returns the upload's path.
#[track_caller]
fn succeeded(report: &Value, file: &SourceFile) -> String {
    assert_eq!(
        report.get("ok").and_then(Value::as_bool),
        Some(true),
        "{report:?}"
    );
    assert_eq!(
        report.get("bytes").and_then(Value::as_u64),
        Some(file.len() as u64),
        "{report:?}"
    );
    let url = report.get("url").and_then(Value::as_str).unwrap_or("");
    match url.find("/files/") {
        Some(i) if url.starts_with("http://") => url[i..].to_string(),
        _ => panic!("the upload URL should be http://HOST/files/ID: {report:?}"),
    }
}

/// The statuses of the requests with `method` in a tus-js-client report, in order.
fn statuses(report: &Value, method: &str) -> Vec<u64> {
    report
        .get("requests")
        .and_then(Value::as_array)
        .unwrap_or_default()
        .iter()
        .filter(|r| r.get("method").and_then(Value::as_str) == Some(method))
        .filter_map(|r| r.get("status").and_then(Value::as_u64))
        .collect()
}

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../clients")
}

/// `node clients/tus-upload.mjs ENDPOINT FILE FLAGS...`: its report.
#[track_caller]
fn tus_js(endpoint: &str, file: &SourceFile, flags: &[&str]) -> Value {
    let dir = clients_dir();
    assert!(
        dir.join("node_modules/tus-js-client").exists(),
        "tus-js-client is not installed: run `npm ci --prefix clients` (Node.js 18 or later)"
    );
    let mut command = Command::new("node");
    command
        .arg(dir.join("tus-upload.mjs"))
        .arg(endpoint)
        .arg(&file.path)
        .args(flags);
    run_client(
        command,
        "node (install Node.js 18 or later: apt-get install nodejs npm)",
    )
}

/// `python3 clients/tus_upload.py ENDPOINT FILE FLAGS...`: its report.
#[track_caller]
fn tuspy(endpoint: &str, file: &SourceFile, flags: &[&str]) -> Value {
    let mut command = Command::new("python3");
    command
        .arg(clients_dir().join("tus_upload.py"))
        .arg(endpoint)
        .arg(&file.path)
        .args(flags);
    run_client(command, "python3 (install Python 3.8 or later)")
}

/// Runs a client script to its end (killed after [`CLIENT_TIMEOUT`]) and parses the JSON
/// line it prints last. Panics, with its output, if it does not print one.
#[track_caller]
fn run_client(mut command: Command, what: &str) -> Value {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let read_all = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = read_all(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = read_all(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let (stdout, stderr) = (
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default(),
    );
    let shown = || format!("{command:?}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    let Some(status) = status else {
        panic!(
            "the client ran past {CLIENT_TIMEOUT:?} and was killed: {}",
            shown()
        );
    };
    if status.code() == Some(3) {
        // tus_upload.py's word for a missing package.
        panic!("{}", stderr.trim());
    }
    let report = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .and_then(|l| json::parse(l).ok());
    match report {
        Some(v) if exit_agrees(status, &v) => v,
        _ => panic!(
            "the client {}: {}",
            crate::server::describe_exit(status),
            shown()
        ),
    }
}

/// Exit 0 exactly when the report says ok.
fn exit_agrees(status: ExitStatus, report: &Value) -> bool {
    status.success() == (report.get("ok").and_then(Value::as_bool) == Some(true))
}

/// A file of pseudo-random bytes for a client to upload; removed on drop.
struct SourceFile {
    dir: PathBuf,
    path: PathBuf,
    sha256: Vec<u8>,
    len: usize,
}

impl SourceFile {
    fn new(len: usize, seed: u64) -> SourceFile {
        let dir = fresh_data_dir().with_extension("client");
        std::fs::create_dir_all(&dir).expect("create the upload source's directory");
        let path = dir.join(format!("upload-{seed}.bin"));
        let data = pseudo_random_bytes(len, seed);
        std::fs::write(&path, &data).expect("write the upload source");
        SourceFile {
            dir,
            path,
            sha256: sha2::Sha256::digest(&data).to_vec(),
            len,
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    /// `GET path` from the server (not through any proxy) has this file's SHA-256.
    #[track_caller]
    fn assert_download(&self, addr: SocketAddr, path: &str) {
        let mut c = Client::connect(addr);
        let r = c.request(format!("GET {path} HTTP/1.1\r\nHost: blackbox\r\n\r\n"));
        r.assert_status(200);
        assert_eq!(
            r.body.len(),
            self.len,
            "the download's length (the upload was {} bytes)",
            self.len
        );
        assert!(
            sha2::Sha256::digest(&r.body).as_slice() == self.sha256,
            "the download's SHA-256 differs from the uploaded file's"
        );
    }
}

impl Drop for SourceFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
