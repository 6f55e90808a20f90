//! Claim on first boot. A box flashed without a realm starts unclaimed: it accepts no
//! events, and serves a setup page at `/setup` where an admin pastes a claim token
//! issued by the cloud: a JWT with `role: "claim"`, `tenantId` and `storeId`, signed
//! with the tenant's cluster key, whose public half is built into the tenant's image
//! (`/etc/pos-hub/claim-key.pem`) or given at flashing (`CLAIM_PUBLIC_KEY_BASE64`).
//! The box verifies it offline, writes the realm to `<data>/claimed.env` (the settings
//! partition stays read-only), and restarts itself as that store's hub. Optional
//! claims carried along: `cloudBridgeUrl`, `cloudBridgeToken`, `updateChannel`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use base64::Engine as _;

use crate::auth::token::{self, Policy};
pub use crate::config::{claim_key, ClaimKey};
use crate::config::{ConfigError, Settings};

pub fn claimed_env(data_dir: &Path) -> PathBuf {
    data_dir.join("claimed.env")
}

/// Adds the settings saved by a claim, for keys the settings file does not set.
pub fn merge_claimed(settings: &mut Settings, data_dir: &Path) -> Result<bool, ConfigError> {
    let p = claimed_env(data_dir);
    let Ok(text) = std::fs::read_to_string(&p) else {
        return Ok(false);
    };
    let map = crate::config::parse_env_file(&text).map_err(|(line, m)| {
        crate::config::err("claimed.env", format!("{} line {line}: {m}", p.display()))
    })?;
    for (k, v) in map {
        if settings.get(&k).is_none() {
            settings.set(&k, &v);
        }
    }
    Ok(true)
}

/// What a verified claim token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub tenant_id: String,
    pub store_id: String,
    pub extra: Vec<(String, String)>,
}

/// Verifies a claim token offline: signature, `role: "claim"`, not expired.
pub fn verify(key: &ClaimKey, t: &str, now: i64) -> Result<Claim, String> {
    let v = token::verify(&key.keys, t.trim(), now, &Policy::default())
        .map_err(|e| format!("{} ({})", e, e.code()))?;
    if let Some(by) = v.expired_by {
        return Err(format!(
            "the claim token expired {by} s ago: ask the cloud for a new one"
        ));
    }
    if v.claims.role != "claim" {
        return Err(format!(
            "this is a {} token, not a claim token (role must be \"claim\")",
            v.claims.role
        ));
    }
    // They name directories under the data dir and lines of claimed.env.
    for (claim, id) in [
        ("tenantId", &v.claims.tenant_id),
        ("storeId", &v.claims.store_id),
    ] {
        if !crate::config::valid_realm_part(id) {
            return Err(format!(
                "claim {claim} {id:?} must be 1-64 chars of A-Z a-z 0-9 . _ -"
            ));
        }
    }
    // The signature checked out: read the optional claims from the payload.
    let payload = t.trim().split('.').nth(1).unwrap_or("");
    let json: serde_json::Value = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut extra = Vec::new();
    for (claim, key) in [
        ("cloudBridgeUrl", "CLOUD_BRIDGE_URL"),
        ("cloudBridgeToken", "CLOUD_BRIDGE_TOKEN"),
        ("updateChannel", "UPDATE_CHANNEL"),
    ] {
        if let Some(s) = json.get(claim).and_then(|v| v.as_str()) {
            if s.contains(['\n', '\r']) {
                return Err(format!("claim {claim} contains a line break"));
            }
            extra.push((key.to_string(), s.to_string()));
        }
    }
    Ok(Claim {
        tenant_id: v.claims.tenant_id,
        store_id: v.claims.store_id,
        extra,
    })
}

/// Writes `<data>/claimed.env` atomically.
pub fn save(data_dir: &Path, key: &ClaimKey, c: &Claim) -> Result<(), String> {
    let text = claimed_env_text(&key.b64, c);
    crate::util::write_atomic(&claimed_env(data_dir), text.as_bytes(), 0o600)
        .map_err(|e| e.to_string())
}

