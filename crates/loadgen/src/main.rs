//! # loadgen: an HTTP/1.1 load generator for comparing the patterns
//!
//! wrk's engine (a non-blocking event loop per thread, pre-encoded requests, replies framed
//! without copying) with what comparing servers needs besides: an open loop at a fixed rate
//! with wrk2's coordinated-omission correction, a weighted request mix with latency per
//! class, connection-per-request churn, slow readers, idle connections, errors by kind, and
//! JSON for scripts. `loadgen report DIR` draws the tables and charts of `scripts/compare.sh`.
//! `--subscribe N` and `--long-poll N` hold N waiting clients (SSE streams, long polls) while
//! messages are posted, and measure each message's delivery to each of them.
//!
//! Run: `cargo run --release -p loadgen -- -c 50 -d 10s http://127.0.0.1:8080/`

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use flags::{duration, duration_or_zero, positive};
use loadgen::engine::{self, Close, Config, Stop};
use loadgen::spec::{Mix, RequestSpec, Target, parse_header};
use loadgen::stats::group;
use loadgen::subscribe::{self, Mode, Phase};

const AFTER_HELP: &str = "\
Request mix (-r, repeatable): [WEIGHT:]METHOD PATH [BODY | @FILE]
  -r '99:GET /' -r '1:GET /work?us=5000'      99% hello, 1% 5 ms of CPU work
  -r '1:POST /echo hello there'               inline body: the rest of the argument
  -r '1:POST /echo @body.json'                body read from a file
  Paths are relative to the URL's host; without -r, every request is GET on the URL's path.
  Latency is reported overall and per class.

