//! Counting for `--subscribe` and `--long-poll`: each subscriber thread fills its own
//! [`Tally`], the publisher its [`Published`]; at the end they make one [`Summary`], printed as
//! text or JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::stats::{ErrorKind, Latency, group, human_us, new_histogram};

/// Why a subscriber's connection failed; after each it reconnects (SSE: after the server's
/// `retry:`), resuming where it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// connect(2) failed or did not finish within --timeout.
    Connect,
    /// read(2) failed (a reset).
    Read,
    /// write(2) failed.
    Write,
    /// A long poll unanswered for its wait plus --timeout.
    Timeout,
    /// The server closed the connection: an event stream ended, or a long poll went unanswered.
    Closed,
    /// The reply was not 200.
    Status,
    /// Not HTTP/1.1, not an event stream, or a long poll reply that is not the messages' JSON.
    Parse,
}

impl Failure {
    pub const ALL: [Failure; 7] = [
        Failure::Connect,
        Failure::Read,
        Failure::Write,
        Failure::Timeout,
        Failure::Closed,
        Failure::Status,
        Failure::Parse,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Read => "read",
            Failure::Write => "write",
            Failure::Timeout => "timeout",
            Failure::Closed => "closed",
            Failure::Status => "status",
            Failure::Parse => "parse",
        }
    }
}

/// Failures listed one by one in the summary, at most (the counts cover all of them).
pub const LISTED_FAILURES: usize = 50;

/// One failure, for the list.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FailureEvent {
    /// Seconds since publishing began (negative: while subscribing).
    pub at_s: f64,
    pub subscriber: usize,
    pub kind: String,
    /// It had been subscribed (a stream or poll under way was cut), rather than never getting
    /// that far on this connection.
    pub was_subscribed: bool,
}

/// One subscriber thread's counts.
pub struct Tally {
    /// Per delivery: its receipt time less its POST's send time, in ns.
    pub latency: Histogram<u64>,
    /// Per message number: subscribers that had it, and the latest receipt's latency (ns).
    pub per_message: Vec<(u32, u64)>,
    /// This run's messages received (each subscriber's first copy of each).
    pub deliveries: u64,
    /// A message a subscriber already had.
    pub duplicates: u64,
    /// A message with a lower seq than one the subscriber had before.
    pub reordered: u64,
    /// Messages that are not this run's (another writer's, an earlier run's).
    pub foreign: u64,
    /// Message events whose data was not a message's JSON.
    pub unparsed: u64,
    /// SSE comments (`: keep-alive`).
    pub comments: u64,
    /// Long-poll replies.
    pub polls: u64,
    pub connects: u64,
    /// Subscribers' status codes, 0..=999.
    pub status: Vec<u64>,
    pub failures: [u64; 7],
    pub failure_events: Vec<FailureEvent>,
    /// Subscribers that failed at least once; of those, that lost a stream or a poll.
    pub subscribers_failed: u64,
    pub subscribers_disconnected: u64,
    /// Found at the end, per subscriber: published messages it never had, and of those the
    /// ones it skipped (it had a later one).
    pub missing: u64,
    pub gaps: u64,
}

impl Tally {
    pub fn new(messages: usize) -> Tally {
        Tally {
            latency: new_histogram(),
            per_message: vec![(0, 0); messages],
            deliveries: 0,
            duplicates: 0,
            reordered: 0,
            foreign: 0,
            unparsed: 0,
            comments: 0,
            polls: 0,
            connects: 0,
            status: vec![0; 1000],
            failures: [0; 7],
            failure_events: Vec::new(),
            subscribers_failed: 0,
            subscribers_disconnected: 0,
            missing: 0,
            gaps: 0,
        }
    }

    /// Message `n` reached a subscriber `ns` after its POST was sent.
    #[inline]
    pub fn delivered(&mut self, n: usize, ns: u64) {
        self.deliveries += 1;
        self.latency.saturating_record(ns.max(1));
        let m = &mut self.per_message[n];
        m.0 += 1;
        m.1 = m.1.max(ns);
    }

