//! Public keys in PEM (`CLUSTER_PUBLIC_KEY_BASE64`, `publicKeyPem`, claim keys): an
//! accepted key has one of the three algorithms; a refusal is one of the key errors
//! with a message.

use jsonwebtoken::Algorithm;
use pos_hub::auth::keys::{KeyError, VerifyKey};

use crate::util::text;

pub fn run(data: &[u8]) {
    let Some(s) = text(data) else { return };
    match VerifyKey::from_pem(s, None) {
        Ok(k) => {
            assert!(matches!(
                k.alg,
                Algorithm::EdDSA | Algorithm::ES256 | Algorithm::RS256
            ));
            assert!(!s.contains("PRIVATE KEY-----") || s.contains("PUBLIC KEY-----"));
        }
        Err(e) => {
            assert!(matches!(
                e,
                KeyError::NotPem(_) | KeyError::Unsupported(_) | KeyError::Invalid(_)
            ));
            assert!(!e.to_string().is_empty());
        }
    }
}
