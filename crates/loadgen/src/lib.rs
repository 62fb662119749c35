//! The load generator's parts, as a library so tests (and `loadgen report`) can use them:
//! what to send ([`spec`]), reading replies ([`http`]), the load threads ([`engine`]),
//! counting ([`stats`]) and the charts and tables of a comparison ([`report`]); and for
//! `--subscribe`/`--long-poll`, the subscriber threads and the publisher ([`subscribe`]),
//! event streams ([`sse`]), the messages' JSON ([`messages`]) and their counting
//! ([`delivery`]).

pub mod delivery;
pub mod engine;
pub mod http;
pub mod messages;
pub mod report;
pub mod spec;
pub mod sse;
pub mod stats;
pub mod subscribe;
