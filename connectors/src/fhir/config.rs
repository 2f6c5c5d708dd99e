//! Configuration of one FHIR source.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FhirConfig {
    /// The FHIR base URL, e.g. `http://127.0.0.1:7001/fhir`.
    pub base_url: String,
    /// Largest reply body accepted, in bytes.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
}

fn default_max_body_bytes() -> usize {
    8 * 1024 * 1024
}

impl FhirConfig {
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !(self.base_url.starts_with("http://") || self.base_url.starts_with("https://")) {
            problems.push(format!(
                "base_url `{}` is not an http:// or https:// URL",
                self.base_url
            ));
        }
        if self.max_body_bytes == 0 {
            problems.push("max_body_bytes must be greater than 0".to_owned());
        }
        problems
    }
}
