//! Error replies as `application/problem+json` (RFC 9457): a status, a title, and a sentence
//! saying what happened.

use proto::{Response, reason};

pub fn problem(status: u16, detail: impl AsRef<str>) -> Response {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": reason(status),
        "status": status,
        "detail": detail.as_ref(),
    });
    let mut bytes = body.to_string().into_bytes();
    bytes.push(b'\n');
    Response::owned(status, "application/problem+json", bytes)
        .with_header("Cache-Control", "no-store")
}

/// A JSON reply that must not be cached (state that changes).
pub fn json(status: u16, value: &serde_json::Value) -> Response {
    let mut bytes = value.to_string().into_bytes();
    bytes.push(b'\n');
    Response::owned(status, "application/json", bytes).with_header("Cache-Control", "no-store")
}
