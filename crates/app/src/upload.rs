//! Uploads that survive a cut connection: the tus 1.0.0 protocol at `/files/` (core, creation,
//! creation-with-upload, creation-defer-length, termination, checksum, expiration and
//! concatenation), next to `POST /upload`, one plain streamed request that cannot resume, and
//! `GET /files/ID`, which streams a finished upload back.
//!
//! An upload is two files under `--data-dir/uploads`: `ID` holds the bytes received (its size
//! is the offset, as in tusd's file store) and `ID.info` what the creation said, as JSON. A
//! PATCH holds an exclusive `flock` on `ID` while it writes, so at most one writes an upload at
//! a time, across threads and prefork's processes; the lock goes with the file descriptor, so a
//! dead connection (or process) releases it. The body is written as it arrives, a piece at a
//! time (proto never buffers more than 64 KiB of it), so bytes that arrived before a cut stay
//! and the next HEAD reports them.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use proto::{BodyChunk, Conn, Response};
use serde::{Deserialize, Serialize};
use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::problem::problem;
use crate::reply::{Reply, Stream, StreamKind};
use crate::{App, Routable};

pub const TUS_VERSION: &str = "1.0.0";
const TUS_EXTENSIONS: &str = "creation,creation-with-upload,creation-defer-length,termination,\
                              checksum,expiration,concatenation";
const TUS_CHECKSUMS: &str = "sha1,sha256";
const OFFSET_STREAM: &str = "application/offset+octet-stream";
/// Expired uploads are looked for at most this often (when an upload is created).
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// A download reads the file this much at a time at most.
const READ_PIECE: usize = 256 * 1024;

/// Whether a request's body goes to the application as it arrives (see
/// `proto::Config::stream_body`): the upload routes. Every other body is buffered whole.
/// A POST to `/files/ID` may be a PATCH under `X-HTTP-Method-Override`, which this cannot see.
pub fn streams_body(method: &str, path: &str) -> bool {
    match method {
        "POST" => matches!(path, "/files" | "/upload") || path.starts_with("/files/"),
        "PATCH" => path.starts_with("/files/"),
        _ => false,
    }
}

/// The uploads of one server: where they live and the flags that bound them.
pub(crate) struct Uploads {
    dir: PathBuf,
    max: u64,
    expiry: Duration,
    /// `--commit sync`: a PATCH is acknowledged once its bytes are on disk (fdatasync).
    sync: bool,
    /// Unix seconds of the last sweep for expired uploads (shared by this process's threads).
    last_sweep: AtomicU64,
}

/// What `ID.info` holds.
#[derive(Serialize, Deserialize, Clone, Debug)]
struct Info {
    /// `None` until a deferred length is declared.
    length: Option<u64>,
    /// `Upload-Metadata`, as sent (checked, never decoded).
    #[serde(default)]
    metadata: String,
    /// `partial`, or `final;URL URL...`; empty for an ordinary upload.
    #[serde(default)]
    concat: String,
}

impl Info {
    fn is_partial(&self) -> bool {
        self.concat == "partial"
    }

    fn is_final(&self) -> bool {
        self.concat.starts_with("final;")
    }
}

impl Uploads {
    pub(crate) fn open(
        data_dir: &Path,
        max: u64,
        expiry: Duration,
        sync: bool,
    ) -> io::Result<Uploads> {
        let dir = data_dir.join("uploads");
        fs::create_dir_all(&dir)?;
        Ok(Uploads {
            dir,
            max,
            expiry,
            sync,
            last_sweep: AtomicU64::new(0),
        })
    }

    fn data_path(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    fn info_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.info"))
    }

    fn read_info(&self, id: &str) -> io::Result<Info> {
        let bytes = fs::read(self.info_path(id))?;
        serde_json::from_slice(&bytes).map_err(io::Error::other)
    }

