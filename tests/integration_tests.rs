//! End-to-end tests: the real `tributary` binary, real simulated upstreams on loopback ports,
//! real HTTP. One integration binary (see tests/integration/).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod integration;
