//! A TCP proxy that sits between a real client and a server, reads the requests going through
//! (method, target, `Upload-Offset`, how many body bytes it forwarded), and can cut an upload
//! short: the first PATCH whose body passes N bytes has its connection cut right there, as a
//! network failure would. The client sees its connection die mid-request; the server sees the
//! body end early (a FIN after exactly N body bytes), so what it keeps is known to the byte.
//!
//! ```no_run
//! # let server_addr: std::net::SocketAddr = "127.0.0.1:8080".parse().unwrap();
//! use blackbox::proxy::Proxy;
//! let proxy = Proxy::cutting_first_patch(server_addr, 400_000);
//! // point the client at http://{proxy.addr()}/files/, then:
//! assert!(proxy.cut().is_some());
//! ```
//!
//! Two threads a connection (one each way), a read timeout on every socket, and on drop every
//! socket is shut down and every thread joined.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// A connection with nothing moving either way for this long is closed: a backstop, so that no
/// thread outlives a stuck test by much.
const IDLE: Duration = Duration::from_secs(20);
/// A request head longer than this is not parsed: the rest of that connection passes through
/// uncounted.
const MAX_HEAD: usize = 64 * 1024;

/// One request the proxy passed on, as far as it got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forwarded {
    /// Which accepted connection carried it (0, 1, ...).
    pub connection: usize,
    pub method: String,
    pub target: String,
    /// The `Upload-Offset` header, if it had one.
    pub upload_offset: Option<u64>,
    /// `Content-Length`; `None` for a body delimited otherwise (chunked: counted to the close).
    pub content_length: Option<u64>,
    /// How many bytes of its body were forwarded to the server.
    pub body_bytes: u64,
    /// Its connection was cut after `body_bytes`.
    pub cut: bool,
}

/// A proxy listening on `127.0.0.1:0`; see the module documentation.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    upstream: SocketAddr,
    /// Cut the first PATCH after this many body bytes.
    cut_after: u64,
    /// Whether a PATCH has been picked to be cut (only the first one is).
    cut_claimed: AtomicBool,
    stopping: AtomicBool,
    next_connection: AtomicUsize,
    log: Mutex<Vec<Forwarded>>,
    /// Each open connection's two sockets (clones), to shut them down on drop.
    open: Mutex<HashMap<usize, [TcpStream; 2]>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn new(upstream: SocketAddr, cut_after: u64) -> Shared {
        Shared {
            upstream,
            cut_after,
            cut_claimed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            next_connection: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
            open: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
        }
    }
}