    /// Writes `ID.info` whole or not at all (a temporary file renamed over it).
    fn write_info(&self, id: &str, info: &Info) -> io::Result<()> {
        let tmp = self.dir.join(format!("{id}.info.tmp"));
        let mut bytes = serde_json::to_vec(info).map_err(io::Error::other)?;
        bytes.push(b'\n');
        fs::write(&tmp, &bytes)?;
        if self.sync {
            File::open(&tmp)?.sync_data()?;
        }
        fs::rename(&tmp, self.info_path(id))?;
        if self.sync {
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }

    /// When an unfinished upload expires: `--upload-expiry` after its last write.
    fn expires(&self, meta: &fs::Metadata) -> SystemTime {
        meta.modified().unwrap_or(UNIX_EPOCH) + self.expiry
    }

    /// Looks an upload up: its info and the size of its bytes. An unfinished one past its
    /// expiry is removed here, and answers 410.
    fn find(&self, id: &str) -> Result<(Info, fs::Metadata), Response> {
        if !valid_id(id) {
            return Err(not_found());
        }
        let (info, meta) = match (self.read_info(id), fs::metadata(self.data_path(id))) {
            (Ok(info), Ok(meta)) => (info, meta),
            (Err(e), _) | (_, Err(e)) if e.kind() == io::ErrorKind::NotFound => {
                return Err(not_found());
            }
            (Err(e), _) | (_, Err(e)) => return Err(io_error("reading the upload", &e)),
        };
        let finished = info.length == Some(meta.len());
        if !finished && SystemTime::now() >= self.expires(&meta) {
            // Expired: gone for good (unless a PATCH holds it this instant).
            let _ = self.remove(id);
            return Err(tus(problem(410, "this upload expired; create a new one")));
        }
        Ok((info, meta))
    }

    /// Deletes an upload, unless a PATCH is writing it (`Ok(false)`).
    fn remove(&self, id: &str) -> io::Result<bool> {
        let file = match OpenOptions::new().write(true).open(self.data_path(id)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let _ = fs::remove_file(self.info_path(id));
                return Ok(true);
            }
            Err(e) => return Err(e),
        };
        if !try_lock(&file)? {
            return Ok(false);
        }
        match fs::remove_file(self.info_path(id)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        fs::remove_file(self.data_path(id))?;
        Ok(true)
    }

    /// Removes every expired unfinished upload, at most once per [`SWEEP_EVERY`].
    fn sweep(&self) {
        let now = unix_secs(SystemTime::now());
        let last = self.last_sweep.load(Ordering::Relaxed);
        if now < last + SWEEP_EVERY.as_secs()
            || self
                .last_sweep
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(id) = name.to_str().filter(|n| valid_id(n)) else {
                continue;
            };
            // `find` removes what expired.
            let _ = self.find(id);
        }
    }
}

/// Which hash an `Upload-Checksum` names.
enum Hasher {
    Sha1(Sha1),
    Sha256(Sha256),
}

impl Hasher {
    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha1(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
        }
    }

    fn finish(self) -> Vec<u8> {
        match self {
            Hasher::Sha1(h) => h.finalize().to_vec(),
            Hasher::Sha256(h) => h.finalize().to_vec(),
        }
    }
}

/// A request whose body the application takes as it arrives. The driver feeds it whatever the
/// connection has read ([`BodySink::feed`]) until it gives the reply. Dropped before that (the
/// connection died), it keeps what was written: a tus upload's bytes stay, for the client to
/// resume after.
pub struct BodySink {
    kind: SinkKind,
}

enum SinkKind {
    Tus(TusWrite),
    Plain { hash: Sha256, bytes: u64 },
}

/// A PATCH (or a creation with its first bytes) writing one upload, under its lock.
struct TusWrite {
    app: App,
    id: String,
    /// Locked (`flock`) for as long as this lives.
    file: File,
    start: u64,
    offset: u64,
    /// Writing past this is 413: the upload's length, or `--max-upload`.
    limit: u64,
    length: Option<u64>,
    checksum: Option<(Hasher, Vec<u8>)>,
    /// A creation (201 with `Location`) rather than a PATCH (204).
    created: bool,
    /// Replied: nothing to undo when dropped.
    settled: bool,
}

