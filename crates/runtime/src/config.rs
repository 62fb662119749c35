//! What every driver takes from the flags: the connection policy (limits and timeouts, decided in
//! `proto`), the server's name, its connection bound and its shutdown deadline.

use std::sync::Arc;
use std::time::Duration;

use crate::ServerArgs;

#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The `Server` header and the prefix of log lines.
    pub server_name: &'static str,
    /// Limits and timeouts of every connection, shared by all of them.
    pub conn: Arc<proto::Config>,
    /// On SIGTERM/SIGINT, how long in-flight requests may take before the process exits anyway.
    pub shutdown_timeout: Duration,
    /// Open connections at most (per driver instance: a pattern divides it among its loops).
    pub max_conns: usize,
}

impl ServeConfig {
    pub fn new(server_name: &'static str, args: &ServerArgs) -> ServeConfig {
        ServeConfig {
            server_name,
            conn: Arc::new(proto::Config {
                limits: args.limits(),
                timeouts: args.timeouts(),
                stream_body: app::streams_body,
                trace: args
                    .trace
                    .then_some(crate::trace::print as fn(&proto::Trace)),
            }),
            shutdown_timeout: args.shutdown_timeout,
            max_conns: args.max_conns,
        }
    }

    pub fn timeouts(&self) -> &proto::Timeouts {
        &self.conn.timeouts
    }

    /// How often a loop that sweeps its connections' deadlines (rather than keeping a timer
    /// per connection) looks: a few times per shortest timeout, at most once a second, so a
    /// deadline is seen up to one sweep late, for no per-request timer upkeep.
    pub fn sweep_every(&self) -> Duration {
        let t = self.timeouts();
        let shortest = [t.header, t.body, t.idle, t.send, t.shutdown_grace, t.linger]
            .into_iter()
            .min()
            .unwrap_or(Duration::from_secs(1));
        (shortest / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }
}