Modes:
  closed loop (default)  each connection sends its next request when a reply arrives,
                         keeping --pipeline requests in flight
  --rate R               open loop: R requests/s in total, each sent when it falls due on
                         a connection with room; latency counts from when it fell due, so a
                         stalled server cannot hide its stall (wrk2's correction)
  --close client|server  a new connection per request: the client closes after the reply,
                         or sends `Connection: close` and waits for the server to close;
                         latency includes the connect
  --slow-read N          read at most N bytes/s per connection (4 KiB receive buffer)
  --idle N               also hold N connections open that never send anything
  --idle N --idle-request
                         each idle connection first sends one request (the first class of
                         the mix: without -r, GET on the URL's path) and reads its reply,
                         then stays silent: keep-alive clients between requests. With
                         -c 0 nothing else runs: what holding N of them costs a server
  --subscribe N          N SSE subscribers on URL (/events?type=message), each sending
                         Last-Event-ID: the journal's head; then --rate messages/s (default
                         1) are POSTed to /messages for --duration, and each delivery's
                         latency (receipt less the POST's send) is measured
  --long-poll N          the same with N clients looping GET URL?after=A&wait=--wait
                         (URL: /messages), after = the head of their previous reply

Errors, by kind (each closes the connection, which is reopened): connect, read, write,
timeout (no reply within --timeout), closed (the server closed with requests unanswered),
parse (not HTTP/1.1). Non-2xx replies are counted under status, not as errors.
With --subscribe/--long-poll: deliveries expected and received, missing, gaps (a message
skipped, a later one received), duplicates; a subscriber that fails reconnects (SSE after
the server's retry:) and resumes, and its failures are counted by kind and listed with
their times.";

#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    about = "HTTP/1.1 load generator: closed or open loop, request mixes, churn, slow readers; HdrHistogram latency.",
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write summary.md and SVG charts for a scripts/compare.sh results directory.
    Report {
        /// The directory compare.sh wrote (holding runs/*.json).
        dir: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// The server, e.g. http://127.0.0.1:8080/
    #[arg(required = true)]
    url: Option<String>,

    /// Connections to keep open (spread over the threads); 0 with --idle: only idle ones.
    #[arg(short = 'c', long, default_value_t = 50)]
    connections: usize,

    /// Threads, each an event loop over its share of the connections.
    #[arg(short = 't', long, default_value_t = 1, value_parser = positive)]
    threads: usize,

    /// How long to measure, after the warm-up: 500ms, 10s, 2m.
    #[arg(short = 'd', long, default_value = "10s", value_parser = duration)]
    duration: Duration,

    /// Stop after this many requests (after the warm-up) instead of after --duration.
    #[arg(short = 'n', long, value_parser = positive_u64)]
    requests: Option<u64>,

    /// Run this long first without counting anything.
    #[arg(long, default_value = "0s", value_parser = duration_or_zero)]
    warmup: Duration,

    /// Requests in flight per connection (HTTP/1.1 pipelining).
    #[arg(long, default_value_t = 1, value_parser = positive)]
    pipeline: usize,

    /// Open loop: this many requests per second over all connections (with --subscribe or
    /// --long-poll: messages per second, default 1).
    #[arg(short = 'R', long, value_parser = rate)]
    rate: Option<f64>,

    /// A class of the request mix: [WEIGHT:]METHOD PATH [BODY|@FILE] (repeatable; see below).
    #[arg(short = 'r', long = "request", value_name = "SPEC", value_parser = RequestSpec::parse)]
    requests_mix: Vec<RequestSpec>,

    /// A header for every request, 'Name: value' (repeatable).
    #[arg(short = 'H', long = "header", value_name = "HEADER", value_parser = parse_header)]
    headers: Vec<String>,

    /// A new connection per request; who closes it.
    #[arg(long, value_enum)]
    close: Option<CloseArg>,

    /// Read at most this many bytes per second per connection: 100, 4K.
    #[arg(long, value_name = "BYTES", value_parser = bytes_per_s)]
    slow_read: Option<u64>,

    /// Also hold this many idle connections open (they never send).
    #[arg(long, default_value_t = 0)]
    idle: usize,

    /// With --idle: each idle connection sends one request and reads its reply first.
    #[arg(long)]
    idle_request: bool,

    /// A connect or a reply taking longer than this fails the connection.
    #[arg(long, default_value = "10s", value_parser = duration)]
    timeout: Duration,

    /// Print the results as one JSON object.
    #[arg(long)]
    json: bool,

    /// Hold this many SSE subscribers on the URL while messages are posted (see below).
    #[arg(long, value_name = "N", value_parser = positive, conflicts_with_all = LOAD_ONLY)]
    subscribe: Option<usize>,

    /// Hold this many long polls on the URL while messages are posted (see below).
    #[arg(long, value_name = "N", value_parser = positive, conflicts_with_all = LOAD_ONLY,
          conflicts_with = "subscribe")]
    long_poll: Option<usize>,

    /// With --long-poll: how long the server may hold each poll (its `wait`).
    #[arg(long, default_value = "30s", value_parser = duration)]
    wait: Duration,
}

/// The request-load flags, which --subscribe and --long-poll do not take.
const LOAD_ONLY: [&str; 9] = [
    "connections",
    "pipeline",
    "requests",
    "warmup",
    "requests_mix",
    "close",
    "slow_read",
    "idle",
    "idle_request",
];

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CloseArg {
    Client,
    Server,
}

fn main() {
    // A bad argument gets one line naming it, and exit code 2.
    let cli: Cli = flags::parse();
    if let Some(Command::Report { dir }) = cli.command {
        match loadgen::report::write(&dir) {
            Ok(files) => {
                for f in files {
                    println!("{}", f.display());
                }
            }
            Err(e) => fail(&format!("report: {e}")),
        }
        return;
    }
    let args = cli.run;
    if args.subscribe.is_some() || args.long_poll.is_some() {
        return subscribe(&args);
    }
    let config = config(&args).unwrap_or_else(|e| fail(&e));

    let live = !args.json && std::io::stdout().is_terminal();
    let mut last = (Duration::ZERO, 0u64);
    let warmup = config.warmup;
    let summary = engine::run(&config, |elapsed, responses, errors| {
        if !live || elapsed < last.0 + Duration::from_secs(1) {
            return;
        }
        let rate = (responses - last.1) as f64 / (elapsed - last.0).as_secs_f64();
        last = (elapsed, responses);
        let phase = if elapsed < warmup { " (warm-up)" } else { "" };
        print!(
            "\r\x1b[K  {:>5.1}s  {:>10} req/s  {} errors{phase}",
            elapsed.as_secs_f64(),
            group(rate.round() as u64),
            group(errors)
        );
        let _ = std::io::stdout().flush();
    })
    .unwrap_or_else(|e| fail(&e));
    print_summary(live, args.json, &summary, || summary.text());
}

/// `--subscribe N` or `--long-poll N`.
fn subscribe(args: &RunArgs) {
    let cfg = subscribe_config(args).unwrap_or_else(|e| fail(&e));
    let live = !args.json && std::io::stdout().is_terminal();
    let mut last = Duration::ZERO;
    let summary = subscribe::run(&cfg, |t| {
        if !live || t.elapsed < last + Duration::from_secs(1) {
            return;
        }
        last = t.elapsed;
        let phase = match t.phase {
            Phase::Subscribing => "subscribing",
            Phase::Publishing => "publishing",
            Phase::Draining => "waiting for deliveries",
        };
        print!(
            "\r\x1b[K  {:>5.1}s  {phase}: {} subscribed, {} sent, {} deliveries, {} failures",
            t.elapsed.as_secs_f64(),
            group(t.subscribed),
            group(t.sent),
            group(t.deliveries),
            group(t.failures)
        );
        let _ = std::io::stdout().flush();
    })
    .unwrap_or_else(|e| fail(&e));
    print_summary(live, args.json, &summary, || summary.text());
}

fn subscribe_config(args: &RunArgs) -> Result<subscribe::Config, String> {
    let url = args.url.as_deref().ok_or("a URL is required")?;
    let target = Target::parse(url).map_err(|e| format!("URL {e}"))?;
    let (mode, subscribers) = match (args.subscribe, args.long_poll) {
        (Some(n), None) => (Mode::Sse, n),
        (None, Some(n)) => (Mode::LongPoll, n),
        _ => return Err("--subscribe: not with --long-poll".into()),
    };
    if subscribers < args.threads {
        return Err("--threads: must not exceed the subscribers".into());
    }
    let rate = args.rate.unwrap_or(1.0);
    if rate * args.duration.as_secs_f64() < 1.0 {
        return Err("--rate: no message would fall due within --duration".into());
    }
    Ok(subscribe::Config {
        target,
        mode,
        subscribers,
        threads: args.threads,
        rate,
        duration: args.duration,
        timeout: args.timeout,
        wait: args.wait,
        headers: args.headers.clone(),
    })
}

/// Clears the progress line, then prints the summary: one JSON object, or the text.
fn print_summary<T: serde::Serialize>(
    live: bool,
    json: bool,
    summary: &T,
    text: impl FnOnce() -> String,
) {
    if live {
        print!("\r\x1b[K");
    }
    if json {
        println!(
            "{}",
            serde_json::to_string(summary).expect("a summary serializes")
        );
    } else {
        print!("{}", text());
    }
}

fn fail(msg: &str) -> ! {
    let msg = msg.strip_prefix("error: ").unwrap_or(msg);
    eprintln!("error: {msg}");
    std::process::exit(2);
}

/// The checks clap cannot express, and the run's configuration.
fn config(args: &RunArgs) -> Result<Config, String> {
    let url = args.url.as_deref().ok_or("a URL is required")?;
    let target = Target::parse(url).map_err(|e| format!("URL {e}"))?;
    if args.close.is_some() && args.pipeline > 1 {
        return Err("--pipeline: must be 1 with --close (one request per connection)".into());
    }
    if args.connections == 0 {
        if args.idle == 0 {
            return Err("--connections: must be at least 1 (0 only with --idle)".into());
        }
        if args.rate.is_some() || args.requests.is_some() {
            return Err("--connections: 0 takes neither --rate nor --requests".into());
        }
    }
    if args.connections.max(args.idle) < args.threads {
        return Err("--threads: must not exceed --connections".into());
    }
    if args.idle_request && args.idle == 0 {
        return Err("--idle-request: needs --idle".into());
    }
    let classes = if args.requests_mix.is_empty() {
        vec![RequestSpec::parse(&format!("GET {}", target.path))?]
    } else {
        args.requests_mix.clone()
    };
    Ok(Config {
        target,
        mix: Mix::new(classes),
        headers: args.headers.clone(),
        threads: args.threads,
        connections: args.connections,
        pipeline: args.pipeline,
        rate: args.rate,
        stop: match args.requests {
            Some(n) => Stop::Requests(n),
            None => Stop::Duration(args.duration),
        },
        warmup: args.warmup,
        close: args.close.map(|c| match c {
            CloseArg::Client => Close::Client,
            CloseArg::Server => Close::Server,
        }),
        slow_read: args.slow_read,
        idle: args.idle,
        idle_request: args.idle_request,
        timeout: args.timeout,
    })
}

fn positive_u64(s: &str) -> Result<u64, String> {
    positive(s).map(|n| n as u64)
}

fn rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r > 0.0 && r.is_finite() => Ok(r),
        _ => Err("expected requests per second, more than zero".into()),
    }
}

