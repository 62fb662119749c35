//! The load generator's parts, as a library so tests (and `loadgen report`) can use them:
//! what to send ([`spec`]), reading replies ([`http`]), the load threads ([`engine`]),
//! counting ([`stats`]) and the charts and tables of a comparison ([`report`]).

pub mod engine;
pub mod http;
pub mod report;
pub mod spec;
pub mod stats;
