//! HL7 v2 over MLLP: the connector for hospital PAS systems (replies mapped to FHIR R4) and a
//! simulated PAS per trust.
//!
//! Layers, bottom up: [`mllp`] frames bytes; [`message`] turns bytes into text by character
//! set and gives decoded access over the `hl7-parser` crate (and encodes what we send);
//! [`datetime`] converts HL7 timestamps in UK local time; [`mapping`] turns segments into
//! FHIR resources; `client` ([`Hl7v2Connector`]) runs the QBP^Q22 / RSP^K22 exchange and its
//! checks (its module documentation says why QBP^Q22); [`sim`] is the PAS simulator.
mod client;
mod config;
pub mod datetime;
pub mod mapping;
pub mod message;
pub mod mllp;
pub mod sim;
#[cfg(test)]
mod tests;

pub use client::{Hl7v2Connector, build_query, interpret};
pub use config::Hl7v2Config;
