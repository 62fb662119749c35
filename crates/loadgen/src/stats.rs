//! Counting: each load thread fills its own [`Recorder`] (no sharing on the hot path); at the
//! end they are merged into one [`Summary`], printed as text or JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latencies are recorded in nanoseconds, 3 significant digits, up to 100 s.
const HIGHEST_NS: u64 = 100_000_000_000;

/// Why a connection failed; each failure closes the connection, which is then reopened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// connect(2) failed or did not finish within --timeout.
    Connect,
    /// read(2) failed (e.g. a reset).
    Read,
    /// write(2) failed (e.g. a broken pipe).
    Write,
    /// No reply within --timeout.
    Timeout,
    /// The server closed the connection with requests unanswered or a reply cut short.
    Closed,
    /// The reply was not valid HTTP/1.1, or came when no request was waiting.
    Parse,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 6] = [
        ErrorKind::Connect,
        ErrorKind::Read,
        ErrorKind::Write,
        ErrorKind::Timeout,
        ErrorKind::Closed,
        ErrorKind::Parse,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Read => "read",
            ErrorKind::Write => "write",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Closed => "closed",
            ErrorKind::Parse => "parse",
        }
    }
}

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIGHEST_NS, 3).expect("valid histogram bounds")
}

/// One thread's counts. Only replies inside the measured window are recorded here.
pub struct Recorder {
    /// Latency per request class.
    pub latency: Vec<Histogram<u64>>,
    /// Status codes 0..=999, indexed by code.
    pub status: Vec<u64>,
    pub errors: [u64; 6],
    /// Bytes read inside the window.
    pub bytes: u64,
    /// Connections opened, for the whole run (warm-up included).
    pub connects: u64,
}

impl Recorder {
    pub fn new(classes: usize) -> Recorder {
        Recorder {
            latency: (0..classes).map(|_| new_histogram()).collect(),
            status: vec![0; 1000],
            errors: [0; 6],
            bytes: 0,
            connects: 0,
        }
    }

    #[inline]
    pub fn response(&mut self, class: usize, latency: Duration, status: u16) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.latency[class].saturating_record(ns);
        self.status[usize::from(status).min(999)] += 1;
    }

    pub fn error(&mut self, kind: ErrorKind) {
        self.errors[kind as usize] += 1;
    }

    pub fn responses(&self) -> u64 {
        self.latency.iter().map(|h| h.len()).sum()
    }

    pub fn merge(&mut self, other: &Recorder) {
        for (mine, theirs) in self.latency.iter_mut().zip(&other.latency) {
            mine.add(theirs).expect("histograms with the same bounds");
        }
        for (mine, theirs) in self.status.iter_mut().zip(&other.status) {
            *mine += theirs;
        }
        for (mine, theirs) in self.errors.iter_mut().zip(&other.errors) {
            *mine += theirs;
        }
        self.bytes += other.bytes;
        self.connects += other.connects;
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    #[serde(rename = "p99.9")]
    pub p99_9: f64,
    pub max: f64,
    pub mean: f64,
    /// `[percentile, microseconds]` points for percentile-curve charts.
    pub curve: Vec<[f64; 2]>,
}