impl BodySink {
    /// Takes every piece of the body the connection has buffered. Returns the reply once the
    /// body has ended (or broke, or was refused): the driver files it and drops the sink.
    pub fn feed(&mut self, conn: &mut Conn) -> Option<Response> {
        loop {
            match conn.body_chunk() {
                BodyChunk::Data(piece) => {
                    let n = piece.len();
                    if let Err(refused) = self.take(piece) {
                        return Some(refused);
                    }
                    conn.consume_body(n);
                }
                BodyChunk::Wait => return None,
                BodyChunk::Done => return Some(self.finish()),
                BodyChunk::Broken => return Some(self.broken()),
            }
        }
    }

    fn take(&mut self, piece: &[u8]) -> Result<(), Response> {
        match &mut self.kind {
            SinkKind::Plain { hash, bytes } => {
                hash.update(piece);
                *bytes += piece.len() as u64;
                Ok(())
            }
            SinkKind::Tus(w) => w.take(piece),
        }
    }

    fn finish(&mut self) -> Response {
        match &mut self.kind {
            SinkKind::Plain { hash, bytes } => {
                let sha256 = hex(&std::mem::take(hash).finalize());
                let body = serde_json::json!({ "bytes": *bytes, "sha256": sha256 });
                Response::owned(200, "application/json", format!("{body}\n").into_bytes())
            }
            SinkKind::Tus(w) => w.finish(),
        }
    }

    /// The body stopped before its end (the peer closed, or proto refused its framing or
    /// timed it out: then proto's own error goes out instead of this reply).
    fn broken(&mut self) -> Response {
        let mut r = match &mut self.kind {
            SinkKind::Plain { bytes, .. } => problem(
                400,
                format!(
                    "the body stopped after {bytes} bytes; nothing was kept: send it all again"
                ),
            ),
            SinkKind::Tus(w) => {
                w.cut();
                tus(problem(
                    400,
                    format!(
                        "the body stopped at offset {}; what arrived is kept: HEAD, then resume",
                        w.offset
                    ),
                ))
            }
        };
        r.close = true;
        r
    }
}

impl TusWrite {
    fn take(&mut self, piece: &[u8]) -> Result<(), Response> {
        if self.offset + piece.len() as u64 > self.limit {
            self.undo();
            let what = if self.length.is_some() {
                "Upload-Length"
            } else {
                "--max-upload"
            };
            let mut r = tus(problem(
                413,
                format!("the body goes past {what} ({})", self.limit),
            ));
            r.close = true;
            return Err(r);
        }
        if let Err(e) = self.file.write_all_at(piece, self.offset) {
            self.undo();
            let mut r = io_error("writing the upload", &e);
            r.close = true;
            return Err(r);
        }
        self.offset += piece.len() as u64;
        if let Some((hasher, _)) = &mut self.checksum {
            hasher.update(piece);
        }
        Ok(())
    }

    fn finish(&mut self) -> Response {
        if let Some((hasher, expected)) = self.checksum.take()
            && hasher.finish() != expected
        {
            self.undo();
            return tus(problem(
                460,
                "Upload-Checksum does not match the body: it was dropped",
            ));
        }
        self.settled = true;
        let uploads = &self.app.inner.uploads;
        if uploads.sync
            && let Err(e) = self.file.sync_data()
        {
            return io_error("syncing the upload", &e);
        }
        let mut r = if self.created {
            tus(empty(201)).with_header("Location", format!("/files/{}", self.id))
        } else {
            tus(empty(204))
        };
        r = r.with_header("Upload-Offset", self.offset.to_string());
        if self.length != Some(self.offset)
            && let Ok(meta) = self.file.metadata()
        {
            r = r.with_header("Upload-Expires", http_date(uploads.expires(&meta)));
        }
        r
    }

