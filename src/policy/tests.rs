#![allow(clippy::unwrap_used)]
//! Unit tests for the policy engine: every rule, every diagnostics path, reload, and a
//! property test that GP data under dissent never leaves.

use std::path::{Path, PathBuf};

use super::*;

fn shipped() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

#[test]
fn shipped_policies_load() {
    match PolicyEngine::load(&shipped()) {
        Ok(_) => {}
        Err(d) => panic!(
            "{}",
            d.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        ),
    }
}
