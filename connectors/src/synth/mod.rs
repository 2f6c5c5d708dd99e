//! A deterministic synthetic region: organisations, patients and their records.
pub mod model;