    /// The connection was cut: keep what arrived, unless a checksum can no longer vouch for it.
    fn cut(&mut self) {
        if self.checksum.is_some() {
            self.undo();
        }
        self.settled = true;
    }

    /// Back to where this request started: nothing changes.
    fn undo(&mut self) {
        let _ = self.file.set_len(self.start);
        self.offset = self.start;
        self.settled = true;
    }
}

impl Drop for TusWrite {
    fn drop(&mut self) {
        if !self.settled {
            self.cut();
        }
    }
}

impl App {
    /// Every route under `/files` and `/upload`.
    #[inline(never)]
    pub(crate) fn files<R: Routable + ?Sized>(&self, req: &R) -> Reply {
        let method = req.method();
        let path = req.path();
        if path == "/upload" {
            return match method {
                "POST" => Reply::Body(Box::new(BodySink {
                    kind: SinkKind::Plain {
                        hash: Sha256::new(),
                        bytes: 0,
                    },
                })),
                _ => crate::not_allowed("POST").into(),
            };
        }
        let id = path
            .strip_prefix("/files")
            .unwrap_or("")
            .trim_start_matches('/');
        if id.is_empty() {
            return match method {
                "OPTIONS" => self.tus_options().into(),
                "POST" => self.tus_create(req),
                _ => tus(crate::not_allowed("OPTIONS, POST")).into(),
            };
        }
        // tus core: a client that cannot send PATCH or DELETE (tus-js-client with
        // `overridePatchMethod`) sends a POST naming the method it means.
        let method = match (method, header_str(req, "x-http-method-override")) {
            ("POST", Some(meant @ ("PATCH" | "DELETE"))) => meant,
            _ => method,
        };
        if method == "OPTIONS" {
            return self.tus_options().into();
        }
        if !matches!(method, "GET" | "HEAD" | "PATCH" | "DELETE") {
            return tus(crate::not_allowed("GET, HEAD, PATCH, DELETE, OPTIONS")).into();
        }
        if method == "GET" {
            return self.download(id);
        }
        if let Err(r) = check_version(req) {
            return r.into();
        }
        match method {
            "HEAD" => self.tus_head(id).into(),
            "PATCH" => self.tus_patch(req, id),
            _ => self.tus_delete(id).into(),
        }
    }

    fn tus_options(&self) -> Response {
        tus(empty(204))
            .with_header("Tus-Version", TUS_VERSION)
            .with_header("Tus-Extension", TUS_EXTENSIONS)
            .with_header("Tus-Max-Size", self.inner.uploads.max.to_string())
            .with_header("Tus-Checksum-Algorithm", TUS_CHECKSUMS)
    }

