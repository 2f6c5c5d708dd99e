//! Faults a simulator can be told to show, so users and tests can watch a source fail.
//! Every simulator (FHIR, HL7 v2) honours every mode in its own protocol.

use std::{
    fmt,
    str::FromStr,
    sync::{Arc, RwLock},
    time::Duration,
};

/// How a simulated source misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Behaves.
    #[default]
    None,
    /// Accepts the connection and the request, then never answers.
    Hang,
    /// Answers with a server error (FHIR: 500 + OperationOutcome; HL7 v2: ACK with AE).
    Error,
    /// Answers correctly after a delay.
    Slow(Duration),
    /// Answers with bytes that are not the protocol.
    Garbage,
    /// Serves TLS with a certificate from a CA the gateway does not trust for this source
    /// (unknown issuer). Only a source launched with this fault serves TLS at all.
    Tls,
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Self::None),
            "hang" => Ok(Self::Hang),
            "error" => Ok(Self::Error),
            "garbage" => Ok(Self::Garbage),
            "tls" => Ok(Self::Tls),
            _ => match s.strip_prefix("slow:") {
                Some(ms) => ms
                    .parse::<u64>()
                    .map(|ms| Self::Slow(Duration::from_millis(ms)))
                    .map_err(|_| {
                        format!("`slow:` takes a whole number of milliseconds, not `{ms}`")
                    }),
                None => Err(format!(
                    "unknown fault `{s}`: expected none, hang, error, slow:MS, garbage or tls"
                )),
            },
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::Hang => f.write_str("hang"),
            Self::Error => f.write_str("error"),
            Self::Slow(d) => write!(f, "slow:{}", d.as_millis()),
            Self::Garbage => f.write_str("garbage"),
            Self::Tls => f.write_str("tls"),
        }
    }
}

/// A fault that can be changed while the simulator runs (tests flip a source up and down).
#[derive(Debug, Clone, Default)]
pub struct FaultSwitch(Arc<RwLock<Fault>>);

impl FaultSwitch {
    pub fn new(fault: Fault) -> Self {
        Self(Arc::new(RwLock::new(fault)))
    }

    pub fn get(&self) -> Fault {
        *self
            .0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn set(&self, fault: Fault) {
        *self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = fault;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_mode_and_rejects_others() {
        assert_eq!("hang".parse(), Ok(Fault::Hang));
        assert_eq!("error".parse(), Ok(Fault::Error));
        assert_eq!("garbage".parse(), Ok(Fault::Garbage));
        assert_eq!(
            "slow:250".parse(),
            Ok(Fault::Slow(Duration::from_millis(250)))
        );
        assert!("slow:x".parse::<Fault>().is_err());
        assert!("explode".parse::<Fault>().is_err());
    }
}
