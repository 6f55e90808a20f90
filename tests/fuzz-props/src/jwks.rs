//! JWKS documents (`CLUSTER_JWKS_FILE`, a realm's `jwksFile`): an accepted set is
//! not empty, every key has a public-key algorithm, and an OKP key is Ed25519.

use jsonwebtoken::Algorithm;
use pos_hub::auth::KeySet;

use crate::util::text;

pub fn run(data: &[u8]) {
    let Some(s) = text(data) else { return };
    match KeySet::from_jwks(s) {
        Ok(set) => {
            assert!(!set.keys().is_empty());
            let v: serde_json::Value = serde_json::from_str(s).expect("accepted JWKS is JSON");
            let docs = v["keys"].as_array().expect("keys array");
            assert_eq!(docs.len(), set.keys().len());
            for (k, doc) in set.keys().iter().zip(docs) {
                assert!(matches!(
                    k.alg,
                    Algorithm::EdDSA | Algorithm::ES256 | Algorithm::RS256
                ));
                assert_eq!(k.kid.as_deref(), doc["kid"].as_str());
                if doc["kty"] == "OKP" {
                    assert_eq!(
                        doc["crv"], "Ed25519",
                        "an OKP key on {} accepted as EdDSA",
                        doc["crv"]
                    );
                }
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}
