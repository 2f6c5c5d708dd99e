//! Configuration of one HL7 v2 (MLLP) source.
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::tls::TlsConfig;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Hl7v2Config {
    /// `host:port` of the PAS's MLLP listener.
    pub address: String,
    /// Largest MLLP frame accepted, in bytes.
    #[serde(default = "default_max_frame_bytes")]
    pub max_frame_bytes: usize,
    /// Longest wait for a whole reply once the query is sent. The gateway's budget usually
    /// cancels sooner; this bounds a connector used on its own.
    #[serde(default = "default_read_timeout", with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Longest wait for the TCP connection to open.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Idle connections kept open for reuse.
    #[serde(default = "default_max_idle_connections")]
    pub max_idle_connections: usize,
    /// MSH-3 of our queries.
    #[serde(default = "default_sending_application")]
    pub sending_application: String,
    /// MSH-4 of our queries.
    #[serde(default = "default_sending_facility")]
    pub sending_facility: String,
    /// MSH-5 of our queries (the PAS's application name), empty when the PAS does not care.
    #[serde(default)]
    pub receiving_application: String,
    /// MSH-6 of our queries; empty means the source's ODS code.
    #[serde(default)]
    pub receiving_facility: String,
    /// MLLP over TLS: the source's CA, and the gateway's client certificate for mutual TLS.
    /// The server certificate must name the host of `address` (or `tls.server_name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

fn default_max_frame_bytes() -> usize {
    4 * 1024 * 1024
}

fn default_read_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_max_idle_connections() -> usize {
    4
}

fn default_sending_application() -> String {
    "TRIBUTARY".to_owned()
}

fn default_sending_facility() -> String {
    "TRIBUTARY".to_owned()
}

impl Hl7v2Config {
    /// A configuration with every default, for `address`.
    pub fn new(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            max_frame_bytes: default_max_frame_bytes(),
            read_timeout: default_read_timeout(),
            connect_timeout: default_connect_timeout(),
            max_idle_connections: default_max_idle_connections(),
            sending_application: default_sending_application(),
            sending_facility: default_sending_facility(),
            receiving_application: String::new(),
            receiving_facility: String::new(),
            tls: None,
        }
    }

    /// The host part of `address` (without IPv6 brackets), if it has one.
    pub fn host(&self) -> Option<&str> {
        let (host, _) = self.address.rsplit_once(':')?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        Some(host).filter(|h| !h.is_empty())
    }

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
        if self.read_timeout.is_zero() {
            problems.push("read_timeout must be greater than 0".to_owned());
        }
        if self.connect_timeout.is_zero() {
            problems.push("connect_timeout must be greater than 0".to_owned());
        }
        for (name, value) in [
            ("sending_application", &self.sending_application),
            ("sending_facility", &self.sending_facility),
            ("receiving_application", &self.receiving_application),
            ("receiving_facility", &self.receiving_facility),
        ] {
            if value.chars().any(|c| "|^~\\&\r\n".contains(c)) {
                problems.push(format!(
                    "{name} must not contain HL7 delimiters (| ^ ~ \\ &) or line breaks"
                ));
            }
        }
        if let Some(tls) = &self.tls {
            if tls.server_name.is_none()
                && self
                    .host()
                    .is_some_and(|h| rustls_pki_types::ServerName::try_from(h).is_err())
            {
                problems.push(format!(
                    "address host of `{}` cannot be checked against a certificate: set tls.server_name",
                    self.address
                ));
            }
            problems.extend(tls.validate());
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn defaults_fill_in_and_unknown_fields_are_refused() {
        let c: Hl7v2Config = serde_json::from_str(r#"{"address":"127.0.0.1:2575"}"#).unwrap();
        assert_eq!(c, Hl7v2Config::new("127.0.0.1:2575"));
        let c: Hl7v2Config =
            serde_json::from_str(r#"{"address":"h:1","read_timeout":"250ms"}"#).unwrap();
        assert_eq!(c.read_timeout, Duration::from_millis(250));
        assert!(serde_json::from_str::<Hl7v2Config>(r#"{"address":"h:1","tls":true}"#).is_err());
    }

    #[test]
    fn validate_collects_every_problem() {
        let mut c = Hl7v2Config::new("nowhere");
        c.max_frame_bytes = 0;
        c.read_timeout = Duration::ZERO;
        c.sending_facility = "A|B".into();
        assert_eq!(c.validate().len(), 4);
        assert!(Hl7v2Config::new("127.0.0.1:2575").validate().is_empty());
    }
}
