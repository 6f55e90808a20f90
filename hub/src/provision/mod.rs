//! Putting a box into service: flashing a card with a store's settings ([`flash`]),
//! claiming an unflashed box on first boot ([`claim`]), and factory reset ([`reset`]).

pub mod claim;
pub mod flash;
pub mod reset;
