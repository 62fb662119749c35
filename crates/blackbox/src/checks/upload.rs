//! Uploads: tus 1.0.0 at `/files/` (creation, PATCH at an offset, HEAD, checksums, the lock,
//! a cut connection that keeps what arrived, deferred length, concatenation in any order,
//! termination, expiry), downloads of finished uploads, and the plain `POST /upload` that
//! streams its body without keeping it.

use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::Digest as _;

use super::app::json_body;
use super::{pseudo_random_bytes, with};
use crate::client::{Client, Response};
use crate::json::Value;
use crate::server::Server;

const TUS: &str = "Tus-Resumable: 1.0.0\r\n";
const OFFSET_STREAM: &str = "Content-Type: application/offset+octet-stream\r\n";

/// A request with `headers` (each line ending in CRLF) and `body` framed by Content-Length.
fn request(method: &str, target: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "{method} {target} HTTP/1.1\r\nHost: blackbox\r\nContent-Length: {}\r\n{headers}\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// `POST /files/` with `headers` (plus Tus-Resumable); returns the new upload's path.
#[track_caller]
pub fn tus_create(c: &mut Client, headers: &str) -> String {
    let r = c.request(request("POST", "/files/", &format!("{TUS}{headers}"), b""));
    r.assert_status(201).assert_header("Tus-Resumable", "1.0.0");
    location(&r)
}

#[track_caller]
fn location(r: &Response) -> String {
    let Some(location) = r.header("Location") else {
        panic!("201 without Location:\n{r:?}");
    };
    assert!(
        location.starts_with("/files/") && location.len() > "/files/".len(),
        "Location should be /files/ID:\n{r:?}"
    );
    location.to_string()
}

/// `PATCH path` with `bytes` at `offset` (and `extra` headers).
pub fn tus_patch(c: &mut Client, path: &str, offset: u64, bytes: &[u8], extra: &str) -> Response {
    let headers = format!("{TUS}{OFFSET_STREAM}Upload-Offset: {offset}\r\n{extra}");
    c.request(request("PATCH", path, &headers, bytes))
}

/// `HEAD path`: the upload's offset (asserting 200 and `Cache-Control: no-store`).
#[track_caller]
pub fn tus_offset(c: &mut Client, path: &str) -> u64 {
    let r = c.request(format!(
        "HEAD {path} HTTP/1.1\r\nHost: blackbox\r\n{TUS}\r\n"
    ));
    r.assert_status(200)
        .assert_header("Cache-Control", "no-store");
    header_u64(&r, "Upload-Offset")
}

#[track_caller]
fn header_u64(r: &Response, name: &str) -> u64 {
    r.header(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name}: expected a number:\n{r:?}"))
}

#[track_caller]
fn assert_offset(r: &Response, status: u16, offset: u64) {
    r.assert_status(status)
        .assert_header("Tus-Resumable", "1.0.0");
    assert_eq!(header_u64(r, "Upload-Offset"), offset, "{r:?}");
}

/// `GET path`: the upload's bytes.
#[track_caller]
fn download(c: &mut Client, path: &str) -> Vec<u8> {
    let r = c.request(format!("GET {path} HTTP/1.1\r\nHost: blackbox\r\n\r\n"));
    r.assert_status(200);
    assert_eq!(
        r.header("Content-Length").and_then(|v| v.parse().ok()),
        Some(r.body.len()),
        "a download has a Content-Length:\n{r:?}"
    );
    r.body.clone()
}

fn sha1_b64(bytes: &[u8]) -> String {
    BASE64.encode(sha1::Sha1::digest(bytes))
}

fn sha256_b64(bytes: &[u8]) -> String {
    BASE64.encode(sha2::Sha256::digest(bytes))
}

/// `OPTIONS /files/` names the version, the extensions, the size limit and the checksums; a
/// request without `Tus-Resumable: 1.0.0` gets 412 and `Tus-Version`.
pub fn tus_options_and_version(bin: &str, args: &[&str]) {
    let server = Server::start(bin, &with(args, &["--max-upload", "5M"]));
    let mut c = Client::connect(server.addr());
    let r = c.request("OPTIONS /files/ HTTP/1.1\r\nHost: blackbox\r\n\r\n");
    r.assert_status(204)
        .assert_header("Tus-Version", "1.0.0")
        .assert_header("Tus-Max-Size", &(5u64 << 20).to_string())
        .assert_header("Tus-Checksum-Algorithm", "sha1,sha256");
    let extensions = r.header("Tus-Extension").unwrap_or_default();
    for ext in [
        "creation",
        "creation-with-upload",
        "creation-defer-length",
        "termination",
        "checksum",
        "expiration",
        "concatenation",
    ] {
        assert!(
            extensions.split(',').any(|e| e == ext),
            "Tus-Extension should list {ext}:\n{r:?}"
        );
    }
    for version in ["", "Tus-Resumable: 0.2.2\r\n"] {
        let r = c.request(request(
            "POST",
            "/files/",
            &format!("{version}Upload-Length: 5\r\n"),
            b"",
        ));
        r.assert_status(412).assert_header("Tus-Version", "1.0.0");
    }
    let path = tus_create(&mut c, "Upload-Length: 5\r\n");
    let r = c.request(format!("HEAD {path} HTTP/1.1\r\nHost: blackbox\r\n\r\n"));
    r.assert_status(412);
}

/// An upload created with metadata, sent in three PATCHes (one of them chunked), reports its
/// offset after each, and downloads back byte for byte with a Content-Length.
pub fn tus_upload_in_pieces_and_download(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut c = Client::connect(server.addr());
    let data = pseudo_random_bytes(1 << 20, 15);
    let path = tus_create(
        &mut c,
        &format!(
            "Upload-Length: {}\r\nUpload-Metadata: filename ZGF0YS5iaW4=,public\r\n",
            data.len()
        ),
    );
    let r = c.request(format!(
        "HEAD {path} HTTP/1.1\r\nHost: blackbox\r\n{TUS}\r\n"
    ));
    assert_offset(&r, 200, 0);
    r.assert_header("Upload-Length", &data.len().to_string())
        .assert_header("Upload-Metadata", "filename ZGF0YS5iaW4=,public");
    assert!(
        r.header("Upload-Expires").is_some(),
        "unfinished: it expires:\n{r:?}"
    );

    let (a, b) = (300_000, 700_000);
    let r = tus_patch(&mut c, &path, 0, &data[..a], "");
    assert_offset(&r, 204, a as u64);
    // The second piece chunked, in uneven chunks.
    let mut chunked = format!(
        "PATCH {path} HTTP/1.1\r\nHost: blackbox\r\n{TUS}{OFFSET_STREAM}Upload-Offset: {a}\r\n\
         Transfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for piece in data[a..b].chunks(77_777) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    assert_offset(&c.request(&chunked), 204, b as u64);
    assert_eq!(tus_offset(&mut c, &path), b as u64);
    let r = tus_patch(&mut c, &path, b as u64, &data[b..], "");
    assert_offset(&r, 204, data.len() as u64);
    assert!(
        r.header("Upload-Expires").is_none(),
        "finished: it does not expire:\n{r:?}"
    );
    r.assert_keeps_alive();
    let back = download(&mut c, &path);
    assert!(back == data, "the download differs from the upload");
    // The same connection goes on.
    assert_eq!(tus_offset(&mut c, &path), data.len() as u64);
}

/// Wrong offset 409, wrong Content-Type 415, no Upload-Offset 400, past Upload-Length 413,
/// unknown upload 404, bad checksum 460: each changes nothing. A good sha1 or sha256 checksum
/// is accepted; an unknown algorithm is 400. Creation: no length 400, both lengths 400, past
/// `--max-upload` 413, bad metadata 400.
pub fn tus_rejects_bad_requests(bin: &str, args: &[&str]) {
    let server = Server::start(bin, &with(args, &["--max-upload", "1M"]));
    let mut c = Client::connect(server.addr());
    let path = tus_create(&mut c, "Upload-Length: 10\r\n");
    assert_offset(&tus_patch(&mut c, &path, 0, b"abc", ""), 204, 3);

    let r = tus_patch(&mut c, &path, 0, b"xyz", "");
    r.assert_status(409);
    assert_eq!(
        header_u64(&r, "Upload-Offset"),
        3,
        "409 says where the upload is:\n{r:?}"
    );
    let r = c.request(request(
        "PATCH",
        &path,
        &format!("{TUS}Content-Type: text/plain\r\nUpload-Offset: 3\r\n"),
        b"def",
    ));
    r.assert_status(415);
    let r = c.request(request(
        "PATCH",
        &path,
        &format!("{TUS}{OFFSET_STREAM}"),
        b"def",
    ));
    r.assert_status(400);
    let r = tus_patch(&mut c, &path, 3, b"defghijklmnop", "");
    r.assert_status(413);
    let r = tus_patch(
        &mut c,
        &path,
        3,
        b"def",
        &format!("Upload-Checksum: sha1 {}\r\n", sha1_b64(b"xxx")),
    );
    r.assert_status(460);
    let r = tus_patch(
        &mut c,
        &path,
        3,
        b"def",
        "Upload-Checksum: md5 kAFQmDzST7DWlj99KOF/cg==\r\n",
    );
    r.assert_status(400);
    let mut c = Client::connect(server.addr());
    assert_eq!(
        tus_offset(&mut c, &path),
        3,
        "refused requests change nothing"
    );
    let r = tus_patch(
        &mut c,
        &path,
        3,
        b"def",
        &format!("Upload-Checksum: sha1 {}\r\n", sha1_b64(b"def")),
    );
    assert_offset(&r, 204, 6);
    let r = tus_patch(
        &mut c,
        &path,
        6,
        b"ghij",
        &format!("Upload-Checksum: sha256 {}\r\n", sha256_b64(b"ghij")),
    );
    assert_offset(&r, 204, 10);
    assert_eq!(download(&mut c, &path), b"abcdefghij");

    let unknown = "/files/0123456789abcdef0123456789abcdef";
    tus_patch(&mut c, unknown, 0, b"a", "").assert_status(404);
    let r = c.request(format!(
        "HEAD {unknown} HTTP/1.1\r\nHost: blackbox\r\n{TUS}\r\n"
    ));
    r.assert_status(404);
    let r = c.request(format!(
        "HEAD /files/../../etc/passwd HTTP/1.1\r\nHost: blackbox\r\n{TUS}\r\n"
    ));
    assert!(r.status == 404 || r.status == 400, "{r:?}");

    for (headers, status) in [
        ("", 400),
        ("Upload-Length: 5\r\nUpload-Defer-Length: 1\r\n", 400),
        ("Upload-Length: -1\r\n", 400),
        ("Upload-Defer-Length: 2\r\n", 400),
        (&*format!("Upload-Length: {}\r\n", (1 << 20) + 1), 413),
        (
            "Upload-Length: 5\r\nUpload-Metadata: name not-base64!\r\n",
            400,
        ),
        ("Upload-Length: 5\r\nUpload-Concat: whole\r\n", 400),
    ] {
        let r = c.request(request("POST", "/files/", &format!("{TUS}{headers}"), b""));
        assert_eq!(r.status, status, "POST /files/ with {headers:?}:\n{r:?}");
    }
}

/// The connection is cut in the middle of a PATCH: what arrived is kept, HEAD reports it, and
/// the client resumes from there and finishes; the download is the whole file.
pub fn tus_cut_connection_keeps_what_arrived(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut c = Client::connect(server.addr());
    let data = pseudo_random_bytes(2 << 20, 16);
    let path = tus_create(&mut c, &format!("Upload-Length: {}\r\n", data.len()));
    let sent = 1_234_567;
    {
        let mut cut = Client::connect(server.addr());
        let head = format!(
            "PATCH {path} HTTP/1.1\r\nHost: blackbox\r\n{TUS}{OFFSET_STREAM}Upload-Offset: 0\r\n\
             Content-Length: {}\r\n\r\n",
            data.len()
        );
        cut.send(head);
        cut.send(&data[..sent]);
        // Dropped: the connection closes with the body 40% sent.
    }
    // The server writes what arrived before it hears of the close.
    let deadline = Instant::now() + Duration::from_secs(10);
    let offset = loop {
        let offset = tus_offset(&mut c, &path);
        if offset == sent as u64 || Instant::now() > deadline {
            break offset;
        }
        thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        offset, sent as u64,
        "every byte that arrived before the cut is kept"
    );
    // The lock goes with the connection, once the server has read its end (the last bytes
    // may be written before the FIN is read: 423 meanwhile, which clients retry).
    let r = loop {
        let r = tus_patch(&mut c, &path, offset, &data[sent..], "");
        if r.status != 423 || Instant::now() > deadline {
            break r;
        }
        thread::sleep(Duration::from_millis(20));
    };
    assert_offset(&r, 204, data.len() as u64);
    assert!(
        download(&mut c, &path) == data,
        "the resumed upload differs"
    );
}

/// While one PATCH writes an upload, a second PATCH and a DELETE of it get 423 and change
/// nothing; once the first ends, the upload takes the next PATCH.
pub fn tus_one_patch_at_a_time(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut c = Client::connect(server.addr());
    let path = tus_create(&mut c, "Upload-Length: 20\r\n");
    let mut first = Client::connect(server.addr());
    first.send(format!(
        "PATCH {path} HTTP/1.1\r\nHost: blackbox\r\n{TUS}{OFFSET_STREAM}Upload-Offset: 0\r\n\
         Content-Length: 10\r\n\r\nabcde"
    ));
    // The first PATCH holds the lock once its first bytes are written.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tus_offset(&mut c, &path) < 5 {
        assert!(
            Instant::now() < deadline,
            "the first PATCH's bytes never arrived"
        );
        thread::sleep(Duration::from_millis(10));
    }
    let r = tus_patch(&mut c, &path, 5, b"XXXXX", "");
    r.assert_status(423);
    let r = c.request(request("DELETE", &path, TUS, b""));
    r.assert_status(423);
    first.send("fghij");
    assert_offset(&first.read_response(), 204, 10);
    assert_offset(&tus_patch(&mut c, &path, 10, b"klmnopqrst", ""), 204, 20);
    assert_eq!(download(&mut c, &path), b"abcdefghijklmnopqrst");
}

/// `Upload-Defer-Length: 1`: HEAD says so until a PATCH declares the length; creation with
/// upload: the POST's body is the first bytes (201 with their offset).
pub fn tus_defer_length_and_creation_with_upload(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut c = Client::connect(server.addr());
    let path = tus_create(&mut c, "Upload-Defer-Length: 1\r\n");
    let r = c.request(format!(
        "HEAD {path} HTTP/1.1\r\nHost: blackbox\r\n{TUS}\r\n"
    ));
    r.assert_status(200)
        .assert_header("Upload-Defer-Length", "1");
    assert_offset(&tus_patch(&mut c, &path, 0, b"hello ", ""), 204, 6);
    let r = tus_patch(&mut c, &path, 6, b"world", "Upload-Length: 11\r\n");
    assert_offset(&r, 204, 11);
    let r = c.request(format!(
        "HEAD {path} HTTP/1.1\r\nHost: blackbox\r\n{TUS}\r\n"
    ));
    r.assert_header("Upload-Length", "11");
    assert_eq!(download(&mut c, &path), b"hello world");

    let r = c.request(request(
        "POST",
        "/files/",
        &format!("{TUS}{OFFSET_STREAM}Upload-Length: 9\r\n"),
        b"first",
    ));
    assert_offset(&r, 201, 5);
    let path = location(&r);
    assert_offset(&tus_patch(&mut c, &path, 5, b"last", ""), 204, 9);
    assert_eq!(download(&mut c, &path), b"firstlast");
}

/// Concatenation: three partial uploads sent in the order 1, 3, 2 (the last two at once, on
/// two connections), then a final upload joins them in order 1, 2, 3. A final naming an
/// unfinished part is 400, and a final takes no PATCH (403).
pub fn tus_concatenation_out_of_order(bin: &str, args: &[&str]) {
    let server = Server::start(bin, args);
    let mut c = Client::connect(server.addr());
    let data = pseudo_random_bytes(600_000, 17);
    let parts: Vec<&[u8]> = data.chunks(200_000).collect();
    let paths: Vec<String> = parts
        .iter()
        .map(|p| {
            tus_create(
                &mut c,
                &format!("Upload-Concat: partial\r\nUpload-Length: {}\r\n", p.len()),
            )
        })
        .collect();
    let r = c.request(request(
        "POST",
        "/files/",
        &format!("{TUS}Upload-Concat: final;{} {}\r\n", paths[0], paths[1]),
        b"",
    ));
    r.assert_status(400);
    assert_offset(&tus_patch(&mut c, &paths[0], 0, parts[0], ""), 204, 200_000);
    let addr = server.addr();
    thread::scope(|s| {
        for i in [2, 1] {
            let (path, part) = (&paths[i], parts[i]);
            s.spawn(move || {
                let mut c = Client::connect(addr);
                assert_offset(
                    &tus_patch(&mut c, path, 0, part, ""),
                    204,
                    part.len() as u64,
                );
            });
        }
    });
    let r = c.request(format!(
        "HEAD {} HTTP/1.1\r\nHost: blackbox\r\n{TUS}\r\n",
        paths[1]
    ));
    r.assert_header("Upload-Concat", "partial");
    // Full URLs, as tus-js-client sends them.
    let urls: Vec<String> = paths.iter().map(|p| format!("http://{addr}{p}")).collect();
    let concat = format!("final;{}", urls.join(" "));
    let r = c.request(request(
        "POST",
        "/files/",
        &format!("{TUS}Upload-Concat: {concat}\r\n"),
        b"",
    ));
    assert_offset(&r, 201, data.len() as u64);
    let joined = location(&r);
    let r = c.request(format!(
        "HEAD {joined} HTTP/1.1\r\nHost: blackbox\r\n{TUS}\r\n"
    ));
    r.assert_status(200)
        .assert_header("Upload-Concat", &concat)
        .assert_header("Upload-Length", &data.len().to_string());
    assert!(
        download(&mut c, &joined) == data,
        "the parts joined out of order"
    );
    tus_patch(&mut c, &joined, data.len() as u64, b"x", "").assert_status(403);
}

/// DELETE: 204, then the upload is gone (404). With `--upload-expiry 1s`, an unfinished
/// upload left alone answers 410, carries `Upload-Expires`, and its bytes are deleted; a
/// finished one stays.
pub fn tus_termination_and_expiry(bin: &str, args: &[&str]) {
    let server = Server::start(bin, &with(args, &["--upload-expiry", "1s"]));
    let mut c = Client::connect(server.addr());
    let path = tus_create(&mut c, "Upload-Length: 10\r\n");
    tus_patch(&mut c, &path, 0, b"abc", "").assert_status(204);
    c.request(request("DELETE", &path, TUS, b""))
        .assert_status(204);
    let r = c.request(format!(
        "HEAD {path} HTTP/1.1\r\nHost: blackbox\r\n{TUS}\r\n"
    ));
    r.assert_status(404);
    tus_patch(&mut c, &path, 3, b"def", "").assert_status(404);

    let expiring = tus_create(&mut c, "Upload-Length: 10\r\n");
    let r = tus_patch(&mut c, &expiring, 0, b"abc", "");
    r.assert_status(204);
    assert!(
        r.header("Upload-Expires")
            .is_some_and(|d| d.ends_with(" GMT")),
        "{r:?}"
    );
    let finished = tus_create(&mut c, "Upload-Length: 3\r\n");
    tus_patch(&mut c, &finished, 0, b"xyz", "").assert_status(204);
    thread::sleep(Duration::from_millis(2100));
    let r = c.request(format!(
        "HEAD {expiring} HTTP/1.1\r\nHost: blackbox\r\n{TUS}\r\n"
    ));
    r.assert_status(410);
    tus_patch(&mut c, &expiring, 3, b"def", "").assert_status(404);
    let dir = server
        .data_dir()
        .expect("the suite gives each server its data dir");
    let id = expiring.trim_start_matches("/files/");
    assert!(
        !dir.join("uploads").join(id).exists(),
        "an expired upload's bytes are deleted"
    );
    assert_eq!(
        download(&mut c, &finished),
        b"xyz",
        "a finished upload does not expire"
    );
}

/// `POST /upload` streams a body of any size (here 20 MiB chunked, past `--max-body`) and
/// answers its size and SHA-256, while `POST /echo` still buffers (and 413s past
/// `--max-body`).
pub fn plain_upload_streams_past_max_body(bin: &str, args: &[&str]) {
    let server = Server::start(bin, &with(args, &["--max-body", "1M"]));
    let mut c = Client::connect(server.addr());
    let piece = pseudo_random_bytes(1 << 20, 18);
    let mut hash = sha2::Sha256::new();
    c.send("POST /upload HTTP/1.1\r\nHost: blackbox\r\nTransfer-Encoding: chunked\r\n\r\n");
    for _ in 0..20 {
        c.send(format!("{:x}\r\n", piece.len()));
        c.send(&piece);
        c.send("\r\n");
        hash.update(&piece);
    }
    c.send("0\r\n\r\n");
    let r = c.read_response();
    r.assert_status(200);
    let v = json_body(&r);
    assert_eq!(
        v.get("bytes").and_then(Value::as_u64),
        Some(20 << 20),
        "{r:?}"
    );
    let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        v.get("sha256").and_then(Value::as_str),
        Some(&*hex),
        "{r:?}"
    );
    r.assert_keeps_alive();
    let r = c.request(super::post_echo(&vec![b'x'; (1 << 20) + 1]));
    r.assert_status(413);
}