impl Proxy {
    /// A proxy to `upstream` that cuts the connection of the first PATCH once `cut_after`
    /// bytes of its body have been forwarded (client and server sides both shut down).
    pub fn cutting_first_patch(upstream: SocketAddr, cut_after: u64) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy on 127.0.0.1:0");
        let addr = listener.local_addr().expect("the proxy's address");
        let shared = Arc::new(Shared::new(upstream, cut_after));
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("proxy-accept".into())
                .spawn(move || accept(&listener, &shared))
                .expect("spawn the proxy's accept thread")
        };
        Proxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request forwarded so far, in the order their heads arrived.
    pub fn requests(&self) -> Vec<Forwarded> {
        lock(&self.shared.log).clone()
    }

    /// The request whose connection was cut, if one was.
    pub fn cut(&self) -> Option<Forwarded> {
        lock(&self.shared.log).iter().find(|r| r.cut).cloned()
    }

    /// The PATCH body bytes forwarded to the server, over every connection.
    pub fn patch_body_bytes(&self) -> u64 {
        lock(&self.shared.log)
            .iter()
            .filter(|r| r.method == "PATCH")
            .map(|r| r.body_bytes)
            .sum()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wakes the accept thread, which sees `stopping` and returns.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for sockets in lock(&self.shared.open).values() {
            for s in sockets {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        let threads = std::mem::take(&mut *lock(&self.shared.threads));
        for t in threads {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn accept(listener: &TcpListener, shared: &Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else {
            continue;
        };
        let n = shared.next_connection.fetch_add(1, Ordering::Relaxed);
        let conn_shared = Arc::clone(shared);
        let spawned = thread::Builder::new()
            .name(format!("proxy-up-{n}"))
            .spawn(move || serve(&conn_shared, n, client));
        if let Ok(t) = spawned {
            lock(&shared.threads).push(t);
        }
    }
}

/// One connection: this thread carries client → server (reading the requests), a second one
/// server → client.
fn serve(shared: &Arc<Shared>, n: usize, client: TcpStream) {
    let Ok(upstream) = TcpStream::connect_timeout(&shared.upstream, Duration::from_secs(5)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let clones = (|| -> io::Result<_> {
        for s in [&client, &upstream] {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(IDLE))?;
            s.set_write_timeout(Some(IDLE))?;
        }
        Ok((
            [client.try_clone()?, upstream.try_clone()?],
            client.try_clone()?,
            upstream.try_clone()?,
        ))
    })();
    let Ok((registered, down_client, down_upstream)) = clones else {
        return;
    };
    lock(&shared.open).insert(n, registered);
    if shared.stopping.load(Ordering::SeqCst) {
        // Drop may have shut the open sockets down before this one was registered.
        shut(&client, &upstream);
    }
    let down = thread::Builder::new()
        .name(format!("proxy-down-{n}"))
        .spawn(move || copy_down(down_upstream, down_client));
    let mut tap = Tap {
        shared,
        connection: n,
        state: State::Head(Vec::new()),
    };
    copy_up(&mut tap, &client, &upstream);
    if let Ok(down) = down {
        let _ = down.join();
    }
    shut(&client, &upstream);
    lock(&shared.open).remove(&n);
}

fn shut(client: &TcpStream, upstream: &TcpStream) {
    let _ = client.shutdown(Shutdown::Both);
    let _ = upstream.shutdown(Shutdown::Both);
}

/// Client → server through the tap, until the client's end, an error, or the cut.
fn copy_up(tap: &mut Tap<'_>, mut client: &TcpStream, mut upstream: &TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) => {
                // The client is done sending: pass its FIN on, and let the reply come back.
                let _ = upstream.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return shut(client, upstream),
        };
        let (forward, cut) = tap.feed(&buf[..n]);
        if upstream.write_all(&buf[..forward]).is_err() {
            return shut(client, upstream);
        }
        if cut {
            // The client's connection dies; the server gets every byte forwarded, then a FIN
            // (no reset, which could discard bytes it has not read yet).
            let _ = client.shutdown(Shutdown::Both);
            let _ = upstream.shutdown(Shutdown::Write);
            return;
        }
    }
}

/// Server → client, untouched.
fn copy_down(mut upstream: TcpStream, mut client: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match upstream.read(&mut buf) {
            Ok(0) => {
                let _ = client.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if client.write_all(&buf[..n]).is_err() {
                    return shut(&client, &upstream);
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return shut(&client, &upstream),
        }
    }
}

/// Follows the requests on one connection (heads, then `Content-Length` bodies).
struct Tap<'a> {
    shared: &'a Shared,
    connection: usize,
    state: State,
}

enum State {
    /// Reading a request head: the bytes so far.
    Head(Vec<u8>),
    /// In the body of request `index` of the log: `left` bytes to go (`None`: to the close);
    /// `cut_at`: the body byte count at which to cut, for the PATCH picked to be cut.
    Body {
        index: usize,
        left: Option<u64>,
        cut_at: Option<u64>,
    },
    /// Not understood: everything passes through uncounted.
    Opaque,
}

impl Tap<'_> {
    /// Takes `data` read from the client: how many of its bytes to forward, and whether to cut
    /// the connection after them.
    fn feed(&mut self, data: &[u8]) -> (usize, bool) {
        let mut pos = 0;
        while pos < data.len() {
            match &mut self.state {
                State::Opaque => return (data.len(), false),
                State::Head(head) => {
                    let searched = head.len().saturating_sub(3);
                    head.extend_from_slice(&data[pos..]);
                    let Some(end) = find(&head[searched..], b"\r\n\r\n").map(|i| searched + i + 4)
                    else {
                        if head.len() > MAX_HEAD {
                            self.state = State::Opaque;
                        }
                        return (data.len(), false);
                    };
                    // The bytes past the head's end are the body's (or the next request's).
                    pos = data.len() - (head.len() - end);
                    let head = std::mem::take(head);
                    self.state = self.start_request(&head[..end]);
                }
                State::Body {
                    index,
                    left,
                    cut_at,
                } => {
                    let mut take = (data.len() - pos) as u64;
                    if let Some(left) = left {
                        take = take.min(*left);
                    }
                    let mut log = lock(&self.shared.log);
                    let request = &mut log[*index];
                    let cut = cut_at.is_some_and(|at| request.body_bytes + take >= at);
                    if let Some(at) = cut_at.filter(|_| cut) {
                        take = at - request.body_bytes;
                        request.cut = true;
                    }
                    request.body_bytes += take;
                    pos += take as usize;
                    if cut {
                        return (pos, true);
                    }
                    if let Some(left) = left {
                        *left -= take;
                        if *left == 0 {
                            self.state = State::Head(Vec::new());
                        }
                    }
                }
            }
        }
        (pos, false)
    }

    /// Logs the request whose head is `head`; the state for what follows it.
    fn start_request(&self, head: &[u8]) -> State {
        let text = String::from_utf8_lossy(head);
        let mut lines = text.split("\r\n");
        let mut words = lines.next().unwrap_or("").split(' ');
        let method = words.next().unwrap_or("").to_string();
        let target = words.next().unwrap_or("").to_string();
        let (mut content_length, mut upload_offset, mut chunked) = (None, None, false);
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => content_length = value.parse().ok(),
                "upload-offset" => upload_offset = value.parse().ok(),
                "transfer-encoding" => chunked = true,
                _ => {}
            }
        }
        let first_patch = method == "PATCH"
            && self
                .shared
                .cut_claimed
                .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok();
        let cut_at = first_patch.then_some(self.shared.cut_after);
        let left = if chunked {
            None
        } else {
            Some(content_length.unwrap_or(0))
        };
        let mut log = lock(&self.shared.log);
        log.push(Forwarded {
            connection: self.connection,
            method,
            target,
            upload_offset,
            content_length: content_length.filter(|_| !chunked),
            body_bytes: 0,
            cut: false,
        });
        if left == Some(0) {
            return State::Head(Vec::new());
        }
        State::Body {
            index: log.len() - 1,
            left,
            cut_at,
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(cut_after: u64) -> Shared {
        Shared::new(SocketAddr::from(([127, 0, 0, 1], 9)), cut_after)
    }

    const POST: &[u8] = b"POST /files/ HTTP/1.1\r\nHost: x\r\nUpload-Length: 10\r\n\r\n";
    const PATCH: &[u8] =
        b"PATCH /files/a HTTP/1.1\r\nHost: x\r\nupload-offset: 3\r\nContent-Length: 7\r\n\r\n";

    /// Feeds `stream` in pieces of `step` bytes; returns what was forwarded and whether it cut.
    fn run(tap: &mut Tap<'_>, stream: &[u8], step: usize) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        for piece in stream.chunks(step) {
            let (n, cut) = tap.feed(piece);
            out.extend_from_slice(&piece[..n]);
            if cut {
                return (out, true);
            }
            assert_eq!(n, piece.len(), "everything is forwarded until a cut");
        }
        (out, false)
    }

    #[test]
    fn follows_keep_alive_requests_in_any_split() {
        let mut stream = POST.to_vec();
        stream.extend_from_slice(PATCH);
        stream.extend_from_slice(b"abcdefg");
        stream.extend_from_slice(b"HEAD /files/a HTTP/1.1\r\nHost: x\r\n\r\n");
        for step in [1, 2, 5, 64, stream.len()] {
            let shared = shared(u64::MAX);
            let mut tap = Tap {
                shared: &shared,
                connection: 0,
                state: State::Head(Vec::new()),
            };
            assert_eq!(run(&mut tap, &stream, step), (stream.clone(), false));
            let log = lock(&shared.log).clone();
            let seen: Vec<_> = log
                .iter()
                .map(|r| (r.method.as_str(), r.upload_offset, r.body_bytes))
                .collect();
            assert_eq!(
                seen,
                [("POST", None, 0), ("PATCH", Some(3), 7), ("HEAD", None, 0)],
                "step {step}"
            );
        }
    }

    #[test]
    fn cuts_the_first_patch_at_the_byte() {
        for step in [1, 3, 64] {
            let shared = shared(4);
            let mut tap = Tap {
                shared: &shared,
                connection: 0,
                state: State::Head(Vec::new()),
            };
            let mut stream = PATCH.to_vec();
            stream.extend_from_slice(b"abcdefg");
            let (out, cut) = run(&mut tap, &stream, step);
            assert!(cut, "step {step}");
            assert_eq!(&out[PATCH.len()..], b"abcd", "step {step}");
            let log = lock(&shared.log).clone();
            assert!(log[0].cut && log[0].body_bytes == 4, "{log:?}");
            // Only the first PATCH is cut.
            let mut tap = Tap {
                shared: &shared,
                connection: 1,
                state: State::Head(Vec::new()),
            };
            assert_eq!(run(&mut tap, &stream, step), (stream.clone(), false));
        }
    }

    #[test]
    fn forwards_and_cuts_through_sockets() {
        // A stand-in server: reads one connection to its end, returns what it got.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let upstream = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            let _ = s.write_all(b"bye");
            got
        });
        let proxy = Proxy::cutting_first_patch(upstream, 4);
        let mut c = TcpStream::connect(proxy.addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(PATCH).unwrap();
        c.write_all(b"abcdefg").unwrap();
        let got = server.join().unwrap();
        assert_eq!(&got[PATCH.len()..], b"abcd");
        // The client's side is closed: EOF or a reset, and never the server's reply.
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
        assert!(rest.is_empty(), "{rest:?}");
        assert_eq!(proxy.patch_body_bytes(), 4);
        assert!(proxy.cut().is_some_and(|r| r.upload_offset == Some(3)));
    }
}
