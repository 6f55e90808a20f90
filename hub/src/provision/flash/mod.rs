//! `pos-hub flash IMAGE TARGET`: write a firmware image to a card (or an image file) and
//! put the store's settings into it, so the box comes up as that store's hub. Nothing
//! but this binary is needed on the laptop: xz and FAT are handled inside.
//!
//! The story of a flash, each step refusing before anything is written when something
//! is off ([`flash`] below reads the same):
//!
//! 1. the flags are checked: realm, key, URL, channel, network ([`settings`]);
//! 2. the image is opened, raw `.img` or `.img.xz` ([`image`], [`xz`]); its MBR and
//!    partition 1 are read and must be the FAT settings partition `POSHUB-CFG`, whose
//!    `hub.env` gives the comment header ([`fat`]);
//! 3. the target is checked: not the image itself, not this machine's system disk,
//!    not mounted (nor any of its partitions or anything built on them), not attached
//!    to a loop device, writable, at least as big as the image ([`target`], [`disks`]);
//! 4. the user confirms, or passed `--yes` ([`target::confirm`]);
//! 5. the image is written with a progress bar ([`progress`]), fsynced, the target's
//!    page cache dropped, and everything read back and hashed (SHA-256) against the
//!    image ([`write`]);
//! 6. `hub.env` is written into partition 1 ([`fat`]), synced, and read back.
//!
//! Exit codes: 0 done, 2 bad usage or a refusal (nothing written), 1 an I/O failure
//! ([`error`]).

mod args;
mod disks;
mod error;
mod fat;
mod image;
mod progress;
mod settings;
mod target;
mod write;
mod xz;

pub use args::FlashArgs;
pub use error::FlashError;
pub use fat::{SETTINGS_FILE, SETTINGS_LABEL};
pub use settings::{StaticNet, StoreSettings, PORT};

use image::ImageSource;
use progress::human;
use target::{Target, TargetKind};

/// Runs `pos-hub flash`; returns the process exit code.
pub fn run(args: FlashArgs) -> i32 {
    match flash(&args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("pos-hub flash: {e}");
            e.exit_code()
        }
    }
}

/// The whole flash: check, confirm, write, verify, write the settings.
pub fn flash(args: &FlashArgs) -> Result<(), FlashError> {
    let settings = StoreSettings::from_args(args)?;
    let mut image = ImageSource::open(&args.image)?;
    let layout = image.read_layout()?;
    let header = image.settings_header(&layout)?;
    let target = Target::inspect(&args.target, &image)?;

    eprintln!("pos-hub flash");
    eprintln!(
        "  image   {} ({}{})",
        image.path.display(),
        human(image.size),
        if image.xz { ", xz" } else { "" }
    );
    eprintln!(
        "  target  {} ({})",
        target.path.display(),
        target.describe()
    );
    eprintln!("  store   {}", settings.describe());
    target::confirm(args.yes, &image, &target)?;

    let created = matches!(target.kind, TargetKind::NewFile);
    let result = write_and_configure(&mut image, &layout, &target, &settings, &header);
    if result.is_err() && created {
        let _ = std::fs::remove_file(&target.path);
    }
    result
}

fn write_and_configure(
    image: &mut ImageSource,
    layout: &image::Layout,
    target: &Target,
    settings: &StoreSettings,
    header: &str,
) -> Result<(), FlashError> {
    let image_hash = write::write_image(image, target)?;
    let target_hash = write::read_back(&target.path, image.size)?;
    println!("image  sha256 {image_hash}");
    println!("target sha256 {target_hash}");
    if image_hash != target_hash {
        return Err(FlashError::VerifyMismatch {
            path: target.path.clone(),
            got: target_hash,
            want: image_hash,
        });
    }
    eprintln!(
        "verified: the target holds the image ({})",
        human(image.size)
    );

    let text = settings.hub_env(header);
    fat::write_settings(&target.path, layout.p1_offset, layout.p1_len, &text)?;
    eprintln!(
        "{SETTINGS_FILE} written to partition 1 ({SETTINGS_LABEL}): {}",
        settings.keys_summary()
    );
    println!(
        "done: {} is ready for {}",
        target.path.display(),
        settings.describe()
    );
    Ok(())
}
