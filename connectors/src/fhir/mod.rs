//! FHIR R4 REST connector (GP systems, councils, the demographics service, any FHIR source),
//! its mapping to and from the synthetic region's data, and a simulator of a FHIR source.
mod client;
mod config;
pub mod mapping;
pub mod sim;
#[cfg(test)]
mod tests;

pub use client::FhirConnector;
pub use config::FhirConfig;
