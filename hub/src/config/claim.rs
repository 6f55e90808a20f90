//! The claim key of an unclaimed box: `CLAIM_PUBLIC_KEY_BASE64`, or the key built into
//! a tenant's image (`/etc/pos-hub/claim-key.pem`). Claiming itself (the setup page,
//! verifying and saving a claim) is `crate::provision::claim`'s.

use std::sync::Arc;

use base64::Engine as _;

use super::{ConfigError, Settings};
use crate::auth::keys::KeySet;

/// The key that verifies claim tokens.
#[derive(Clone)]
pub struct ClaimKey {
    pub keys: Arc<KeySet>,
    /// Base64 of its PEM (it becomes the realm's CLUSTER_PUBLIC_KEY_BASE64).
    pub b64: String,
}

/// The claim key from CLAIM_PUBLIC_KEY_BASE64, or the one built into the image.
pub fn claim_key(s: &Settings) -> Result<Option<ClaimKey>, ConfigError> {
    let b64 = match s
        .get("CLAIM_PUBLIC_KEY_BASE64")
        .map(str::trim)
        .filter(|v| !v.is_empty())
    {
        Some(v) => v.to_string(),
        None => match std::fs::read("/etc/pos-hub/claim-key.pem") {
            Ok(pem) => base64::engine::general_purpose::STANDARD.encode(pem),
            Err(_) => return Ok(None),
        },
    };
    let keys = super::keys_from_base64("CLAIM_PUBLIC_KEY_BASE64", &b64)?;
    Ok(Some(ClaimKey { keys, b64 }))
}

impl std::fmt::Debug for ClaimKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClaimKey(..)")
    }
}
