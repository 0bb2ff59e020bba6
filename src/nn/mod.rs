//! Neural-network building blocks.

pub mod params;

pub use params::{Init, ParamStore};
