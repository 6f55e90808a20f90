//! Putting a box into service: flashing a card with a store's settings ([`flash`]) and
//! claiming an unflashed box on first boot ([`claim`]), and factory reset ([`reset`]).

pub mod claim;
pub mod reset;
