//! ringway: an edge WebSocket gateway for Linux. One shard per core (monoio, io_uring
//! with an epoll fallback), each with its own listener, connections and topic table;
//! topic messages are framed once and the same bytes are written to every subscriber.
//!
//! Rooms: `cli` (commands), `config`, `shard` (threads, runtime, node), `ws` (upgrade,
//! frames, connection task), `protocol` (wire protocol v1), `registry` (topic table),
//! `broker` (in-process fan-out across shards), `admin` (HTTP API, metrics), `metrics`
//! (per-shard counters), `notify` (systemd), `doctor` (host checks), `tls` (`wss://`), `sys` (the
//! only `unsafe`).

pub mod admin;
pub mod auth;
pub mod backplane;
pub mod broker;
pub mod cli;
pub mod close;
pub mod config;
pub mod doctor;
pub mod jwks;
pub mod limits;
pub mod metrics;
pub mod notify;
pub mod permissions;
pub mod protocol;
pub mod registry;
pub mod shard;
pub mod sys;
pub mod tls;
pub mod ws;
