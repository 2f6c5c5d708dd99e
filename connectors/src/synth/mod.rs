//! A deterministic synthetic region: organisations, patients and their records.
mod catalogue;
mod generate;
pub mod model;
#[cfg(test)]
mod tests;

pub use generate::{PatientSummary, Region};
