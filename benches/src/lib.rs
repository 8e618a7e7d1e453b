//! imflow's load generator.
//!
//! It speaks PROTOCOL.md over real WebSocket and REST, sends on an open-loop
//! schedule (message `i` is due at `t0 + i / rate`, whatever the server is
//! doing, so a slow server cannot hide its latency), and measures for every
//! delivery the time from the scheduled send to the receipt on the
//! recipient's socket. It counts acks, deliveries, duplicates and losses.

pub mod conn;
pub mod procstat;
pub mod relay;
pub mod report;
pub mod scenario;
pub mod setup;
pub mod track;
pub mod webhook;
