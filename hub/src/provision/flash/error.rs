//! Everything that can stop a flash, each with one message that says what to do, and
//! the exit code it maps to: 2 when nothing was written (bad flags, not our image, a
//! refused target), 1 when writing or reading back failed.

use std::path::{Path, PathBuf};

use super::fat::SETTINGS_LABEL;

/// Everything that can stop a flash; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum FlashError {
    // ---- settings (exit 2) ----
    #[error("--realm {0:?}: expected TENANT:STORE, e.g. t-abc:s-001; each part 1-64 characters of A-Z a-z 0-9 . _ -")]
    BadRealm(String),
    #[error("--realm needs the cloud's public key, to check device tokens offline: pass --cluster-key-file key.pub.pem or --cluster-key-base64 \"$(base64 -w0 key.pub.pem)\"")]
    MissingKey,
    #[error("--dev runs the dev realm t-dev:s-dev with its own key: drop --realm and --cluster-key-* for a dev box, or drop --dev for a store's box")]
    DevWithRealm,
    #[error("cannot read the cluster key file {path}: {source}")]
    KeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {reason}")]
    BadKey { what: String, reason: String },
    #[error("--cloud-url {0:?} is not an http:// or https:// URL (e.g. https://api.example.com/v1/events/ingest)")]
    BadUrl(String),
    #[error("--cloud-url needs --cloud-token (the token the hub presents to the cloud bridge)")]
    UrlWithoutToken,
    #[error("--cloud-token needs --cloud-url")]
    TokenWithoutUrl,
    #[error("--cloud-url/--cloud-token need --realm (or --dev): an unclaimed box gets its cloud settings from its claim token")]
    CloudWithoutRealm,
    #[error("--cloud-token: expected printable text without spaces, quotes or '#'")]
    BadToken,
    #[error("--update-channel {0:?}: expected stable, canary or a version like 1.4.2")]
    BadChannel(String),
    #[error("--address {value:?}: {reason}")]
    BadAddress { value: String, reason: String },
    #[error("--gateway {value:?}: {reason}")]
    BadGateway { value: String, reason: String },
    #[error("--dns {value:?}: {reason}")]
    BadDns { value: String, reason: String },
    #[error(
        "--gateway and --dns need --address (without it the box uses DHCP, which provides both)"
    )]
    NetWithoutAddress,

    // ---- the image (exit 2, except I/O) ----
    #[error("the image {0} does not exist")]
    ImageMissing(PathBuf),
    #[error("the image {0} is not a regular file; IMAGE is a pos-hub .img or .img.xz file")]
    ImageNotFile(PathBuf),
    #[error("the image {path} is compressed with {format}: decompress it first ({hint}) and flash the .img, or use the .img.xz")]
    ImageCompressed {
        path: PathBuf,
        format: &'static str,
        hint: String,
    },
    #[error("cannot decompress {path}: {reason}; the download may be damaged: fetch it again, or decompress it yourself with `xz -dk {path}` and flash the .img")]
    Xz { path: PathBuf, reason: String },
    #[error("{path} is not a pos-hub image: {reason}")]
    NotPosHubImage { path: PathBuf, reason: String },

    // ---- the target (exit 2: nothing has been written) ----
    #[error("the target {0} is the image itself; give the card's device (e.g. /dev/sdb, see lsblk) or another file")]
    TargetIsImage(PathBuf),
    #[error("the target {0} does not exist: is the card in the reader? list disks with lsblk")]
    TargetMissingDevice(PathBuf),
    #[error("cannot create the target {path}: the directory {dir} does not exist")]
    TargetNoDir { path: PathBuf, dir: PathBuf },
    #[error("the target {0} is neither a block device nor a regular file")]
    TargetKind(PathBuf),
    #[error("the target {path} ({target}) is smaller than the image ({image}); use a bigger card")]
    TargetTooSmall {
        path: PathBuf,
        target: String,
        image: String,
    },
    #[error("the target {path} is a partition; flash the whole card instead ({disk})")]
    TargetPartition { path: PathBuf, disk: String },
    #[error("the target {path} is this machine's system disk ({why}); refusing to overwrite it. Pick the card's device with lsblk")]
    SystemDisk { path: PathBuf, why: String },
    #[error("the target {path} is mounted ({what}); unmount it first (umount), then flash again")]
    Mounted { path: PathBuf, what: String },
    #[error("the target {path} is in use by the system ({what}); stop using it first")]
    InUse { path: PathBuf, what: String },
    #[error("the target {path} is attached to {loopdev}; detach it first (losetup -d {loopdev})")]
    LoopAttached { path: PathBuf, loopdev: String },
    #[error("the target {0} is read-only (is the card's write-protect switch on?)")]
    ReadOnly(PathBuf),
    #[error("the target {0} has no medium (size 0): insert the card")]
    NoMedium(PathBuf),
    #[error("not confirmed; nothing was written")]
    NotConfirmed,
    #[error(
        "this erases {0}: pass --yes to confirm (stdin is not a terminal, so there is no prompt)"
    )]
    NeedYes(PathBuf),

    // ---- I/O (exit 1) ----
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the image ended early: {got} bytes of the {want} expected; the image file is damaged or was still being downloaded")]
    ShortImage { got: u64, want: u64 },
    #[error("verification failed: read back sha256 {got} from {path}, the image is {want}; the card may be failing, try another one")]
    VerifyMismatch {
        path: PathBuf,
        got: String,
        want: String,
    },
    #[error("the settings partition (partition 1, {SETTINGS_LABEL}) of {path}: {what}: {source}; the card may be failing, try another one")]
    SettingsFat {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("hub.env read back from {path} differs from what was written; the card may be failing, try another one")]
    SettingsMismatch { path: PathBuf },
}

impl FlashError {
    /// 2 for bad usage and refusals (nothing written), 1 for I/O failures.
    pub fn exit_code(&self) -> i32 {
        use FlashError::*;
        match self {
            Io { .. }
            | ShortImage { .. }
            | VerifyMismatch { .. }
            | SettingsFat { .. }
            | SettingsMismatch { .. }
            | Xz { .. } => 1,
            _ => 2,
        }
    }
}

/// Maps an I/O error to [`FlashError::Io`] with what was being done and to which path.
pub(super) fn io<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> FlashError + 'a {
    move |source| FlashError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}