/// Percentiles the curve samples: dense in the tail, where the patterns differ.
const CURVE: [f64; 16] = [
    0.0, 25.0, 50.0, 75.0, 90.0, 95.0, 97.5, 99.0, 99.5, 99.75, 99.9, 99.95, 99.99, 99.995, 99.999,
    100.0,
];

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        let us = |ns: u64| (ns as f64 / 1000.0 * 10.0).round() / 10.0;
        let at = |p: f64| us(h.value_at_percentile(p));
        let n = h.len() as f64;
        // A percentile finer than 1/n just repeats the maximum.
        let curve = CURVE
            .iter()
            .filter(|&&p| p == 100.0 || 100.0 / (100.0 - p) <= n)
            .map(|&p| [p, if p == 100.0 { us(h.max()) } else { at(p) }])
            .collect();
        Latency {
            p50: at(50.0),
            p90: at(90.0),
            p99: at(99.0),
            p99_9: at(99.9),
            max: us(h.max()),
            mean: (h.mean() / 100.0).round() / 10.0,
            curve: if h.is_empty() { Vec::new() } else { curve },
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClassSummary {
    /// `METHOD PATH`.
    pub name: String,
    pub weight: u32,
    pub requests: u64,
    pub latency_us: Latency,
}

/// What a run measured: the JSON that `--json` prints and `loadgen report` reads.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub url: String,
    /// `closed` (each connection sends when a reply arrives) or `open` (at --rate).
    pub mode: String,
    pub threads: usize,
    pub connections: usize,
    pub pipeline: usize,
    pub rate: Option<f64>,
    /// `client` or `server` in connection-per-request mode.
    pub close: Option<String>,
    pub slow_read: Option<u64>,
    pub idle: usize,
    /// --idle-request: each idle connection sent one request first.
    #[serde(default)]
    pub idle_request: bool,
    pub warmup_s: f64,
    /// Length of the measured window.
    pub duration_s: f64,
    /// Replies counted (inside the window).
    pub requests: u64,
    pub requests_per_s: f64,
    pub bytes: u64,
    pub bytes_per_s: f64,
    /// Every reply, warm-up included (to divide a server's CPU time over a whole run).
    pub all_responses: u64,
    pub connects: u64,
    /// Idle connections open when the measured window began, and those the server closed.
    pub idle_open: u64,
    pub idle_closed: u64,
    /// --idle-request: idle connections whose request got a 2xx reply, and another status.
    #[serde(default)]
    pub idle_answered: u64,
    #[serde(default)]
    pub idle_rejected: u64,
    pub latency_us: Latency,
    pub classes: Vec<ClassSummary>,
    /// Status code -> replies.
    pub status: BTreeMap<String, u64>,
    /// Error kind -> count (every kind present, zeros included).
    pub errors: BTreeMap<String, u64>,
    /// The generator's own CPU (user+system, all threads) over the measured window.
    pub loadgen_cpu_s: f64,
    pub loadgen_cpu_us_per_request: f64,
}

/// How a run was set up, for the summary's header fields.
pub struct RunInfo {
    pub url: String,
    pub mode: &'static str,
    pub threads: usize,
    pub connections: usize,
    pub pipeline: usize,
    pub rate: Option<f64>,
    pub close: Option<&'static str>,
    pub slow_read: Option<u64>,
    pub idle: usize,
    pub idle_request: bool,
    pub warmup: Duration,
}

/// Totals from the load threads besides their recorders.
pub struct Totals {
    pub window: Duration,
    pub all_responses: u64,
    pub idle_open: u64,
    pub idle_answered: u64,
    pub idle_rejected: u64,
    pub idle_closed: u64,
    pub cpu: Duration,
}

