//! `pos-hub logs` and `pos-hub support-bundle`: clients of the admin API, for a tech
//! at a laptop on the store's LAN (or DevOps through a tunnel).

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

/// How to reach a hub's admin API (shared by both commands).
#[derive(Args, Clone)]
pub struct HubArgs {
    /// The hub's address (https://<box>:4001; http:// for a hub run with TLS=off).
    #[arg(long, default_value = "https://localhost:4001")]
    pub hub: String,
    /// An admin token of one of the hub's realms (not needed on the box itself).
    #[arg(long, env = "POS_HUB_ADMIN_TOKEN")]
    pub token: Option<String>,
    /// The store CA to trust (from /ca.crt); without it the hub's CA is fetched over
    /// plain HTTP from the same port.
    #[arg(long)]
    pub ca: Option<PathBuf>,
}

#[derive(Args)]
pub struct LogsArgs {
    #[command(flatten)]
    pub hub: HubArgs,
    /// Keep printing new lines as they are written (like `docker logs -f`).
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// How many of the newest lines to print first.
    #[arg(short = 'n', long, default_value_t = 200)]
    pub lines: usize,
    /// Only lines since a time (2026-12-01T10:00:00Z) or a duration ago (10m).
    #[arg(long)]
    pub since: Option<String>,
    /// JSON lines ({timeMs, time, level, source, message}) instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct BundleArgs {
    #[command(flatten)]
    pub hub: HubArgs,
    /// Where to write the .tar.gz.
    #[arg(short = 'o', long)]
    pub out: PathBuf,
}

async fn client(a: &HubArgs) -> Result<(reqwest::Client, String), String> {
    crate::util::hub_client(&a.hub, a.ca.as_deref()).await
}

async fn get(a: &HubArgs, path_and_query: &str) -> Result<reqwest::Response, String> {
    let (c, base) = client(a).await?;
    let mut req = c.get(format!("{base}{path_and_query}"));
    if let Some(t) = &a.token {
        req = req.bearer_auth(t.trim());
    }
    let resp = req.send().await.map_err(|e| format!("{base}: {e}"))?;
    let st = resp.status();
    if !st.is_success() {
        let body = resp.text().await.unwrap_or_default();
        let msg = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
            .unwrap_or(body);
        return Err(format!("HTTP {st}: {}", msg.trim()));
    }
    Ok(resp)
}

fn runtime(what: &str, f: impl std::future::Future<Output = Result<(), String>>) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pos-hub {what}: {e}");
            return 1;
        }
    };
    match rt.block_on(f) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("pos-hub {what}: {e}");
            1
        }
    }
}

pub fn logs_main(a: LogsArgs) -> i32 {
    runtime("logs", async move {
        let mut q = format!("/admin/logs?lines={}", a.lines);
        if a.follow {
            q.push_str("&follow=1");
        }
        if a.json {
            q.push_str("&format=json");
        }
        if let Some(s) = &a.since {
            q.push_str("&since=");
            q.push_str(&urlencode(s));
        }
        let mut resp = get(&a.hub, &q).await?;
        let mut out = std::io::stdout().lock();
        while let Some(chunk) = resp.chunk().await.map_err(|e| format!("reading: {e}"))? {
            if out.write_all(&chunk).and_then(|_| out.flush()).is_err() {
                return Ok(()); // stdout closed (| head)
            }
        }
        Ok(())
    })
}

pub fn bundle_main(a: BundleArgs) -> i32 {
    runtime("support-bundle", async move {
        let mut resp = get(&a.hub, "/admin/support-bundle").await?;
        let tmp = a.out.with_extension("part");
        let mut f = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        let mut n = 0usize;
        while let Some(chunk) = resp.chunk().await.map_err(|e| format!("reading: {e}"))? {
            f.write_all(&chunk)
                .map_err(|e| format!("{}: {e}", tmp.display()))?;
            n += chunk.len();
        }
        f.sync_all()
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
        eprintln!("wrote {} ({n} bytes)", a.out.display());
        Ok(())
    })
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