fn bytes_per_s(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.strip_suffix(['K', 'k']) {
        Some(d) => (d, 10),
        None => match s.strip_suffix(['M', 'm']) {
            Some(d) => (d, 20),
            None => (s, 0),
        },
    };
    match digits.parse::<u64>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => n.checked_mul(1 << shift).ok_or_else(|| "too large".into()),
        Err(_) => Err("expected bytes per second, such as 100 or 4K".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("loadgen").chain(args.iter().copied()))
    }

    #[test]
    fn flags() {
        let cli = parse(&[
            "-c",
            "10",
            "-t",
            "2",
            "--rate",
            "1000",
            "http://127.0.0.1:1/",
        ])
        .unwrap();
        let cfg = config(&cli.run).unwrap();
        assert_eq!(
            (cfg.connections, cfg.threads, cfg.rate),
            (10, 2, Some(1000.0))
        );
        assert_eq!(cfg.mix.classes[0].name, "GET /");
        let cli = parse(&["report", "results/x"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Report { .. })));
        let cli = parse(&["-c", "0", "http://127.0.0.1:1/"]).unwrap();
        assert!(config(&cli.run).unwrap_err().starts_with("--connections"));
        assert!(parse(&["--close", "both", "http://127.0.0.1:1/"]).is_err());
        assert!(parse(&["-r", "0:GET /", "http://127.0.0.1:1/"]).is_err());
        assert!(parse(&[]).is_err());
        let cli = parse(&[
            "--close",
            "client",
            "--pipeline",
            "4",
            "http://127.0.0.1:1/",
        ])
        .unwrap();
        assert!(config(&cli.run).unwrap_err().starts_with("--pipeline"));
        let cli = parse(&["-c", "1", "-t", "2", "http://127.0.0.1:1/"]).unwrap();
        assert!(config(&cli.run).unwrap_err().starts_with("--threads"));
    }

    #[test]
    fn idle_only_flags() {
        let cli = parse(&[
            "-c",
            "0",
            "--idle",
            "100",
            "--idle-request",
            "-t",
            "2",
            "http://127.0.0.1:1/",
        ])
        .unwrap();
        let cfg = config(&cli.run).unwrap();
        assert_eq!(
            (cfg.connections, cfg.idle, cfg.idle_request),
            (0, 100, true)
        );
        for (args, flag) in [
            (&["-c", "0", "http://127.0.0.1:1/"][..], "--connections"),
            (
                &[
                    "-c",
                    "0",
                    "--idle",
                    "5",
                    "--rate",
                    "10",
                    "http://127.0.0.1:1/",
                ],
                "--connections",
            ),
            (
                &["-c", "0", "--idle", "5", "-n", "10", "http://127.0.0.1:1/"],
                "--connections",
            ),
            (&["--idle-request", "http://127.0.0.1:1/"], "--idle-request"),
            (
                &["-c", "0", "--idle", "1", "-t", "2", "http://127.0.0.1:1/"],
                "--threads",
            ),
        ] {
            let cli = parse(args).unwrap();
            let err = config(&cli.run).unwrap_err();
            assert!(err.starts_with(flag), "{args:?}: {err}");
        }
        assert!(parse(&["--long-poll", "5", "--idle-request", "http://127.0.0.1:1/"]).is_err());
    }

    #[test]
    fn subscribe_flags() {
        let cli = parse(&["--subscribe", "100", "-t", "2", "http://127.0.0.1:1/events"]).unwrap();
        let cfg = subscribe_config(&cli.run).unwrap();
        assert_eq!(
            (cfg.mode, cfg.subscribers, cfg.threads, cfg.rate),
            (Mode::Sse, 100, 2, 1.0)
        );
        let cli = parse(&[
            "--long-poll",
            "5",
            "--rate",
            "20",
            "--wait",
            "5s",
            "http://127.0.0.1:1/messages",
        ])
        .unwrap();
        let cfg = subscribe_config(&cli.run).unwrap();
        assert_eq!((cfg.mode, cfg.rate), (Mode::LongPoll, 20.0));
        assert_eq!(cfg.wait, Duration::from_secs(5));
        for bad in [
            &[
                "--subscribe",
                "5",
                "--long-poll",
                "5",
                "http://127.0.0.1:1/",
            ][..],
            &["--subscribe", "5", "-c", "5", "http://127.0.0.1:1/"],
            &["--long-poll", "5", "--pipeline", "2", "http://127.0.0.1:1/"],
            &["--subscribe", "0", "http://127.0.0.1:1/"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let cli = parse(&["--subscribe", "1", "-t", "2", "http://127.0.0.1:1/"]).unwrap();
        assert!(
            subscribe_config(&cli.run)
                .unwrap_err()
                .starts_with("--threads")
        );
        let cli = parse(&[
            "--subscribe",
            "1",
            "-d",
            "1s",
            "--rate",
            "0.5",
            "http://127.0.0.1:1/",
        ])
        .unwrap();
        assert!(
            subscribe_config(&cli.run)
                .unwrap_err()
                .starts_with("--rate")
        );
    }

    #[test]
    fn values() {
        assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(duration("0").is_err() && duration("1d").is_err());
        assert_eq!(duration_or_zero("0"), Ok(Duration::ZERO));
        assert_eq!(bytes_per_s("4K"), Ok(4096));
        assert!(bytes_per_s("0").is_err() && bytes_per_s("x").is_err());
        assert!(rate("0").is_err() && rate("-1").is_err() && rate("inf").is_err());
    }
}