/// The text of `claimed.env` for a claim (read back by [`merge_claimed`]).
#[doc(hidden)]
pub fn claimed_env_text(key_b64: &str, c: &Claim) -> String {
    let mut text = format!(
        "# Written by the claim on first boot ({}). Delete with a factory reset.\nTENANT_ID={}\nSTORE_ID={}\nCLUSTER_PUBLIC_KEY_BASE64={}\nDEV=off\n",
        httpdate::fmt_http_date(std::time::SystemTime::now()),
        c.tenant_id,
        c.store_id,
        key_b64
    );
    // Quoted, so a value reads back as it was (spaces, ` #`, quotes at its ends).
    for (k, v) in &c.extra {
        text.push_str(&format!("{k}=\"{v}\"\n"));
    }
    text
}

/// Replaces this process with a fresh `pos-hub` (same arguments) that reads the claim.
pub fn restart_self() {
    use std::os::unix::process::CommandExt;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let exe = std::fs::read_link("/proc/self/exe").unwrap_or_else(|_| PathBuf::from("/init"));
    let err = std::process::Command::new(exe).args(args).exec();
    tracing::error!(error = %err, "cannot restart after the claim; exiting so that init restarts the hub");
    std::process::exit(0);
}

pub struct SetupState {
    pub key: ClaimKey,
    pub data_dir: PathBuf,
    pub clock: Arc<crate::clock::Clock>,
    pub claimed: std::sync::atomic::AtomicBool,
}

pub fn router(state: Arc<SetupState>) -> Router {
    Router::new()
        .route("/setup", axum::routing::get(page))
        .route("/setup/claim", axum::routing::post(claim))
        .with_state(state)
}

async fn page() -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        SETUP_HTML,
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct ClaimBody {
    token: String,
}

async fn claim(
    State(st): State<Arc<SetupState>>,
    body: Result<Json<ClaimBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(body)) = body else {
        return (StatusCode::BAD_REQUEST, Json(serde_json::json!({"ok": false, "error": "send JSON {\"token\": \"<claim token>\"}"}))).into_response();
    };
    if st.claimed.load(std::sync::atomic::Ordering::SeqCst) {
        return (
            StatusCode::CONFLICT,
            Json(serde_json::json!({"ok": false, "error": "this box is already claimed"})),
        )
            .into_response();
    }
    let c = match verify(&st.key, &body.token, st.clock.now_secs()) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "claim refused");
            return (
                StatusCode::FORBIDDEN,
                Json(serde_json::json!({"ok": false, "error": e})),
            )
                .into_response();
        }
    };
    if let Err(e) = save(&st.data_dir, &st.key, &c) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({"ok": false, "error": format!("cannot save the claim: {e}")})),
        )
            .into_response();
    }
    st.claimed.store(true, std::sync::atomic::Ordering::SeqCst);
    tracing::warn!(tenant = %c.tenant_id, store = %c.store_id, "box claimed: restarting as this store's hub");
    eprintln!(
        "pos-hub: claimed for {}:{}; restarting",
        c.tenant_id, c.store_id
    );
    std::thread::spawn(|| {
        std::thread::sleep(std::time::Duration::from_millis(500));
        restart_self();
    });
    Json(serde_json::json!({"ok": true, "tenantId": c.tenant_id, "storeId": c.store_id}))
        .into_response()
}