    /// `POST /files/`: a new upload (201, `Location`), with its first bytes if the body has
    /// them (creation-with-upload), or the concatenation of finished partial uploads.
    fn tus_create<R: Routable + ?Sized>(&self, req: &R) -> Reply {
        if let Err(r) = check_version(req) {
            return r.into();
        }
        let uploads = &self.inner.uploads;
        uploads.sweep();
        let length = header_str(req, "upload-length");
        let deferred = header_str(req, "upload-defer-length");
        let concat = header_str(req, "upload-concat").unwrap_or("");
        let metadata = header_str(req, "upload-metadata").unwrap_or("").trim();
        if let Err(detail) = check_metadata(metadata) {
            return bad(detail).into();
        }
        if let Some(parts) = concat.strip_prefix("final;") {
            if length.is_some() || deferred.is_some() {
                return bad("a final upload takes no Upload-Length: it is its parts' sum").into();
            }
            return self.tus_concat(parts, concat, metadata).into();
        }
        if !concat.is_empty() && concat != "partial" {
            return bad("Upload-Concat: expected partial, or final;URL URL...").into();
        }
        let length = match (length, deferred) {
            (Some(n), None) => match n.parse::<u64>() {
                Ok(n) if n > uploads.max => {
                    return tus(problem(
                        413,
                        format!("Upload-Length is past Tus-Max-Size ({})", uploads.max),
                    ))
                    .into();
                }
                Ok(n) => Some(n),
                Err(_) => return bad("Upload-Length: expected a whole number of bytes").into(),
            },
            (None, Some("1")) => None,
            (None, Some(_)) => return bad("Upload-Defer-Length: expected 1").into(),
            (Some(_), Some(_)) => {
                return bad("Upload-Length or Upload-Defer-Length, not both").into();
            }
            (None, None) => {
                return bad("Upload-Length (or Upload-Defer-Length: 1) is required").into();
            }
        };
        let info = Info {
            length,
            metadata: metadata.to_string(),
            concat: concat.to_string(),
        };
        let id = new_id();
        let file = match create_upload(uploads, &id, &info) {
            Ok(f) => f,
            Err(e) => return io_error("creating the upload", &e).into(),
        };
        let with_upload = header_str(req, "content-type") == Some(OFFSET_STREAM)
            && header_str(req, "content-length").is_none_or(|n| n != "0");
        if !with_upload {
            // The body, if any, is not upload data: proto drops it.
            let mut r = tus(empty(201))
                .with_header("Location", format!("/files/{id}"))
                .with_header("Upload-Offset", "0");
            if length != Some(0)
                && let Ok(meta) = file.metadata()
            {
                r = r.with_header("Upload-Expires", http_date(uploads.expires(&meta)));
            }
            return r.into();
        }
        let checksum = match parse_checksum(req) {
            Ok(c) => c,
            Err(r) => return r.into(),
        };
        // Nobody else knows the id yet: the lock cannot be held.
        let _ = try_lock(&file);
        Reply::Body(Box::new(BodySink {
            kind: SinkKind::Tus(TusWrite {
                app: self.clone(),
                id,
                file,
                start: 0,
                offset: 0,
                limit: length.unwrap_or(uploads.max),
                length,
                checksum,
                created: true,
                settled: false,
            }),
        }))
    }

    /// `Upload-Concat: final;/files/A /files/B`: a new upload holding the finished partial
    /// uploads' bytes, in the order given (the client sent them in parallel, in any order).
    fn tus_concat(&self, parts: &str, concat: &str, metadata: &str) -> Response {
        let uploads = &self.inner.uploads;
        let mut ids = Vec::new();
        for url in parts.split_whitespace() {
            let id = url.rsplit_once("/files/").map_or("", |(_, id)| id);
            if !valid_id(id) {
                return bad(format!(
                    "Upload-Concat: {url} is not an upload of this server"
                ));
            }
            ids.push(id);
        }
        if ids.is_empty() {
            return bad("Upload-Concat: final; names no partial upload");
        }
        let mut total = 0u64;
        for id in &ids {
            let (info, meta) = match uploads.find(id) {
                Ok(found) => found,
                Err(_) => return bad(format!("Upload-Concat: no upload {id}")),
            };
            if !info.is_partial() {
                return bad(format!("Upload-Concat: {id} is not a partial upload"));
            }
            if info.length != Some(meta.len()) {
                return bad(format!("Upload-Concat: {id} is not finished"));
            }
            total += meta.len();
        }
        if total > uploads.max {
            return tus(problem(
                413,
                format!("the parts add up past Tus-Max-Size ({})", uploads.max),
            ));
        }
        let id = new_id();
        let joined = (|| -> io::Result<()> {
            let tmp = uploads.dir.join(format!("{id}.tmp"));
            let mut out = File::create(&tmp)?;
            for part in &ids {
                io::copy(&mut File::open(uploads.data_path(part))?, &mut out)?;
            }
            if uploads.sync {
                out.sync_data()?;
            }
            fs::rename(&tmp, uploads.data_path(&id))?;
            let info = Info {
                length: Some(total),
                metadata: metadata.to_string(),
                concat: concat.to_string(),
            };
            uploads.write_info(&id, &info)
        })();
        if let Err(e) = joined {
            let _ = fs::remove_file(uploads.dir.join(format!("{id}.tmp")));
            let _ = fs::remove_file(uploads.data_path(&id));
            return io_error("joining the parts", &e);
        }
        tus(empty(201))
            .with_header("Location", format!("/files/{id}"))
            .with_header("Upload-Offset", total.to_string())
    }

