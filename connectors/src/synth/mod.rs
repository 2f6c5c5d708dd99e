//! A deterministic synthetic region: organisations, patients and their records, and the
//! simulators that serve them on loopback.
mod catalogue;
mod generate;
pub mod launch;
pub mod model;
#[cfg(test)]
mod tests;

pub use generate::{PatientSummary, Region};
pub use launch::{LaunchedRegion, LaunchedSource, launch};