const SETUP_HTML: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>pos-hub setup</title>
<style>
body{font:16px/1.5 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1c1e21}
main{max-width:34rem;margin:2rem auto;padding:1.5rem;background:#fff;border-radius:12px;box-shadow:0 1px 4px #0002}
h1{font-size:1.4rem;margin-top:0}textarea{width:100%;min-height:8rem;font:13px monospace;box-sizing:border-box}
button{font-size:1rem;padding:.6rem 1.2rem;border:0;border-radius:8px;background:#0b6bcb;color:#fff;margin-top:.8rem}
#msg{margin-top:1rem;font-weight:600}.ok{color:#137333}.err{color:#b3261e}
</style></head><body><main>
<h1>Set up this pos-hub</h1>
<p>This box is not claimed yet: it accepts no events. Paste the claim token for this store
(from the back office) and press <b>Claim</b>. It is checked here, offline.</p>
<form id="f"><label for="t">Claim token</label><textarea id="t" name="token" required></textarea>
<button type="submit" id="go">Claim</button></form><div id="msg" role="status"></div>
</main><script>
document.getElementById('f').addEventListener('submit', async (e) => {
  e.preventDefault();
  const m = document.getElementById('msg');
  m.className = ''; m.textContent = 'Checking…';
  try {
    const r = await fetch('/setup/claim', {method: 'POST', headers: {'content-type': 'application/json'},
      body: JSON.stringify({token: document.getElementById('t').value.trim()})});
    const j = await r.json();
    if (j.ok) { m.className = 'ok'; m.textContent = 'Claimed for ' + j.tenantId + ':' + j.storeId + '. The hub restarts; the status page opens in a few seconds.';
      setTimeout(() => { location.href = '/'; }, 4000); }
    else { m.className = 'err'; m.textContent = 'Refused: ' + j.error; }
  } catch (err) { m.className = 'err'; m.textContent = 'No answer from the hub: ' + err; }
});
</script></body></html>
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::keys::{generate_ed25519, SigningKey};
    use crate::auth::token::{mint, Claims};

    fn key() -> (SigningKey, ClaimKey) {
        let (private, public) = generate_ed25519().unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(public.as_bytes());
        let keys = crate::config::keys_from_base64("K", &b64).unwrap();
        (
            SigningKey::from_pem(&private).unwrap(),
            ClaimKey { keys, b64 },
        )
    }

    fn claims(role: &str, exp: i64) -> Claims {
        Claims {
            tenant_id: "t-abc".into(),
            store_id: "s-001".into(),
            device_id: "setup".into(),
            role: role.into(),
            exp,
            iat: 0,
            nbf: None,
            iss: None,
            aud: None,
        }
    }

    #[test]
    fn verifies_claims_and_refuses_others() {
        let (sk, ck) = key();
        let now = 1_800_000_000;
        let good = mint(&sk, &claims("claim", now + 600), None).unwrap();
        let c = verify(&ck, &good, now).unwrap();
        assert_eq!(
            (c.tenant_id.as_str(), c.store_id.as_str()),
            ("t-abc", "s-001")
        );
        let till = mint(&sk, &claims("till", now + 600), None).unwrap();
        assert!(verify(&ck, &till, now)
            .unwrap_err()
            .contains("not a claim token"));
        let expired = mint(&sk, &claims("claim", now - 600), None).unwrap();
        assert!(verify(&ck, &expired, now).unwrap_err().contains("expired"));
        let (other, _) = key();
        let forged = mint(&other, &claims("claim", now + 600), None).unwrap();
        assert!(verify(&ck, &forged, now).is_err());
        // Saved and merged back.
        let d = tempfile::tempdir().unwrap();
        save(d.path(), &ck, &c).unwrap();
        let mut s = Settings::default();
        assert!(merge_claimed(&mut s, d.path()).unwrap());
        assert_eq!(s.get("TENANT_ID"), Some("t-abc"));
        assert_eq!(s.get("CLUSTER_PUBLIC_KEY_BASE64"), Some(ck.b64.as_str()));
    }

    /// Found by fuzz/ (claim): a claim's realm ids were not checked (a line break in
    /// one became another line of claimed.env), and optional claims were written
    /// unquoted, so `tok #x` came back as `tok` and `"x"` as `x`.
    #[test]
    fn claimed_env_reads_back_exactly() {
        let (sk, ck) = key();
        let now = 1_800_000_000;
        let mut bad = claims("claim", now + 600);
        bad.tenant_id = "t-abc\nDEV=on".into();
        let t = mint(&sk, &bad, None).unwrap();
        assert!(verify(&ck, &t, now).unwrap_err().contains("tenantId"));
        let c = Claim {
            tenant_id: "t-abc".into(),
            store_id: "s-001".into(),
            extra: vec![
                ("CLOUD_BRIDGE_TOKEN".into(), "tok #x".into()),
                ("UPDATE_CHANNEL".into(), "\"canary\"".into()),
                ("CLOUD_BRIDGE_URL".into(), " https://a.example/v1 ".into()),
            ],
        };
        let map = crate::config::parse_env_file(&claimed_env_text(&ck.b64, &c)).unwrap();
        for (k, v) in &c.extra {
            assert_eq!(map.get(k), Some(v), "{k}");
        }
    }
}
