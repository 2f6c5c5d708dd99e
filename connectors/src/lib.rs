//! Tributary's connectors: the contract between the gateway and every upstream protocol,
//! one adapter per protocol, the simulators of those upstreams, and the synthetic region.
//!
//! A connector knows one protocol and nothing about policy, merging, caching or budgets:
//! the gateway wraps every connector in the same tower stack. Every connector module has
//! the same shape: `config.rs`, `client.rs`, `mapping.rs`, `sim.rs`, `tests.rs`.

pub mod conformance;
pub mod contract;
pub mod fault;
pub mod fhir;
#[doc(hidden)]
pub mod fuzzing;
pub mod hl7v2;
pub mod nhs;
pub mod synth;
pub mod tls;

pub use contract::{
    Connector, ConnectorConfig, ConnectorError, ConnectorKind, OdsCode, ResourceType,
    SourceDescriptor, SourceKind, SourceQuery, SourceRecord,
};
pub use nhs::{NhsNumber, NhsNumberError};