    pub fn status(&mut self, code: u16) {
        self.status[usize::from(code).min(999)] += 1;
    }

    pub fn failure(&mut self, kind: Failure, event: FailureEvent) {
        self.failures[kind as usize] += 1;
        if self.failure_events.len() < LISTED_FAILURES {
            self.failure_events.push(event);
        }
    }

    pub fn merge(&mut self, o: &Tally) {
        self.latency.add(&o.latency).expect("same bounds");
        for (mine, theirs) in self.per_message.iter_mut().zip(&o.per_message) {
            mine.0 += theirs.0;
            mine.1 = mine.1.max(theirs.1);
        }
        for (mine, theirs) in self.status.iter_mut().zip(&o.status) {
            *mine += theirs;
        }
        for (mine, theirs) in self.failures.iter_mut().zip(&o.failures) {
            *mine += theirs;
        }
        self.failure_events.extend(o.failure_events.iter().cloned());
        self.failure_events
            .sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
        self.failure_events.truncate(LISTED_FAILURES);
        self.deliveries += o.deliveries;
        self.duplicates += o.duplicates;
        self.reordered += o.reordered;
        self.foreign += o.foreign;
        self.unparsed += o.unparsed;
        self.comments += o.comments;
        self.polls += o.polls;
        self.connects += o.connects;
        self.subscribers_failed += o.subscribers_failed;
        self.subscribers_disconnected += o.subscribers_disconnected;
        self.missing += o.missing;
        self.gaps += o.gaps;
    }
}

/// The publisher's counts.
pub struct Published {
    /// POSTs written.
    pub sent: u64,
    /// Per message number: answered 201.
    pub confirmed: Vec<bool>,
    /// POST to reply.
    pub latency: Histogram<u64>,
    pub status: BTreeMap<u16, u64>,
    pub errors: [u64; 6],
    /// POSTs never answered (their connection failed, or the run ended first).
    pub unanswered: u64,
}

impl Published {
    pub fn new(messages: usize) -> Published {
        Published {
            sent: 0,
            confirmed: vec![false; messages],
            latency: new_histogram(),
            status: BTreeMap::new(),
            errors: [0; 6],
            unanswered: 0,
        }
    }

    pub fn confirmed_count(&self) -> u64 {
        self.confirmed.iter().filter(|&&c| c).count() as u64
    }
}

/// How a run was set up, for the summary's header fields.
pub struct RunInfo {
    pub url: String,
    pub mode: &'static str,
    pub threads: usize,
    pub subscribers: usize,
    pub rate: f64,
    pub duration: Duration,
    /// From the start until publishing began.
    pub setup: Duration,
    /// Subscribed when publishing began, and at the end.
    pub subscribed: u64,
    pub subscribed_at_end: u64,
    pub cpu: Duration,
}

/// The publisher's part of the summary.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Publishing {
    /// POSTs written.
    pub sent: u64,
    /// POSTs answered 201: the messages every subscriber should get.
    pub published: u64,
    /// Written but never answered.
    pub unanswered: u64,
    /// Replies by status code.
    pub status: BTreeMap<String, u64>,
    /// The publisher's connection errors by kind (every kind present).
    pub errors: BTreeMap<String, u64>,
    /// From writing the POST to its reply (with `--commit sync`, the fsync is in it).
    pub latency_us: Latency,
}