impl Summary {
    pub fn new(info: RunInfo, classes: &[(String, u32)], rec: &Recorder, t: Totals) -> Summary {
        let secs = t.window.as_secs_f64().max(1e-9);
        let mut all = new_histogram();
        for h in &rec.latency {
            all.add(h).expect("same bounds");
        }
        let requests = all.len();
        let status = rec
            .status
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(code, n)| (code.to_string(), *n))
            .collect();
        let errors = ErrorKind::ALL
            .iter()
            .map(|k| (k.name().to_string(), rec.errors[*k as usize]))
            .collect();
        let cpu = t.cpu.as_secs_f64();
        Summary {
            url: info.url,
            mode: info.mode.to_string(),
            threads: info.threads,
            connections: info.connections,
            pipeline: info.pipeline,
            rate: info.rate,
            close: info.close.map(str::to_string),
            slow_read: info.slow_read,
            idle: info.idle,
            idle_request: info.idle_request,
            warmup_s: info.warmup.as_secs_f64(),
            duration_s: round3(secs),
            requests,
            requests_per_s: round1(requests as f64 / secs),
            bytes: rec.bytes,
            bytes_per_s: round1(rec.bytes as f64 / secs),
            all_responses: t.all_responses,
            connects: rec.connects,
            idle_open: t.idle_open,
            idle_closed: t.idle_closed,
            idle_answered: t.idle_answered,
            idle_rejected: t.idle_rejected,
            latency_us: Latency::of(&all),
            classes: classes
                .iter()
                .zip(&rec.latency)
                .map(|((name, weight), h)| ClassSummary {
                    name: name.clone(),
                    weight: *weight,
                    requests: h.len(),
                    latency_us: Latency::of(h),
                })
                .collect(),
            status,
            errors,
            loadgen_cpu_s: round3(cpu),
            loadgen_cpu_us_per_request: if requests > 0 {
                round3(cpu * 1e6 / requests as f64)
            } else {
                0.0
            },
        }
    }

    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The human-readable report.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let mode = match self.rate {
            Some(r) => format!("open loop at {} req/s", group(r.round() as u64)),
            None => "closed loop".to_string(),
        };
        let _ = write!(
            s,
            "{}: {} thread{}, {} connection{}, {mode}",
            self.url,
            self.threads,
            plural(self.threads),
            self.connections,
            plural(self.connections),
        );
        if self.pipeline > 1 {
            let _ = write!(s, ", pipeline {}", self.pipeline);
        }
        if let Some(c) = &self.close {
            let _ = write!(s, ", connection per request ({c} closes)");
        }
        if let Some(r) = self.slow_read {
            let _ = write!(s, ", reading {r} B/s per connection");
        }
        if self.idle > 0 && self.idle_request {
            let _ = write!(
                s,
                ", {} idle connections after one request each ({} open at the start, {} \
                 answered 2xx, {} another status, {} closed by the server)",
                self.idle, self.idle_open, self.idle_answered, self.idle_rejected, self.idle_closed
            );
        } else if self.idle > 0 {
            let _ = write!(
                s,
                ", {} idle connections ({} open at the start, {} closed by the server)",
                self.idle, self.idle_open, self.idle_closed
            );
        }
        let _ = writeln!(
            s,
            "\n  {:.2}s measured after {:.2}s of warm-up",
            self.duration_s, self.warmup_s
        );
        let _ = writeln!(
            s,
            "  requests  {:>12}  {:>12} /s",
            group(self.requests),
            group(self.requests_per_s.round() as u64)
        );
        let _ = writeln!(
            s,
            "  bytes     {:>12}  {:>12} /s",
            human_bytes(self.bytes as f64),
            human_bytes(self.bytes_per_s)
        );
        let _ = writeln!(s, "  latency   {}", latency_line(&self.latency_us));
        if self.classes.len() > 1 {
            let total: u64 = self.classes.iter().map(|c| u64::from(c.weight)).sum();
            for c in &self.classes {
                let _ = writeln!(
                    s,
                    "    {} ({:.1}%, {} requests)\n              {}",
                    c.name,
                    100.0 * f64::from(c.weight) / total as f64,
                    group(c.requests),
                    latency_line(&c.latency_us)
                );
            }
        }
        let status: Vec<String> = self
            .status
            .iter()
            .map(|(code, n)| format!("{code}: {}", group(*n)))
            .collect();
        let _ = writeln!(
            s,
            "  status    {}",
            if status.is_empty() {
                "none".to_string()
            } else {
                status.join(", ")
            }
        );
        let errors: Vec<String> = self
            .errors
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k}: {}", group(*n)))
            .collect();
        let _ = writeln!(
            s,
            "  errors    {}",
            if errors.is_empty() {
                "none".to_string()
            } else {
                errors.join(", ")
            }
        );
        let _ = writeln!(
            s,
            "  loadgen   {:.2}s CPU, {:.2} us per request, {} connections opened",
            self.loadgen_cpu_s,
            self.loadgen_cpu_us_per_request,
            group(self.connects)
        );
        s
    }
}

fn latency_line(l: &Latency) -> String {
    format!(
        "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        human_us(l.p50),
        human_us(l.p90),
        human_us(l.p99),
        human_us(l.p99_9),
        human_us(l.max)
    )
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// 1234567 -> "1,234,567".
pub fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Microseconds as `850us`, `12.3ms` or `1.20s`.
pub fn human_us(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0}us")
    } else if us < 1_000_000.0 {
        format!("{:.2}ms", us / 1000.0)
    } else {
        format!("{:.2}s", us / 1e6)
    }
}

