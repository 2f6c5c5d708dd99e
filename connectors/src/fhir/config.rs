//! Configuration of one FHIR source.
use serde::{Deserialize, Serialize};

use crate::tls::TlsConfig;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FhirConfig {
    /// The FHIR base URL, e.g. `http://127.0.0.1:7001/fhir`. An `https://` URL needs `tls`.
    pub base_url: String,
    /// Largest reply body accepted, in bytes.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// TLS to the source: its CA, and the gateway's client certificate for mutual TLS.
    /// Required for `https://` (there are no default roots), refused for `http://`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

fn default_max_body_bytes() -> usize {
    8 * 1024 * 1024
}

impl FhirConfig {
    /// A configuration with every default, for `base_url`.
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            max_body_bytes: default_max_body_bytes(),
            tls: None,
        }
    }

    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let https = self.base_url.starts_with("https://");
        if !(self.base_url.starts_with("http://") || https) {
            problems.push(format!(
                "base_url `{}` is not an http:// or https:// URL",
                self.base_url
            ));
        }
        if self.max_body_bytes == 0 {
            problems.push("max_body_bytes must be greater than 0".to_owned());
        }
        match &self.tls {
            Some(tls) => {
                if self.base_url.starts_with("http://") {
                    problems.push(format!(
                        "base_url `{}` is http:// but a tls block is set: use https://",
                        self.base_url
                    ));
                }
                problems.extend(tls.validate());
            }
            None if https => problems.push(format!(
                "base_url `{}` is https:// but has no tls block naming the source's ca_file",
                self.base_url
            )),
            None => {}
        }
        problems
    }
}