/// What a subscribe or long-poll run measured: the JSON that `--json` prints.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub url: String,
    /// `sse` or `long-poll`.
    pub mode: String,
    pub threads: usize,
    pub subscribers: usize,
    /// Messages per second, and for how long.
    pub rate: f64,
    pub duration_s: f64,
    /// From the start until publishing began (every subscriber subscribed, or none more for
    /// --timeout).
    pub setup_s: f64,
    /// Subscribers subscribed (SSE: the 200 head and the stream's first line; long poll: its
    /// first poll written) when publishing began, and at the end.
    pub subscribed: u64,
    pub subscribed_at_end: u64,
    pub messages: Publishing,
    /// subscribers x published messages.
    pub deliveries_expected: u64,
    /// Published messages received, each subscriber's first copy counted.
    pub deliveries: u64,
    /// Expected but never received; of those, skipped: a later message did arrive.
    pub missing: u64,
    pub gaps: u64,
    /// Received again; received after one with a higher seq.
    pub duplicates: u64,
    pub reordered: u64,
    /// Deliveries of messages whose POST got no 201 (not expected, counted apart).
    pub unconfirmed_deliveries: u64,
    /// Messages that are not this run's; message events with unreadable data.
    pub foreign: u64,
    pub unparsed: u64,
    /// SSE comments received (keep-alives); long-poll replies.
    pub comments: u64,
    pub polls: u64,
    /// Per delivery: receipt time less the POST's send time.
    pub latency_us: Latency,
    /// Per published message: until the last subscriber that got it had it.
    pub last_delivery_us: Latency,
    /// Published messages that some subscriber never got.
    pub incomplete_messages: u64,
    /// Subscribers' replies by status code.
    pub status: BTreeMap<String, u64>,
    /// Subscribers' failures by kind (every kind present).
    pub failures: BTreeMap<String, u64>,
    /// Subscribers that failed at least once; those that lost a stream or poll under way.
    pub subscribers_failed: u64,
    pub subscribers_disconnected: u64,
    /// The first failures, in time order.
    pub failure_events: Vec<FailureEvent>,
    /// Subscriber connections opened (reconnects included).
    pub connects: u64,
    /// loadgen's CPU (user+system, all threads) over the whole run.
    pub loadgen_cpu_s: f64,
    pub loadgen_cpu_us_per_delivery: f64,
}