pub fn human_bytes(b: f64) -> String {
    if b < 1024.0 {
        format!("{b:.0} B")
    } else if b < 1024.0 * 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else if b < 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / 1024.0 / 1024.0)
    } else {
        format!("{:.2} GiB", b / 1024.0 / 1024.0 / 1024.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> RunInfo {
        RunInfo {
            url: "http://127.0.0.1:1/".into(),
            mode: "closed",
            threads: 2,
            connections: 4,
            pipeline: 1,
            rate: None,
            close: None,
            slow_read: None,
            idle: 0,
            idle_request: false,
            warmup: Duration::ZERO,
        }
    }

    fn totals(window: Duration) -> Totals {
        Totals {
            window,
            all_responses: 0,
            idle_open: 0,
            idle_answered: 0,
            idle_rejected: 0,
            idle_closed: 0,
            cpu: Duration::from_millis(500),
        }
    }

    /// Two threads' recorders merge into totals that add up: per class, per status, overall.
    #[test]
    fn histogram_accounting() {
        let mut a = Recorder::new(2);
        let mut b = Recorder::new(2);
        // Thread a: 900 fast replies of class 0 (1..=900 us) and 10 slow of class 1 (5 ms).
        for i in 1..=900u64 {
            a.response(0, Duration::from_micros(i), 200);
        }
        for _ in 0..10 {
            a.response(1, Duration::from_millis(5), 200);
        }
        // Thread b: 90 more of class 0 at 1 ms, and errors.
        for _ in 0..90 {
            b.response(0, Duration::from_millis(1), 404);
        }
        b.error(ErrorKind::Timeout);
        b.error(ErrorKind::Timeout);
        b.error(ErrorKind::Parse);
        a.bytes = 1000;
        b.bytes = 24;
        a.merge(&b);
        assert_eq!(a.responses(), 1000);

        let classes = [("GET /".to_string(), 99), ("GET /work".to_string(), 1)];
        let s = Summary::new(info(), &classes, &a, totals(Duration::from_secs(2)));
        assert_eq!(s.requests, 1000);
        assert_eq!(s.requests_per_s, 500.0);
        assert_eq!(s.bytes_per_s, 512.0);
        assert_eq!(s.classes[0].requests + s.classes[1].requests, s.requests);
        assert_eq!((s.classes[0].requests, s.classes[1].requests), (990, 10));
        assert_eq!(s.status.get("200"), Some(&910));
        assert_eq!(s.status.get("404"), Some(&90));
        assert_eq!(s.status.values().sum::<u64>(), s.requests);
        assert_eq!(s.errors["timeout"], 2);
        assert_eq!(s.errors["parse"], 1);
        assert_eq!(s.errors["connect"], 0);
        assert_eq!(s.error_total(), 3);
        assert_eq!(s.loadgen_cpu_us_per_request, 500.0);

        // Percentiles within HdrHistogram's 0.1% precision.
        let near = |got: f64, want: f64| (got - want).abs() <= want * 0.002 + 0.1;
        assert!(near(s.latency_us.p50, 500.0), "p50 {}", s.latency_us.p50);
        assert!(near(s.latency_us.p99, 1000.0), "p99 {}", s.latency_us.p99);
        assert!(near(s.latency_us.max, 5000.0), "max {}", s.latency_us.max);
        assert!(near(s.classes[1].latency_us.p50, 5000.0));
        assert!(near(s.classes[0].latency_us.max, 1000.0));
        // The curve rises and ends at the maximum; percentiles finer than 1/1000 are left out.
        let curve = &s.latency_us.curve;
        assert!(
            curve
                .windows(2)
                .all(|w| w[0][0] < w[1][0] && w[0][1] <= w[1][1])
        );
        assert_eq!(curve.last().unwrap()[1], s.latency_us.max);
        assert!(!curve.iter().any(|p| p[0] == 99.99));

        // JSON round trip, with the "p99.9" key scripts read.
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"p99.9\":"));
        let back: Summary = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        assert!(s.text().contains("timeout: 2"));
    }

    #[test]
    fn empty_run() {
        let s = Summary::new(
            info(),
            &[("GET /".into(), 1)],
            &Recorder::new(1),
            totals(Duration::from_secs(1)),
        );
        assert_eq!(
            (s.requests, s.latency_us.max, s.loadgen_cpu_us_per_request),
            (0, 0.0, 0.0)
        );
        assert!(s.latency_us.curve.is_empty());
        assert!(s.text().contains("status    none"));
    }

    #[test]
    fn formatting() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1234567), "1,234,567");
        assert_eq!(human_us(850.0), "850us");
        assert_eq!(human_us(12345.0), "12.35ms");
        assert_eq!(human_us(1_200_000.0), "1.20s");
        assert_eq!(human_bytes(2048.0), "2.0 KiB");
    }
}
