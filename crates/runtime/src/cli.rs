//! The flags every server takes. A pattern crate flattens [`ServerArgs`] into its own clap
//! struct and adds the flags of its pattern.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

#[derive(clap::Args, Debug, Clone)]
pub struct ServerArgs {
    /// Address to listen on (port 0 picks a free port; the start-up line says which).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,

    /// Worker threads or processes [default: number of cores].
    #[arg(long, value_parser = positive)]
    pub workers: Option<usize>,

    /// Length of the kernel's accept queue for the listening socket (listen(2) backlog).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=65535))]
    pub backlog: u32,

    /// Disable Nagle's algorithm on accepted connections (TCP_NODELAY) [default].
    #[arg(long, overrides_with = "no_nodelay")]
    pub nodelay: bool,

    /// Leave Nagle's algorithm on: small writes may wait up to an RTT or a delayed ACK.
    #[arg(long)]
    pub no_nodelay: bool,

    /// Socket receive buffer (SO_RCVBUF) in bytes, e.g. 64K [default: the kernel's autotuning].
    #[arg(long, value_parser = size)]
    pub rcvbuf: Option<usize>,

    /// Socket send buffer (SO_SNDBUF) in bytes, e.g. 64K [default: the kernel's autotuning].
    #[arg(long, value_parser = size)]
    pub sndbuf: Option<usize>,

    /// Open connections at most; past it, new ones wait in the accept queue.
    #[arg(long, default_value_t = 10_000, value_parser = positive)]
    pub max_conns: usize,

    /// Close a connection whose request head has not fully arrived in this time (408).
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub header_timeout: Duration,

    /// Close a keep-alive connection idle this long.
    #[arg(long, default_value = "60s", value_parser = duration)]
    pub idle_timeout: Duration,

    /// A request body must make progress at least this often (408).
    #[arg(long, default_value = "60s", value_parser = duration)]
    pub body_timeout: Duration,

    /// Close a connection whose peer takes none of our output for this long.
    #[arg(long, default_value = "60s", value_parser = duration)]
    pub send_timeout: Duration,

    /// On SIGTERM/SIGINT, a connection that has sent nothing yet may still send its first
    /// request this long (the kernel accepted it on the server's behalf).
    #[arg(long, default_value = "1s", value_parser = duration)]
    pub shutdown_grace: Duration,

    /// On SIGTERM/SIGINT, wait this long for in-flight requests before exiting anyway.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub shutdown_timeout: Duration,

    /// Largest request head (request line and headers) in bytes; larger gets 431.
    #[arg(long, default_value = "16K", value_parser = size)]
    pub max_head: usize,

    /// Longest request target in bytes; longer gets 414.
    #[arg(long, default_value = "8K", value_parser = size)]
    pub max_target: usize,

    /// Largest request body in bytes; larger gets 413.
    #[arg(long, default_value = "8M", value_parser = size)]
    pub max_body: usize,
}

impl ServerArgs {
    pub fn nodelay(&self) -> bool {
        !self.no_nodelay
    }

    /// `--workers`, or the number of cores.
    pub fn workers(&self) -> usize {
        self.workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    pub fn timeouts(&self) -> proto::Timeouts {
        proto::Timeouts {
            header: self.header_timeout,
            body: self.body_timeout,
            idle: self.idle_timeout,
            send: self.send_timeout,
            shutdown_grace: self.shutdown_grace,
            ..proto::Timeouts::default()
        }
    }

    pub fn limits(&self) -> proto::Limits {
        proto::Limits {
            max_head: self.max_head,
            max_target: self.max_target,
            max_body: self.max_body,
            ..proto::Limits::default()
        }
    }
}

/// Parses the command line; a bad flag gets one line naming it, and exit code 2.
pub fn parse<A: Parser>() -> A {
    match A::try_parse() {
        Ok(args) => args,
        Err(e) if e.use_stderr() => {
            let text = e.to_string();
            eprintln!("{}", text.lines().next().unwrap_or("error: bad arguments"));
            std::process::exit(2);
        }
        // --help and --version.
        Err(e) => e.exit(),
    }
}

fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err("expected a positive whole number".into()),
    }
}

/// Bytes, with an optional K, M or G suffix (powers of 1024): `65536`, `64K`, `8M`.
pub fn size(s: &str) -> Result<usize, String> {
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, ""),
    };
    let shift = match unit {
        "" | "B" | "b" => 0,
        "K" | "k" | "KiB" => 10,
        "M" | "m" | "MiB" => 20,
        "G" | "g" | "GiB" => 30,
        _ => {
            return Err(format!(
                "unknown unit {unit:?}: use a number of bytes, or K, M, G"
            ));
        }
    };
    let n: usize = digits
        .parse()
        .map_err(|_| "expected a size such as 65536, 64K or 8M".to_string())?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| "too large".to_string())
}

/// A duration: `250ms`, `10s`, `2m`, or a plain number of seconds; more than zero.
pub fn duration(s: &str) -> Result<Duration, String> {
    match duration_or_zero(s)? {
        Duration::ZERO => Err("must be more than zero".into()),
        d => Ok(d),
    }
}

/// Like [`duration`], but zero is allowed (`--warmup 0s`).
pub fn duration_or_zero(s: &str) -> Result<Duration, String> {
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| "expected a duration such as 500ms, 10s or 2m".to_string())?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("unknown unit {unit:?}: use ms, s or m")),
    };
    if !(0.0..1e9).contains(&secs) {
        return Err("out of range".into());
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(size("64K"), Ok(65536));
        assert_eq!(size("8M"), Ok(8 << 20));
        assert_eq!(size("100"), Ok(100));
        assert!(size("12X").is_err() && size("").is_err() && size("-1").is_err());
        assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(duration("0").is_err() && duration("5h").is_err() && duration("x").is_err());
    }
}
