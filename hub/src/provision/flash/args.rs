//! The flags of `pos-hub flash IMAGE TARGET` (clap), as the user types them; checking
//! them is [`super::settings`]' job.

use std::path::PathBuf;

/// `pos-hub flash`: write a firmware image to a card with this store's settings.
#[derive(clap::Args, Debug, Clone)]
pub struct FlashArgs {
    /// The firmware image: a raw `.img`, or an `.img.xz`.
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
    /// Where to write it: a block device (e.g. /dev/sdb, the whole card) or a file
    /// (an existing file is written in place like a device; a missing one is created).
    #[arg(value_name = "TARGET")]
    pub target: PathBuf,
    /// The store this box serves, `tenantId:storeId` (e.g. t-abc:s-001). Without it
    /// (and without --dev) the box starts unclaimed and is claimed on first boot.
    #[arg(long, value_name = "TENANT:STORE")]
    pub realm: Option<String>,
    /// The cloud's public key (PEM), base64-encoded (`base64 -w0 key.pub.pem`). Without
    /// --realm it becomes the claim key of an unclaimed box (CLAIM_PUBLIC_KEY_BASE64).
    #[arg(long, value_name = "B64", conflicts_with = "cluster_key_file")]
    pub cluster_key_base64: Option<String>,
    /// The cloud's public key as a PEM file.
    #[arg(long, value_name = "PEM")]
    pub cluster_key_file: Option<PathBuf>,
    /// The cloud bridge's ingest URL (http:// or https://).
    #[arg(long, value_name = "URL")]
    pub cloud_url: Option<String>,
    /// The token the hub presents to the cloud bridge.
    #[arg(long, value_name = "TOKEN")]
    pub cloud_token: Option<String>,
    /// stable, canary, or a version to pin (e.g. 1.4.2).
    #[arg(long, value_name = "CHANNEL", default_value = "stable")]
    pub update_channel: String,
    /// A static address with its prefix, e.g. 192.168.1.20/24 (default: DHCP).
    #[arg(long, value_name = "A.B.C.D/NN")]
    pub address: Option<String>,
    /// The default gateway for --address.
    #[arg(long, value_name = "IP")]
    pub gateway: Option<String>,
    /// DNS servers for --address, comma-separated (up to 3).
    #[arg(long, value_name = "IP,IP")]
    pub dns: Option<String>,
    /// Development box: DEV=on (the dev realm t-dev:s-dev with a generated key).
    #[arg(long)]
    pub dev: bool,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
}
