//! The servers' messages as JSON, read without building a tree: one message
//! `{"seq": N, "ts_ms": T, "body": "..."}` (an SSE event's data), and a long poll's reply
//! `{"head": H, "messages": [...]}`, whose messages are handed out one by one as they are
//! parsed. A body without escapes is borrowed from the input, so a message costs no allocation.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// One message; other fields (`ts_ms`) are skipped.
#[derive(Debug, Deserialize)]
pub struct Message<'a> {
    pub seq: u64,
    #[serde(borrow)]
    pub body: Cow<'a, str>,
}

pub fn message(json: &[u8]) -> Result<Message<'_>, serde_json::Error> {
    serde_json::from_slice(json)
}

/// What a long poll's reply says besides its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Poll {
    /// The journal's head when the reply was made.
    pub head: u64,
    /// Messages in the reply, and the seq of the last one.
    pub count: usize,
    pub last: Option<u64>,
}

/// Parses a long poll's reply, calling `each(seq, body)` for each message in order.
pub fn poll(json: &[u8], mut each: impl FnMut(u64, &str)) -> Result<Poll, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let poll = PollSeed(&mut each).deserialize(&mut de)?;
    de.end()?;
    Ok(poll)
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum Key {
    Head,
    Messages,
    #[serde(other)]
    Other,
}

struct PollSeed<'f, F>(&'f mut F);

impl<'de, F: FnMut(u64, &str)> DeserializeSeed<'de> for PollSeed<'_, F> {
    type Value = Poll;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Poll, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, F: FnMut(u64, &str)> Visitor<'de> for PollSeed<'_, F> {
    type Value = Poll;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object with head and messages")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Poll, A::Error> {
        let mut head = None;
        let mut listed = None;
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Head => head = Some(map.next_value::<u64>()?),
                Key::Messages => listed = Some(map.next_value_seed(MessagesSeed(&mut *self.0))?),
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let head = head.ok_or_else(|| de::Error::missing_field("head"))?;
        let (count, last) = listed.ok_or_else(|| de::Error::missing_field("messages"))?;
        Ok(Poll { head, count, last })
    }
}

struct MessagesSeed<'f, F>(&'f mut F);

impl<'de, F: FnMut(u64, &str)> DeserializeSeed<'de> for MessagesSeed<'_, F> {
    type Value = (usize, Option<u64>);
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, F: FnMut(u64, &str)> Visitor<'de> for MessagesSeed<'_, F> {
    type Value = (usize, Option<u64>);

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of messages")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let (mut count, mut last) = (0, None);
        while let Some(m) = seq.next_element::<Message<'de>>()? {
            (self.0)(m.seq, &m.body);
            count += 1;
            last = Some(m.seq);
        }
        Ok((count, last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_message() {
        let m = message(br#"{"body":"lg-1-2","seq":7,"ts_ms":1}"#).unwrap();
        assert_eq!((m.seq, &*m.body), (7, "lg-1-2"));
        assert!(
            matches!(m.body, Cow::Borrowed(_)),
            "no allocation without escapes"
        );
        let m = message(br#"{"seq":8,"body":"a \"quoted\" \u00e9"}"#).unwrap();
        assert_eq!(&*m.body, "a \"quoted\" é");
        assert!(message(br#"{"seq":"x","body":""}"#).is_err());
        assert!(message(br#"{"body":"no seq"}"#).is_err());
        assert!(message(b"{").is_err());
    }

    #[test]
    fn a_long_poll_reply() {
        let json = br#"{"head":12,"messages":[{"seq":10,"ts_ms":5,"body":"a"},{"body":"b","seq":11}],"x":[1,{"y":2}]}"#;
        let mut got = Vec::new();
        let p = poll(json, |seq, body| got.push((seq, body.to_string()))).unwrap();
        assert_eq!(
            p,
            Poll {
                head: 12,
                count: 2,
                last: Some(11)
            }
        );
        assert_eq!(got, [(10, "a".to_string()), (11, "b".to_string())]);
        // Key order does not matter; an empty list.
        let p = poll(br#"{"messages":[],"head":3}"#, |_, _| panic!("no message")).unwrap();
        assert_eq!((p.head, p.count, p.last), (3, 0, None));
        for bad in [
            &br#"{"messages":[]}"#[..],
            br#"{"head":1}"#,
            br#"{"head":1,"messages":[{"seq":1}]}"#,
            br#"{"head":1,"messages":[]} trailing"#,
            b"[]",
        ] {
            assert!(
                poll(bad, |_, _| {}).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
