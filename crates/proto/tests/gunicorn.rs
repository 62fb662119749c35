//! gunicorn's 137 request cases (tests/requests, MIT; `data/gunicorn-LICENSE`) as a table:
//! every case whole and one byte at a time, and our verdict compared with gunicorn's.
//!
//! Where this project decides differently, the case is listed in `POLICY` with the reason, and
//! the test asserts our own verdict for it, so a change in either direction is noticed.
//!
//! gunicorn does not require `Host` in HTTP/1.1 and 16 of its cases omit it; RFC 9112 3.2
//! says a server MUST answer 400, and we do (asserted below). To test the rest of each case,
//! the table adds `Host: x` to every HTTP/1.1 request that lacks one.

mod common;

use base64::Engine;
use common::run;
use proto::Limits;
use serde_json::Value;

/// Cases where our verdict differs from gunicorn's, with why.
const POLICY: &[(&str, &str)] = &[
    // Transfer codings: we decode chunked only and answer 501 for any other (RFC 9112 6.1: a
    // coding the server does not understand SHOULD get 501). RFC 9112 dropped `identity`;
    // gunicorn skips it (and gzip before chunked) and decodes the chunks anyway.
    (
        "valid/009.http",
        "Transfer-Encoding: identity is not a coding we implement: 501",
    ),
    (
        "valid/025.http",
        "gzip before chunked: we do not decode gzip bodies: 501",
    ),
    ("valid/025_line.http", "gzip before chunked: 501"),
    ("valid/029.http", "identity before chunked: 501"),
    ("valid/030.http", "identity before chunked: 501"),
    (
        "valid/rfc9112_smuggle_gzip_chunked_01.http",
        "gzip before chunked: 501",
    ),
    (
        "valid/rfc9112_smuggle_te_identity_chunked_01.http",
        "identity before chunked: 501",
    ),
    // RFC 3986 and RFC 9112 3.2: a request-target holds only the URI's characters; anything
    // else is percent-encoded by a client.
    (
        "valid/027.http",
        "raw UTF-8 bytes in the target are not URI characters: 400, never routed",
    ),
    // gunicorn options this project does not offer.
    (
        "valid/pp_01.http",
        "no PROXY protocol support: the PROXY line is a malformed request",
    ),
    ("valid/pp_02.http", "no PROXY protocol support"),
    ("valid/pp_04.http", "no PROXY protocol support"),
    ("valid/pp_05.http", "no PROXY protocol support"),
    (
        "valid/compat_obs_fold.http",
        "obs-fold is always rejected (RFC 9112 5.2 allows either)",
    ),
    (
        "valid/compat_obs_fold_huge.http",
        "obs-fold is always rejected",
    ),
    (
        "valid/028.http",
        "whitespace before the colon is always rejected (RFC 9112 5.1 says MUST)",
    ),
    (
        "invalid/019.http",
        "X-Forwarded-* headers are not interpreted, so not checked",
    ),
    (
        "invalid/040.http",
        "underscores are valid in header names (tchar); they are simply not Transfer-Encoding",
    ),
    (
        "invalid/chunked_07.http",
        "underscores are valid in header names; Transfer_Encoding is not Transfer-Encoding",
    ),
    // Limits: ours bound the whole head (--max-head) and the target (--max-target), not each
    // field or the field count (fixed at proto::MAX_HEADERS).
    ("invalid/010.http", "no per-field size limit"),
    (
        "invalid/011.http",
        "no configurable header-count limit below 100",
    ),
    ("invalid/012.http", "no per-field size limit"),
    (
        "invalid/017.http",
        "no per-field size limit; the whole head is within --max-head",
    ),
    (
        "invalid/limit_header_default_01.http",
        "no per-field size limit; the whole head is within --max-head",
    ),
    (
        "invalid/007.http",
        "no per-field size limit; the whole head is within --max-head",
    ),
    (
        "invalid/008.http",
        "no per-field size limit; the whole head is within --max-head",
    ),
    // Methods: to the parser any token is a method (RFC 9110 9.1); the application answers
    // 501 for one it does not implement.
    (
        "invalid/003c.http",
        "-bl is a token, so a method (the app answers 501)",
    ),
    // RFC 9110 8.6 lets a recipient accept a list of identical Content-Length values.
    (
        "invalid/rfc9112_smuggle_cl_list_form_01.http",
        "Content-Length: 5, 5 is one length",
    ),
    // The corpus' body is 8599 bytes against Content-Length: 17914: it never completes.
    (
        "valid/099.http",
        "truncated body: the request never completes, so it is never served",
    ),
    // Any header may repeat; only the app could object to two Content-Types.
    (
        "invalid/041.http",
        "a repeated Content-Type is not a framing error",
    ),
];

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Verdict {
    Ok,
    Error,
}