    /// `HEAD /files/ID`: how far the upload got.
    fn tus_head(&self, id: &str) -> Response {
        let uploads = &self.inner.uploads;
        let (info, meta) = match uploads.find(id) {
            Ok(found) => found,
            Err(r) => return r,
        };
        let mut r = tus(empty(200))
            .with_header("Cache-Control", "no-store")
            .with_header("Upload-Offset", meta.len().to_string());
        r = match info.length {
            Some(n) => r.with_header("Upload-Length", n.to_string()),
            None => r.with_header("Upload-Defer-Length", "1"),
        };
        if !info.metadata.is_empty() {
            r = r.with_header("Upload-Metadata", info.metadata.clone());
        }
        if !info.concat.is_empty() {
            r = r.with_header("Upload-Concat", info.concat.clone());
        }
        if info.length != Some(meta.len()) {
            r = r.with_header("Upload-Expires", http_date(uploads.expires(&meta)));
        }
        r
    }

    /// `PATCH /files/ID`: bytes at `Upload-Offset`, written as they arrive.
    fn tus_patch<R: Routable + ?Sized>(&self, req: &R, id: &str) -> Reply {
        let uploads = &self.inner.uploads;
        let (mut info, _) = match uploads.find(id) {
            Ok(found) => found,
            Err(r) => return r.into(),
        };
        if header_str(req, "content-type") != Some(OFFSET_STREAM) {
            return tus(problem(
                415,
                format!("Content-Type: expected {OFFSET_STREAM}"),
            ))
            .into();
        }
        let Some(Ok(offset)) = header_str(req, "upload-offset").map(str::parse::<u64>) else {
            return bad("Upload-Offset: expected a whole number of bytes").into();
        };
        if info.is_final() {
            return tus(problem(
                403,
                "a final upload is made of its parts: it takes no PATCH",
            ))
            .into();
        }
        let checksum = match parse_checksum(req) {
            Ok(c) => c,
            Err(r) => return r.into(),
        };
        let file = match OpenOptions::new().write(true).open(uploads.data_path(id)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return not_found().into(),
            Err(e) => return io_error("opening the upload", &e).into(),
        };
        match try_lock(&file) {
            Ok(true) => {}
            Ok(false) => {
                return tus(problem(
                    423,
                    "another PATCH is writing this upload; retry after it",
                ))
                .into();
            }
            Err(e) => return io_error("locking the upload", &e).into(),
        }
        // Under the lock, the upload as it is now: deleted meanwhile, or moved on.
        let (current, meta) = match (uploads.read_info(id), file.metadata()) {
            (Ok(info), Ok(meta)) if meta.nlink() > 0 => (info, meta),
            _ => return not_found().into(),
        };
        info = current;
        if meta.len() != offset {
            return tus(problem(
                409,
                format!("Upload-Offset is {offset} but the upload is at {}: HEAD, then resume from there", meta.len()),
            ))
            .with_header("Upload-Offset", meta.len().to_string())
            .into();
        }
        match (info.length, header_str(req, "upload-length")) {
            (_, None) => {}
            (None, Some(n)) => match n.parse::<u64>() {
                Ok(n) if n > uploads.max => {
                    return tus(problem(
                        413,
                        format!("Upload-Length is past Tus-Max-Size ({})", uploads.max),
                    ))
                    .into();
                }
                Ok(n) if n < offset => {
                    return bad("Upload-Length is less than the bytes already received").into();
                }
                Ok(n) => {
                    info.length = Some(n);
                    if let Err(e) = uploads.write_info(id, &info) {
                        return io_error("declaring the length", &e).into();
                    }
                }
                Err(_) => return bad("Upload-Length: expected a whole number of bytes").into(),
            },
            (Some(known), Some(n)) if n.parse() == Ok(known) => {}
            (Some(_), Some(_)) => return bad("Upload-Length cannot change once set").into(),
        }
        let limit = info.length.unwrap_or(uploads.max);
        if let Some(Ok(n)) = header_str(req, "content-length").map(str::parse::<u64>)
            && offset + n > limit
        {
            return tus(problem(413, format!("the body goes past {limit} bytes"))).into();
        }
        Reply::Body(Box::new(BodySink {
            kind: SinkKind::Tus(TusWrite {
                app: self.clone(),
                id: id.to_string(),
                file,
                start: offset,
                offset,
                limit,
                length: info.length,
                checksum,
                created: false,
                settled: false,
            }),
        }))
    }

