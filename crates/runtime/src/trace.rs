//! `--trace`: each request's timeline (see [`proto::Trace`]) as one JSON line on stderr, with
//! wall-clock times (Unix seconds, to the microsecond) that line up with a client's own clock
//! and with tcpdump's.
//!
//! ```text
//! {"trace":"request","pid":4242,"thread":"loop-0","conn":1,"request":0,"method":"GET","target":"/",
//!  "status":200,"bytes_out":130,"accepted":1764512345.100000,"first_byte":1764512345.100100,
//!  "parsed":1764512345.100110,"received":1764512345.100110,"handled":1764512345.100112,
//!  "written":1764512345.100130}
//! ```

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// One reading of both clocks, taken once: an `Instant` becomes wall-clock time from it.
fn epoch() -> (Instant, f64) {
    static EPOCH: OnceLock<(Instant, f64)> = OnceLock::new();
    *EPOCH.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        (Instant::now(), wall)
    })
}

fn unix(at: Instant) -> f64 {
    let (base, wall) = epoch();
    match at.checked_duration_since(base) {
        Some(d) => wall + d.as_secs_f64(),
        None => wall - base.duration_since(at).as_secs_f64(),
    }
}

/// Writes `t` as one line to stderr (one write, so lines from several threads do not mix).
pub fn print(t: &proto::Trace) {
    let mut line = String::with_capacity(400);
    let thread = std::thread::current();
    let _ = write!(
        line,
        "{{\"trace\":\"request\",\"pid\":{},\"thread\":\"{}\",\"conn\":{},\"request\":{},\
         \"method\":\"{}\",\"target\":\"{}\",\"status\":{},\"bytes_out\":{}",
        std::process::id(),
        escape(thread.name().unwrap_or("")),
        t.conn,
        t.request,
        escape(&t.method),
        escape(&t.target),
        t.status,
        t.bytes_out
    );
    let mut at = |name: &str, time: Instant| {
        let _ = write!(line, ",\"{name}\":{:.6}", unix(time));
    };
    at("accepted", t.accepted);
    at("first_byte", t.first_byte);
    at("parsed", t.parsed);
    at("received", t.received);
    if let Some(handled) = t.handled {
        at("handled", handled);
    }
    at("written", t.written);
    line.push_str("}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Method and target are visible ASCII (proto refuses anything else); only `"` and `\` need it.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}
