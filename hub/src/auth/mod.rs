//! Cluster tokens: who may connect to which realm.
//!
//! Devices present a JWT signed by the cloud (or by `pos-hub token mint`). The hub
//! verifies it offline against the realm's configured public keys ([`keys`]); the
//! algorithm always comes from the key, never from the token's header ([`token`]).
//! Every refusal has a stable code (`bad_signature`, `expired`, `wrong_realm`, ...)
//! that devices can act on.

pub mod keys;
pub mod token;

pub use keys::{KeyError, KeySet, SigningKey};
pub use token::{Claims, Policy, TokenError};