    /// `DELETE /files/ID` (termination): 204, and the bytes are gone.
    fn tus_delete(&self, id: &str) -> Response {
        let uploads = &self.inner.uploads;
        if let Err(r) = uploads.find(id) {
            return r;
        }
        match uploads.remove(id) {
            Ok(true) => tus(empty(204)),
            Ok(false) => tus(problem(
                423,
                "a PATCH is writing this upload; retry after it",
            )),
            Err(e) => io_error("deleting the upload", &e),
        }
    }

    /// `GET /files/ID`: a finished upload's bytes, read from disk as the peer takes them.
    fn download(&self, id: &str) -> Reply {
        let uploads = &self.inner.uploads;
        let (info, meta) = match uploads.find(id) {
            Ok(found) => found,
            Err(r) => return r.into(),
        };
        if info.length != Some(meta.len()) {
            return problem(
                409,
                format!(
                    "the upload is not finished: {} of {:?} bytes",
                    meta.len(),
                    info.length
                ),
            )
            .into();
        }
        let file = match File::open(uploads.data_path(id)) {
            Ok(f) => f,
            Err(e) => return io_error("opening the upload", &e).into(),
        };
        let head = Response::stream_sized(200, "application/octet-stream", meta.len())
            .with_header("Cache-Control", "no-store");
        let stream = Stream {
            app: self.clone(),
            kind: StreamKind::File(FileStream {
                file,
                offset: 0,
                left: meta.len(),
            }),
            next: Some(Instant::now()),
        };
        Reply::Stream(head, stream)
    }
}

/// A download in progress.
pub(crate) struct FileStream {
    file: File,
    offset: u64,
    left: u64,
}

impl FileStream {
    /// Appends up to `budget` bytes of the file to `out`; false once all are out (or a read
    /// failed, or the server stops: the reply then ends short and the connection closes).
    pub(crate) fn poll(&mut self, out: &mut Vec<u8>, budget: usize, stopping: bool) -> bool {
        if stopping {
            return false;
        }
        let n = (self.left.min(budget.min(READ_PIECE) as u64)) as usize;
        let at = out.len();
        out.resize(at + n, 0);
        match self.file.read_at(&mut out[at..], self.offset) {
            Ok(read) if read > 0 => {
                out.truncate(at + read);
                self.offset += read as u64;
                self.left -= read as u64;
                self.left > 0
            }
            // Shorter than it was (deleted and truncated?), or unreadable: end short.
            _ => {
                out.truncate(at);
                false
            }
        }
    }
}

/// Creates an upload's files: the bytes (empty) first, then the info that makes it exist.
fn create_upload(uploads: &Uploads, id: &str, info: &Info) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(uploads.data_path(id))?;
    uploads.write_info(id, info)?;
    Ok(file)
}

