//! The command-line conventions every binary in the workspace shares, servers and load
//! generator alike: a bad flag gets one line naming it and exit code 2, and sizes and durations
//! take units (`64K`, `8M`; `250ms`, `10s`, `2m`).

use std::time::Duration;

use clap::Parser;

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

/// A whole number, at least 1.
pub fn positive(s: &str) -> Result<usize, String> {
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

/// A duration: `250ms`, `10s`, `2m`, `24h`, or a plain number of seconds; more than zero.
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
        "h" => n * 3600.0,
        _ => return Err(format!("unknown unit {unit:?}: use ms, s, m or h")),
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
        assert_eq!(duration("24h"), Ok(Duration::from_secs(86_400)));
        assert!(duration("0").is_err() && duration("5d").is_err() && duration("x").is_err());
    }
}
