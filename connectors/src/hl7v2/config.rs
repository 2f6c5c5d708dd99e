//! Configuration of one HL7 v2 (MLLP) source.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Hl7v2Config {
    /// `host:port` of the PAS's MLLP listener.
    pub address: String,
    /// Largest MLLP frame accepted, in bytes.
    #[serde(default = "default_max_frame_bytes")]
    pub max_frame_bytes: usize,
}

fn default_max_frame_bytes() -> usize {
    4 * 1024 * 1024
}

impl Hl7v2Config {
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self
            .address
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_none()
        {
            problems.push(format!("address `{}` is not host:port", self.address));
        }
        if self.max_frame_bytes == 0 {
            problems.push("max_frame_bytes must be greater than 0".to_owned());
        }
        problems
    }
}