impl Summary {
    pub fn new(info: RunInfo, t: &Tally, p: &Published) -> Summary {
        let published = p.confirmed_count();
        let mut last = new_histogram();
        let (mut confirmed_deliveries, mut incomplete) = (0u64, 0u64);
        for (n, &(count, latest)) in t.per_message.iter().enumerate() {
            if !p.confirmed[n] {
                continue;
            }
            confirmed_deliveries += u64::from(count);
            if count > 0 {
                last.saturating_record(latest.max(1));
            }
            if (count as usize) < info.subscribers {
                incomplete += 1;
            }
        }
        let cpu = info.cpu.as_secs_f64();
        Summary {
            url: info.url,
            mode: info.mode.to_string(),
            threads: info.threads,
            subscribers: info.subscribers,
            rate: info.rate,
            duration_s: round3(info.duration.as_secs_f64()),
            setup_s: round3(info.setup.as_secs_f64()),
            subscribed: info.subscribed,
            subscribed_at_end: info.subscribed_at_end,
            messages: Publishing {
                sent: p.sent,
                published,
                unanswered: p.unanswered,
                status: p
                    .status
                    .iter()
                    .map(|(code, n)| (code.to_string(), *n))
                    .collect(),
                errors: ErrorKind::ALL
                    .iter()
                    .map(|k| (k.name().to_string(), p.errors[*k as usize]))
                    .collect(),
                latency_us: Latency::of(&p.latency),
            },
            deliveries_expected: info.subscribers as u64 * published,
            deliveries: confirmed_deliveries,
            missing: t.missing,
            gaps: t.gaps,
            duplicates: t.duplicates,
            reordered: t.reordered,
            unconfirmed_deliveries: t.deliveries - confirmed_deliveries,
            foreign: t.foreign,
            unparsed: t.unparsed,
            comments: t.comments,
            polls: t.polls,
            latency_us: Latency::of(&t.latency),
            last_delivery_us: Latency::of(&last),
            incomplete_messages: incomplete,
            status: t
                .status
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(code, n)| (code.to_string(), *n))
                .collect(),
            failures: Failure::ALL
                .iter()
                .map(|k| (k.name().to_string(), t.failures[*k as usize]))
                .collect(),
            subscribers_failed: t.subscribers_failed,
            subscribers_disconnected: t.subscribers_disconnected,
            failure_events: t.failure_events.clone(),
            connects: t.connects,
            loadgen_cpu_s: round3(cpu),
            loadgen_cpu_us_per_delivery: if t.deliveries > 0 {
                round3(cpu * 1e6 / t.deliveries as f64)
            } else {
                0.0
            },
        }
    }

    pub fn failure_total(&self) -> u64 {
        self.failures.values().sum()
    }

    /// The human-readable report.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let what = if self.mode == "sse" {
            "SSE subscribers"
        } else {
            "long polls"
        };
        let _ = writeln!(
            s,
            "{}: {} {what} on {} thread{}; {} message{}/s for {:.1}s",
            self.url,
            group(self.subscribers as u64),
            self.threads,
            if self.threads == 1 { "" } else { "s" },
            self.rate,
            if self.rate == 1.0 { "" } else { "s" },
            self.duration_s
        );
        let _ = writeln!(
            s,
            "  subscribed  {} of {} after {:.2}s; {} at the end",
            group(self.subscribed),
            group(self.subscribers as u64),
            self.setup_s,
            group(self.subscribed_at_end)
        );
        let m = &self.messages;
        let status: Vec<String> = m
            .status
            .iter()
            .map(|(c, n)| format!("{c}: {}", group(*n)))
            .collect();
        let _ = writeln!(
            s,
            "  published   {} of {} sent ({}{}); POST to reply {}",
            group(m.published),
            group(m.sent),
            if status.is_empty() {
                "no replies".to_string()
            } else {
                status.join(", ")
            },
            counts_note(&m.errors, m.unanswered),
            latency_line(&m.latency_us)
        );
        let _ = writeln!(
            s,
            "  deliveries  {} of {} expected; missing {}, gaps {}, duplicates {}, reordered {}",
            group(self.deliveries),
            group(self.deliveries_expected),
            group(self.missing),
            group(self.gaps),
            group(self.duplicates),
            group(self.reordered)
        );
        let _ = writeln!(
            s,
            "  latency     {}   (each delivery: receipt less the POST's send)",
            latency_line(&self.latency_us)
        );
        let _ = writeln!(
            s,
            "  last one    {}   (each message: until the last subscriber had it; {} incomplete)",
            latency_line(&self.last_delivery_us),
            group(self.incomplete_messages)
        );
        let failures: Vec<String> = self
            .failures
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k}: {}", group(*n)))
            .collect();
        if failures.is_empty() {
            let _ = writeln!(s, "  failures    none");
        } else {
            let times = match (self.failure_events.first(), self.failure_events.last()) {
                (Some(a), Some(b)) => format!("; listed from {:.2}s to {:.2}s", a.at_s, b.at_s),
                _ => String::new(),
            };
            let _ = writeln!(
                s,
                "  failures    {} ({} subscribers, {} of them cut while subscribed{times})",
                failures.join(", "),
                group(self.subscribers_failed),
                group(self.subscribers_disconnected)
            );
        }
        let non_200: Vec<String> = self
            .status
            .iter()
            .filter(|(c, _)| *c != "200")
            .map(|(c, n)| format!("{c}: {}", group(*n)))
            .collect();
        if !non_200.is_empty() {
            let _ = writeln!(s, "  status      {}", non_200.join(", "));
        }
        let mut other = Vec::new();
        for (what, n) in [
            ("long-poll replies", self.polls),
            ("comments", self.comments),
            ("foreign messages", self.foreign),
            ("unparsed events", self.unparsed),
            ("unconfirmed deliveries", self.unconfirmed_deliveries),
        ] {
            if n > 0 {
                other.push(format!("{what} {}", group(n)));
            }
        }
        if !other.is_empty() {
            let _ = writeln!(s, "  also        {}", other.join(", "));
        }
        let _ = writeln!(
            s,
            "  loadgen     {:.2}s CPU, {:.2} us per delivery, {} connections opened",
            self.loadgen_cpu_s,
            self.loadgen_cpu_us_per_delivery,
            group(self.connects)
        );
        s
    }
}

