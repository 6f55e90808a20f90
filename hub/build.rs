//! Records the build time: the clock's floor on a box without a battery clock.
fn main() {
    let t = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        });
    println!("cargo:rustc-env=POS_HUB_BUILD_TIME={t}");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
}
