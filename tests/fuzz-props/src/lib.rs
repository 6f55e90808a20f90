//! Fuzz targets of pos-hub: one module per parser of outside input. Each `run`
//! feeds the parser the bytes libFuzzer made and checks properties of the answer
//! (a parse that succeeds round-trips or re-validates; a refusal has a stable
//! code), panicking when one does not hold.

pub mod auth;
pub mod autoboot;
pub mod bundle;
pub mod channel;
pub mod claim;
pub mod dhcp;
pub mod env;
pub mod event;
pub mod events;
pub mod ext4;
pub mod fat;
pub mod feed;
pub mod ingest;
pub mod jwks;
pub mod mbr;
pub mod nut;
pub mod pem;
pub mod power_supply;
pub mod realms;
pub mod sio;
pub mod sntp;
pub mod sync;
pub mod token;
pub mod util;

/// Removes the scratch directories the `power_supply` and `realms` targets made in
/// this process (under /dev/shm, which is memory: the seed replay calls this at its end).
pub fn remove_scratch() {
    power_supply::remove_scratch();
    realms::remove_scratch();
}

/// One target: feeds the bytes to its parser and panics when a property fails.
pub type Target = fn(&[u8]);

/// Every target by name.
pub const TARGETS: &[(&str, Target)] = &[
    ("sio", sio::run),
    ("event", event::run),
    ("events", events::run),
    ("sync", sync::run),
    ("auth", auth::run),
    ("token", token::run),
    ("pem", pem::run),
    ("jwks", jwks::run),
    ("realms", realms::run),
    ("env", env::run),
    ("feed", feed::run),
    ("ingest", ingest::run),
    ("channel", channel::run),
    ("bundle", bundle::run),
    ("autoboot", autoboot::run),
    ("fat", fat::run),
    ("mbr", mbr::run),
    ("ext4", ext4::run),
    ("dhcp", dhcp::run),
    ("sntp", sntp::run),
    ("nut", nut::run),
    ("power_supply", power_supply::run),
    ("claim", claim::run),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}
