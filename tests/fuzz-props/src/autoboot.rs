//! `autoboot.txt` on the settings partition (a laptop may have edited it): what
//! parses survives the commit rewrite unchanged.

use pos_hub::update::slots::{format_autoboot, parse_autoboot};

use crate::util::text;

pub fn run(data: &[u8]) {
    let Some(s) = text(data) else { return };
    if let Some(a) = parse_autoboot(s) {
        let again = format_autoboot(a);
        assert_eq!(parse_autoboot(&again), Some(a), "rewritten: {again:?}");
    }
}
