//! Tributary: a stateless, federated shared care record gateway.
//!
//! A request flows facade -> plan -> fan-out -> merge -> policy -> audit -> response; the
//! README draws it. Connectors (one per upstream protocol) live in the `connectors` crate.

pub mod policy;
pub mod principal;
