//! TLS on the LAN: the store CA the hub issues for itself ([`ca`]) and the one
//! port that serves HTTPS/WSS and, for `/healthz` and `/ca.crt` only, plain HTTP
//! ([`server`]).

pub mod ca;
pub mod server;

pub use ca::{CaError, LeafNames, StoreCa};
