//! Tributary: a stateless, federated shared care record gateway.
//!
//! A request flows facade -> plan -> fan-out -> merge -> policy -> audit -> response; the
//! README draws it. Connectors (one per upstream protocol) live in the `connectors` crate.

pub mod admin;
pub mod audit;
pub mod auth;
pub mod breaker;
pub mod cache;
pub mod cli;
pub mod config;
pub mod demo;
pub mod facade;
pub mod fanout;
pub mod fhir;
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub mod hedge;
pub mod listener;
pub mod merge;
pub mod metrics;
pub mod outcome;
pub mod plan;
pub mod policy;
pub mod principal;
pub mod ratelimit;
pub mod server;
pub mod telemetry;
pub mod upstreams;