fn counts_note(errors: &BTreeMap<String, u64>, unanswered: u64) -> String {
    let mut parts: Vec<String> = errors
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k} errors: {}", group(*n)))
        .collect();
    if unanswered > 0 {
        parts.push(format!("unanswered: {}", group(unanswered)));
    }
    parts.iter().map(|p| format!("; {p}")).collect()
}

fn latency_line(l: &Latency) -> String {
    format!(
        "p50 {}  p90 {}  p99 {}  max {}",
        human_us(l.p50),
        human_us(l.p90),
        human_us(l.p99),
        human_us(l.max)
    )
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(subscribers: usize) -> RunInfo {
        RunInfo {
            url: "http://127.0.0.1:1/events".into(),
            mode: "sse",
            threads: 2,
            subscribers,
            rate: 1.0,
            duration: Duration::from_secs(3),
            setup: Duration::from_millis(100),
            subscribed: subscribers as u64,
            subscribed_at_end: subscribers as u64,
            cpu: Duration::from_millis(10),
        }
    }

    /// Two threads' tallies merge; deliveries count only confirmed messages; the last
    /// delivery of each message is the latest over both threads.
    #[test]
    fn accounting() {
        let mut a = Tally::new(3);
        let mut b = Tally::new(3);
        // Two subscribers on thread a, one on b. Message 0: all three; 1: two (b missed it);
        // 2: its POST got no 201, yet one subscriber had it.
        a.delivered(0, 1_000_000);
        a.delivered(0, 2_000_000);
        b.delivered(0, 5_000_000);
        a.delivered(1, 1_000_000);
        a.delivered(1, 3_000_000);
        a.delivered(2, 1_000_000);
        b.missing = 1;
        b.gaps = 0;
        b.failure(
            Failure::Closed,
            FailureEvent {
                at_s: 1.5,
                subscriber: 2,
                kind: "closed".into(),
                was_subscribed: true,
            },
        );
        b.subscribers_failed = 1;
        b.subscribers_disconnected = 1;
        a.merge(&b);
        let mut p = Published::new(3);
        p.sent = 3;
        p.confirmed = vec![true, true, false];
        p.unanswered = 1;
        p.status.insert(201, 2);
        let s = Summary::new(info(3), &a, &p);
        assert_eq!(s.messages.published, 2);
        assert_eq!(s.deliveries_expected, 6);
        assert_eq!(s.deliveries, 5);
        assert_eq!(s.unconfirmed_deliveries, 1);
        assert_eq!(s.incomplete_messages, 1);
        assert_eq!(s.missing, 1);
        assert_eq!(s.failures["closed"], 1);
        assert_eq!(s.failure_total(), 1);
        assert_eq!(s.failure_events[0].subscriber, 2);
        // The last subscriber: 5 ms for message 0, 3 ms for message 1.
        let near = |got: f64, want: f64| (got - want).abs() <= want * 0.002;
        assert!(
            near(s.last_delivery_us.max, 5000.0),
            "{:?}",
            s.last_delivery_us
        );
        assert!(
            near(s.last_delivery_us.p50, 3000.0),
            "{:?}",
            s.last_delivery_us
        );
        assert!(near(s.latency_us.max, 5000.0));
        let json = serde_json::to_string(&s).unwrap();
        let back: Summary = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        let text = s.text();
        assert!(text.contains("5 of 6 expected"), "{text}");
        assert!(text.contains("closed: 1 (1 subscribers"), "{text}");
    }
}
