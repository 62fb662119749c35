//! What to send: the target URL, the request classes of a weighted mix, their bytes encoded
//! once before the run, and the random pick of a class per request.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;

/// `http://HOST:PORT/PATH`, resolved once.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// The `Host` header: `HOST:PORT` as given.
    pub host: String,
    /// The path and query of the URL, `/` when it has none.
    pub path: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url:?}: only http:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            return Err(format!("{url:?}: no host"));
        }
        let with_port = if has_port(authority) {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| format!("{authority}: {e}"))?
            .next()
            .ok_or_else(|| format!("{authority}: no address"))?;
        Ok(Target {
            addr,
            host: authority.to_string(),
            path: path.to_string(),
        })
    }
}

/// `host:port` or `[v6]:port`, as opposed to a bare host.
fn has_port(authority: &str) -> bool {
    match authority.rfind(']') {
        Some(close) => authority[close..].contains(':'),
        None => authority.contains(':'),
    }
}

/// One class of request in the mix: `[WEIGHT:]METHOD PATH [BODY]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestSpec {
    pub weight: u32,
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
    /// How reports name it: `METHOD PATH`.
    pub name: String,
}

impl RequestSpec {
    /// Parses `99:GET /`, `GET /work?us=5000`, `1:POST /echo @body.json` (the body is the
    /// file's contents) or `1:POST /echo some text` (the body is the rest of the line).
    pub fn parse(s: &str) -> Result<RequestSpec, String> {
        let (weight, rest) = match s.split_once(':') {
            Some((w, rest)) if !w.is_empty() && w.bytes().all(|b| b.is_ascii_digit()) => {
                let w: u32 = w
                    .parse()
                    .map_err(|_| format!("{s:?}: weight {w} is too large"))?;
                (w, rest)
            }
            _ => (1, s),
        };
        if weight == 0 {
            return Err(format!("{s:?}: the weight must be at least 1"));
        }
        let mut parts = rest.trim_start().splitn(3, ' ');
        let method = parts.next().unwrap_or("");
        let path = parts.next().unwrap_or("");
        if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(format!("{s:?}: expected [WEIGHT:]METHOD PATH [BODY|@FILE]"));
        }
        if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(format!(
                "{s:?}: the path must start with / and hold no spaces"
            ));
        }
        let body = match parts.next() {
            None | Some("") => Vec::new(),
            Some(file) if file.starts_with('@') => read_body(&file[1..])?,
            Some(text) => text.as_bytes().to_vec(),
        };
        Ok(RequestSpec {
            weight,
            name: format!("{method} {path}"),
            method: method.to_string(),
            path: path.to_string(),
            body,
        })
    }

    /// The request's bytes on the wire, encoded once before the run.
    pub fn encode(&self, host: &str, headers: &[String], close: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.body.len());
        out.extend_from_slice(self.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.path.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\n");
        for h in headers {
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if !self.body.is_empty() || matches!(self.method.as_str(), "POST" | "PUT" | "PATCH") {
            out.extend_from_slice(format!("Content-Length: {}\r\n", self.body.len()).as_bytes());
        }
        if close {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }

    /// A HEAD reply has headers only, whatever its Content-Length says.
    pub fn expects_no_body(&self) -> bool {
        self.method == "HEAD"
    }
}

fn read_body(path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(Path::new(path)).map_err(|e| format!("@{path}: {e}"))
}

/// A `-H 'Name: value'` header sent with every request.
pub fn parse_header(s: &str) -> Result<String, String> {
    match s.split_once(':') {
        Some((name, value))
            if !name.is_empty()
                && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
                && !value.contains(['\r', '\n']) =>
        {
            Ok(format!("{name}: {}", value.trim()))
        }
        _ => Err(format!("{s:?}: expected 'Name: value'")),
    }
}

/// The weighted mix: which class each request is.
#[derive(Debug, Clone)]
pub struct Mix {
    pub classes: Vec<RequestSpec>,
    /// Running sums of the weights: class i is picked for r in cumulative[i-1]..cumulative[i].
    cumulative: Vec<u64>,
}

impl Mix {
    pub fn new(classes: Vec<RequestSpec>) -> Mix {
        assert!(!classes.is_empty(), "a mix needs at least one class");
        let mut sum = 0u64;
        let cumulative = classes
            .iter()
            .map(|c| {
                sum += u64::from(c.weight);
                sum
            })
            .collect();
        Mix {
            classes,
            cumulative,
        }
    }

    pub fn total_weight(&self) -> u64 {
        *self.cumulative.last().unwrap()
    }

    /// The class of the next request.
    #[inline]
    pub fn pick(&self, rng: &mut Rng) -> usize {
        if self.classes.len() == 1 {
            return 0;
        }
        let r = rng.below(self.total_weight());
        self.cumulative.partition_point(|&c| c <= r)
    }
}

/// xorshift64*: fast, and reproducible from its seed (each thread seeds with its index).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // SplitMix64 of the seed, so that seeds 0, 1, 2 start far apart (and never at 0).
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below 2^-32 for our weights).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_request_specs() {
        let r = RequestSpec::parse("99:GET /").unwrap();
        assert_eq!(
            (r.weight, r.method.as_str(), r.path.as_str()),
            (99, "GET", "/")
        );
        assert!(r.body.is_empty());
        let r = RequestSpec::parse("GET /work?us=5000").unwrap();
        assert_eq!((r.weight, r.name.as_str()), (1, "GET /work?us=5000"));
        let r = RequestSpec::parse("2:POST /echo hello there").unwrap();
        assert_eq!(r.body, b"hello there");
        for bad in ["0:GET /", "GET", "GET work", "1:", "", "G-T /", "GET /a\tb"] {
            assert!(RequestSpec::parse(bad).is_err(), "{bad:?} parsed");
        }
        assert!(RequestSpec::parse("1:POST /echo @/nonexistent/file").is_err());
        assert!(RequestSpec::parse("99999999999:GET /").is_err());
    }

    #[test]
    fn reads_a_body_from_a_file() {
        let path = std::env::temp_dir().join(format!("loadgen-body-{}", std::process::id()));
        std::fs::write(&path, b"{\"a\":1}").unwrap();
        let r = RequestSpec::parse(&format!("POST /echo @{}", path.display())).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(r.body, b"{\"a\":1}");
        let bytes = r.encode("h:1", &[], false);
        let text = String::from_utf8(bytes).unwrap();
        assert!(
            text.ends_with("Content-Length: 7\r\n\r\n{\"a\":1}"),
            "{text}"
        );
    }

    #[test]
    fn encodes_requests() {
        let r = RequestSpec::parse("GET /x?y=1").unwrap();
        let headers = vec![parse_header("X-Test:  yes ").unwrap()];
        assert_eq!(
            r.encode("127.0.0.1:8080", &headers, true),
            b"GET /x?y=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nX-Test: yes\r\nConnection: close\r\n\r\n"
        );
        assert!(parse_header("no colon").is_err() && parse_header(": v").is_err());
    }

    #[test]
    fn parses_urls() {
        let t = Target::parse("http://127.0.0.1:9/a?b").unwrap();
        assert_eq!(
            (t.addr.port(), t.host.as_str(), t.path.as_str()),
            (9, "127.0.0.1:9", "/a?b")
        );
        let t = Target::parse("http://[::1]:81").unwrap();
        assert_eq!((t.addr.port(), t.path.as_str()), (81, "/"));
        assert_eq!(Target::parse("http://127.0.0.1").unwrap().addr.port(), 80);
        assert!(Target::parse("https://127.0.0.1/").is_err());
        assert!(Target::parse("http:///").is_err());
    }

    /// 99:1 over a million picks lands within a tenth of a percent of 1%, and each class is
    /// picked in proportion to its weight.
    #[test]
    fn mix_weights() {
        let mix = Mix::new(vec![
            RequestSpec::parse("99:GET /").unwrap(),
            RequestSpec::parse("1:GET /work?us=5000").unwrap(),
        ]);
        let mut rng = Rng::new(0);
        let n = 1_000_000;
        let heavy = (0..n).filter(|_| mix.pick(&mut rng) == 1).count();
        assert!((9_000..=11_000).contains(&heavy), "{heavy} heavy of {n}");

        let mix = Mix::new(
            ["1:GET /a", "2:GET /b", "3:GET /c", "4:GET /d"]
                .iter()
                .map(|s| RequestSpec::parse(s).unwrap())
                .collect(),
        );
        let mut counts = [0u32; 4];
        for _ in 0..n {
            counts[mix.pick(&mut rng)] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            let expected = n as f64 * (i + 1) as f64 / 10.0;
            assert!(
                (c as f64 - expected).abs() < expected * 0.02,
                "class {i}: {c} picks, expected about {expected}"
            );
        }
        // One class: always it, without touching the generator.
        let one = Mix::new(vec![RequestSpec::parse("GET /").unwrap()]);
        assert!((0..100).all(|_| one.pick(&mut rng) == 0));
    }
}