/// `flock(LOCK_EX | LOCK_NB)`: `Ok(false)` if another open file holds it.
fn try_lock(file: &File) -> io::Result<bool> {
    // SAFETY: flock on a descriptor this File owns; no memory is passed.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// 128 random bits, in hex.
fn new_id() -> String {
    let mut bytes = [0u8; 16];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer it is given.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // No entropy source (never on Linux ≥ 3.17): time and pid are unique enough here.
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        bytes[..8].copy_from_slice(&(t.as_nanos() as u64).to_le_bytes());
        bytes[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    }
    hex(&bytes)
}

fn valid_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn header_str<'r, R: Routable + ?Sized>(req: &'r R, name: &str) -> Option<&'r str> {
    req.header(name)
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::trim)
}

/// A reply whose headers say it all.
fn empty(status: u16) -> Response {
    Response {
        content_type: "".into(),
        ..Response::text(status, "")
    }
}

/// Every tus reply names the protocol version.
fn tus(r: Response) -> Response {
    r.with_header("Tus-Resumable", TUS_VERSION)
}

fn bad(detail: impl AsRef<str>) -> Response {
    tus(problem(400, detail))
}

fn not_found() -> Response {
    tus(problem(404, "no such upload"))
}

fn io_error(doing: &str, e: &io::Error) -> Response {
    tus(problem(500, format!("{doing}: {e}")))
}

/// A request without `Tus-Resumable: 1.0.0` gets 412 and the versions this server speaks.
fn check_version<R: Routable + ?Sized>(req: &R) -> Result<(), Response> {
    match header_str(req, "tus-resumable") {
        Some(TUS_VERSION) => Ok(()),
        v => Err(tus(problem(
            412,
            match v {
                None => "Tus-Resumable is required: this server speaks tus 1.0.0".to_string(),
                Some(v) => {
                    format!("Tus-Resumable {v:?} is not supported: this server speaks 1.0.0")
                }
            },
        ))
        .with_header("Tus-Version", TUS_VERSION)),
    }
}

/// `Upload-Metadata`: `key base64value` pairs, comma-separated; keys unique, no spaces or
/// commas; the value may be absent.
fn check_metadata(metadata: &str) -> Result<(), String> {
    if metadata.is_empty() {
        return Ok(());
    }
    let mut keys = Vec::new();
    for pair in metadata.split(',') {
        let mut words = pair.trim().split(' ');
        let key = words.next().unwrap_or("");
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("Upload-Metadata: bad key in {pair:?}"));
        }
        if let Some(value) = words.next()
            && BASE64.decode(value).is_err()
        {
            return Err(format!("Upload-Metadata: the value of {key} is not base64"));
        }
        if words.next().is_some() {
            return Err(format!("Upload-Metadata: {pair:?} is not `key value`"));
        }
        if keys.contains(&key) {
            return Err(format!("Upload-Metadata: {key} twice"));
        }
        keys.push(key);
    }
    Ok(())
}

/// `Upload-Checksum: sha1 BASE64` (or sha256): the hash the body must have.
fn parse_checksum<R: Routable + ?Sized>(req: &R) -> Result<Option<(Hasher, Vec<u8>)>, Response> {
    let Some(value) = header_str(req, "upload-checksum") else {
        return Ok(None);
    };
    let (algorithm, digest) = value.split_once(' ').unwrap_or((value, ""));
    let (hasher, len) = match algorithm {
        "sha1" => (Hasher::Sha1(Sha1::new()), 20),
        "sha256" => (Hasher::Sha256(Sha256::new()), 32),
        _ => {
            return Err(bad(format!(
                "Upload-Checksum: {algorithm:?} is not supported (Tus-Checksum-Algorithm: {TUS_CHECKSUMS})"
            )));
        }
    };
    match BASE64.decode(digest.trim()) {
        Ok(d) if d.len() == len => Ok(Some((hasher, d))),
        _ => Err(bad(format!(
            "Upload-Checksum: expected {algorithm} and a base64 digest"
        ))),
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn http_date(t: SystemTime) -> String {
    String::from_utf8_lossy(&proto::http_date(unix_secs(t))).into_owned()
}
