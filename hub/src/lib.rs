//! pos-hub: store firmware for point-of-sale systems.
//!
//! The crate is split by concern; lower layers never import upper ones (the layers are a
//! table in the README's "Design notes", checked by `hub/tests/layers.rs`):
//!
//! * [`allocs`]   counts heap allocations (for /metrics and the benchmark)
//! * [`config`]   settings from env / `.env` / realms file, validated at start
//! * [`log`]      the durable event log (SQLite) and its single writer per realm
//! * [`auth`]     cluster tokens (JWT) verified offline against configured keys
//! * [`conn`]     a TCP connection the hub can cut (reset) whatever layers sit on it
//! * [`link`]     one device connection: Socket.IO packets, its queue, overflow = cut
//! * [`realm`]    the registry of realms: log writer, live devices, fan-out
//! * [`realtime`] the Socket.IO handshake and messages: connect, event/events, sync
//! * [`http`]     axum routes: /healthz, /status, /ca.crt
//! * [`tls`]      the store CA, leaf certificates, TLS and plain HTTP on one port
//! * [`serve`]    wires everything together; graceful shutdown
//! * [`init`]     PID 1 duties when the hub boots the appliance
//! * [`system`]   the box as the hub sees it under init: slot, read-only root, reboot
//! * [`provision`] flashing a card, claiming an unclaimed box on first boot
//! * [`update`]   OTA A/B updates: signed bundles, trial boot, commit, rollback, channels
//! * [`metrics`]  process-wide counters and histograms (a leaf: anyone may call it)
//! * [`ops`]      the operator's view: log lines and files, charts' history, support bundle
//! * [`cli`]      subcommands, each a short function calling the owning module

pub mod allocs;
pub mod auth;
pub mod bridge;
pub mod cli;
pub mod clock;
pub mod config;
pub mod conn;
pub mod discovery;
pub mod http;
pub mod init;
pub mod link;
pub mod log;
pub mod metrics;
pub mod ops;
pub mod power;
pub mod provision;
pub mod realm;
pub mod realtime;
pub mod serve;
pub mod system;
pub mod tls;
pub mod update;
pub mod util;

/// The hub's version, as reported by `/status` and `pos-hub --version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