struct Case {
    id: String,
    raw: Vec<u8>,
    expect: Verdict,
    messages: Vec<Value>,
    settings: Value,
}

fn cases() -> Vec<Case> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/gunicorn-requests.json"
    );
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            id: c["id"]
                .as_str()
                .unwrap()
                .trim_start_matches("gunicorn:")
                .to_string(),
            raw: base64::engine::general_purpose::STANDARD
                .decode(c["raw_b64"].as_str().unwrap())
                .unwrap(),
            expect: if c["expect"] == "ok" {
                Verdict::Ok
            } else {
                Verdict::Error
            },
            messages: c["messages"].as_array().cloned().unwrap_or_default(),
            settings: c["gunicorn_settings"].clone(),
        })
        .collect()
}

/// gunicorn's request-line limit (4094) stands in for our target limit (a case's own setting
/// overrides it); the head limit is raised to let its large-header cases through, since our
/// head limit is not gunicorn's per-field limit (see POLICY).
fn limits(case: &Case) -> Limits {
    let line = case.settings["limit_request_line"].as_u64().unwrap_or(4094) as usize;
    Limits {
        max_target: line,
        max_head: 32 * 1024,
        ..Limits::default()
    }
}

/// Adds `Host: x` after the request line of each expected HTTP/1.1 message without one; for an
/// invalid case, after its first line if that ends in HTTP/1.1.
fn with_host(case: &Case) -> Vec<u8> {
    let has_host = |m: &Value| {
        m["headers_upper"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h[0] == "HOST")
    };
    let mut out = case.raw.clone();
    let mut from = 0;
    let lines: Vec<String> = if case.expect == Verdict::Ok {
        case.messages
            .iter()
            .filter(|m| m["version"] == "1.1" && !has_host(m))
            .map(|m| {
                format!(
                    "{} {} HTTP/1.1",
                    m["method"].as_str().unwrap(),
                    m["target"].as_str().unwrap()
                )
            })
            .collect()
    } else {
        let first = case.raw.split(|&b| b == b'\n').next().unwrap_or_default();
        let lower = String::from_utf8_lossy(&case.raw).to_ascii_lowercase();
        match first.strip_suffix(b"\r") {
            Some(l) if l.ends_with(b" HTTP/1.1") && !lower.contains("\nhost:") => {
                vec![String::from_utf8_lossy(l).into_owned()]
            }
            _ => vec![],
        }
    };
    for line in lines {
        let needle = format!("{line}\r\n").to_ascii_lowercase();
        let Some(at) = find(&out[from..].to_ascii_lowercase(), needle.as_bytes()) else {
            continue;
        };
        let insert = from + at + needle.len();
        out.splice(insert..insert, b"Host: x\r\n".iter().copied());
        from = insert + 9;
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Our verdict: `Ok` when every request expected came through with no error status, and the
/// parsed requests when so.
fn our_verdict(input: &[u8], limits: Limits, step: usize) -> (Verdict, common::Outcome) {
    let out = run(input, limits, step, true);
    let failed = out.statuses().iter().any(|&s| s != 200);
    (
        if failed || out.seen.is_empty() {
            Verdict::Error
        } else {
            Verdict::Ok
        },
        out,
    )
}

#[test]
fn gunicorn_table() {
    let cases = cases();
    assert_eq!(cases.len(), 137);
    let mut mismatches = Vec::new();
    for case in &cases {
        let input = with_host(case);
        let limits = limits(case);
        let (whole, out) = our_verdict(&input, limits, 0);
        let (bytewise, out1) = our_verdict(&input, limits, 1);
        assert_eq!(
            whole, bytewise,
            "{}: whole and byte-by-byte differ",
            case.id
        );
        assert_eq!(
            out.seen, out1.seen,
            "{}: whole and byte-by-byte parse differently",
            case.id
        );

        let policy = POLICY.iter().find(|(id, _)| *id == case.id);
        let expected = match policy {
            Some(_) if case.expect == Verdict::Ok => Verdict::Error,
            Some(_) => Verdict::Ok,
            None => case.expect,
        };
        if whole != expected {
            mismatches.push(format!(
                "{}: gunicorn {:?}, policy {:?}, we {:?}",
                case.id,
                case.expect,
                policy.map(|p| p.1),
                whole
            ));
            continue;
        }
        if whole == Verdict::Ok
            && case.expect == Verdict::Ok
            && let Err(e) = check_messages(case, &out)
        {
            mismatches.push(format!("{}: {e}", case.id));
        }
    }
    assert!(
        mismatches.is_empty(),
        "verdicts differ:\n{}",
        mismatches.join("\n")
    );
}

/// Method, target, body and headers as gunicorn parsed them (less the Host we added).
fn check_messages(case: &Case, out: &common::Outcome) -> Result<(), String> {
    if out.seen.len() != case.messages.len() {
        return Err(format!(
            "{} requests, expected {}",
            out.seen.len(),
            case.messages.len()
        ));
    }
    for (seen, want) in out.seen.iter().zip(&case.messages) {
        // The corpus keeps some bodies with their escapes written out (`\r\n`).
        let body = want["body"].as_str().unwrap();
        let unescaped = body.replace("\\r", "\r").replace("\\n", "\n");
        let target = latin1(seen.target.as_bytes());
        // Methods are case-sensitive (RFC 9110 9.1); gunicorn can upper-case them on request.
        let method = match case.settings["casefold_http_method"] == true {
            true => seen.method.to_ascii_uppercase(),
            false => seen.method.clone(),
        };
        let ours = (method.as_str(), target.as_str());
        let theirs = (
            want["method"].as_str().unwrap(),
            want["target"].as_str().unwrap(),
        );
        if ours != theirs || (seen.body != body.as_bytes() && seen.body != unescaped.as_bytes()) {
            return Err(format!(
                "parsed {ours:?} body {:?}, expected {theirs:?} body {body:?}",
                String::from_utf8_lossy(&seen.body)
            ));
        }
        // gunicorn drops header names with underscores unless told otherwise; we keep them
        // (they are tokens), so leave them out of the comparison when gunicorn did.
        let underscores = case.settings["header_map"] == "dangerous";
        let ours: Vec<(String, String)> = seen
            .headers
            .iter()
            .filter(|(n, v)| !(n == "Host" && v == b"x") && (underscores || !n.contains('_')))
            .map(|(n, v)| (n.to_ascii_uppercase(), latin1(v)))
            .collect();
        let theirs: Vec<(String, String)> = want["headers_upper"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                (
                    h[0].as_str().unwrap().to_string(),
                    h[1].as_str().unwrap().to_string(),
                )
            })
            .collect();
        if ours != theirs {
            return Err(format!("headers {ours:?}, expected {theirs:?}"));
        }
    }
    Ok(())
}

/// gunicorn decodes bytes as Latin-1; so does the comparison.
fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| b as char).collect()
}

/// The Host rule itself: gunicorn's HTTP/1.1 cases without Host are 400 for us, as-is.
#[test]
fn http11_without_host_is_400() {
    let mut checked = 0;
    for case in cases()
        .iter()
        .filter(|c| c.expect == Verdict::Ok && !POLICY.iter().any(|(id, _)| *id == c.id))
    {
        let first = &case.messages[0];
        let lacks = first["version"] == "1.1"
            && !first["headers_upper"]
                .as_array()
                .unwrap()
                .iter()
                .any(|h| h[0] == "HOST");
        if lacks {
            let out = run(&case.raw, limits(case), 0, true);
            assert_eq!(out.statuses().last(), Some(&400), "{}", case.id);
            checked += 1;
        }
    }
    assert_eq!(checked, 16, "cases checked for the Host rule");
}
