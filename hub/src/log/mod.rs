//! The durable event log of one realm: an append-only SQLite table in WAL mode with
//! `synchronous=FULL`, written by exactly one thread ([`writer`]) that groups many
//! devices' events into one transaction and answers each only after the commit.
//! [`store`] owns the schema and every query; [`event`] the event's shape, its
//! validation and its one JSON encoding (used for fan-out, replay and `sync`).

pub mod event;
pub mod store;
pub mod writer;

pub use event::{EventError, NewEvent, Origin};
pub use store::{LogError, Store};
pub use writer::{Appended, Committed, Outcome, Reply, WriteReq, Writer};
