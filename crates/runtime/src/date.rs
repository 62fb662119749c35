//! The headers every reply carries, with `Date` re-formatted at most once a second.

use std::time::{SystemTime, UNIX_EPOCH};

use proto::{CommonHeaders, http_date};

pub struct ReplyHeaders {
    common: CommonHeaders,
    secs: u64,
}

impl ReplyHeaders {
    pub fn new(server: &'static str) -> ReplyHeaders {
        let mut h = ReplyHeaders {
            common: CommonHeaders {
                server,
                date: http_date(0),
            },
            secs: 0,
        };
        h.refresh();
        h
    }

    /// Reads the wall clock (a vDSO call, no syscall) and re-formats the date if a second passed.
    pub fn refresh(&mut self) -> &CommonHeaders {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if secs != self.secs {
            self.secs = secs;
            self.common.date = http_date(secs);
        }
        &self.common
    }

    pub fn get(&self) -> &CommonHeaders {
        &self.common
    }
}
