//! Faults a simulator can be told to show, so users and tests can watch a source fail.
//! Every simulator (FHIR, HL7 v2) honours every mode in its own protocol.
//!
//! # The modes, and what each means in each protocol
//! | mode | FHIR (HTTP/1.1) | HL7 v2 (MLLP) |
//! | --- | --- | --- |
//! | `hang` | reads the request, never answers | reads the query, never answers |
//! | `stall` | the TCP handshake completes (kernel backlog) but the server never accepts or reads | the same |
//! | `reset` | status line, headers and half the body, then a TCP RST (`SO_LINGER` 0) | the start block and half the frame, then a TCP RST |
//! | `drip` | the real answer, one byte every 200 ms (reaches any sane deadline) | the real framed reply, one byte every 200 ms |
//! | `garbage` | 200 with a body that is not JSON | a well-framed payload that is not HL7 |
//! | `wrong-shape` | 200 with valid JSON that is not a Bundle of entries (`entry` is an object) | a well-formed HL7 message of the wrong type (ACK^Q22 AA, not RSP^K22) |
//! | `error` | 500 with an OperationOutcome | RSP^K22 with MSA AE and ERR 207 |
//! | `oversize` | a chunked body larger than any sane cap (64 MiB), streamed, never buffered | a frame that never ends (64 MiB without an end block), streamed |
//! | `redirect` | 302 to the request's own URL, forever | no redirects in MLLP; nearest analogue: the query is sent back as the "reply" (a routing loop in an interface engine) |
//! | `tls` | serves TLS with a certificate from a CA the gateway does not trust for it (unknown issuer); clearing the fault brings back a trusted certificate | the same, MLLP over TLS |
//! | `refused` | the listener is closed, so connects get ECONNREFUSED; open connections are reset; the port is bound again when the fault is cleared | the same |
//! | `other-patient` | the search answers with a Patient carrying a different NHS number | the reply's PID carries a different NHS number |
//! | `slow:MS` | the real answer after MS milliseconds | the same |
//!

use std::{fmt, io, net::SocketAddr, str::FromStr, sync::Arc, time::Duration};

use crate::nhs::NhsNumber;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// How a simulated source misbehaves. See the module docs for each mode in each protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Behaves.
    #[default]
    None,
    /// Accepts the connection and the request, then never answers.
    Hang,
    /// Lets the kernel complete the TCP handshake but never accepts or reads the connection.
    Stall,
    /// Starts the reply, then resets the connection (TCP RST) mid-body.
    Reset,
    /// Sends the real reply one byte at a time, [`DRIP_INTERVAL`] apart.
    Drip,
    /// Answers with bytes that are not the protocol.
    Garbage,
    /// Answers with well-formed data of the wrong shape (JSON that is not a Bundle; an HL7
    /// message of the wrong type).
    WrongShape,
    /// Answers with a server error (FHIR: 500 + OperationOutcome; HL7 v2: ACK with AE).
    Error,
    /// Streams a reply larger than any connector's cap.
    Oversize,
    /// FHIR: redirects to itself forever. HL7 v2: sends the query back (a routing loop).
    Redirect,
    /// Serves TLS with a certificate from a CA the gateway does not trust for this source
    /// (unknown issuer). Only a source launched with this fault serves TLS at all.
    Tls,
    /// Closes the listening port (connects are refused) until the fault is cleared.
    Refused,
    /// Answers about a different patient than the one asked for.
    OtherPatient,
    /// Answers correctly after a delay.
    Slow(Duration),
}

/// How far apart a dripping source sends its bytes.
pub const DRIP_INTERVAL: Duration = Duration::from_millis(200);

/// How much an oversize reply streams at most: more than any sane cap, bounded all the same.
pub const OVERSIZE_BYTES: usize = 64 * 1024 * 1024;

/// The modes without a parameter, as `--fault` spells them.
const NAMED: [(&str, Fault); 13] = [
    ("none", Fault::None),
    ("hang", Fault::Hang),
    ("stall", Fault::Stall),
    ("reset", Fault::Reset),
    ("drip", Fault::Drip),
    ("garbage", Fault::Garbage),
    ("wrong-shape", Fault::WrongShape),
    ("error", Fault::Error),
    ("oversize", Fault::Oversize),
    ("redirect", Fault::Redirect),
    ("tls", Fault::Tls),
    ("refused", Fault::Refused),
    ("other-patient", Fault::OtherPatient),
];

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some((_, fault)) = NAMED.iter().find(|(name, _)| *name == s) {
            return Ok(*fault);
        }
        match s.strip_prefix("slow:") {
            Some(ms) => ms
                .parse::<u64>()
                .map(|ms| Self::Slow(Duration::from_millis(ms)))
                .map_err(|_| format!("`slow:` takes a whole number of milliseconds, not `{ms}`")),
            None => {
                let names: Vec<&str> = NAMED.iter().map(|(name, _)| *name).collect();
                Err(format!(
                    "unknown fault `{s}`: expected {} or slow:MS",
                    names.join(", ")
                ))
            }
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Slow(d) => write!(f, "slow:{}", d.as_millis()),
            other => {
                let name = NAMED
                    .iter()
                    .find(|(_, fault)| fault == other)
                    .map_or("none", |(name, _)| name);
                f.write_str(name)
            }
        }
    }
}

/// A valid NHS number other than `nhs` (its nearest neighbour), for `other-patient` replies.
pub fn someone_else(nhs: &NhsNumber) -> NhsNumber {
    let first_nine: u32 = nhs
        .expose()
        .get(..9)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (1..=30)
        .flat_map(|k| [first_nine.checked_add(k), first_nine.checked_sub(k)])
        .flatten()
        .find_map(NhsNumber::from_nine)
        .unwrap_or(*nhs)
}

/// A fault that can be changed while the simulator runs (tests flip a source up and down).
/// Watchers (a simulator's listener) wake when it changes.
#[derive(Debug, Clone)]
pub struct FaultSwitch(Arc<watch::Sender<Fault>>);

impl Default for FaultSwitch {
    fn default() -> Self {
        Self::new(Fault::None)
    }
}

impl FaultSwitch {
    pub fn new(fault: Fault) -> Self {
        Self(Arc::new(watch::Sender::new(fault)))
    }

    pub fn get(&self) -> Fault {
        *self.0.borrow()
    }

    pub fn set(&self, fault: Fault) {
        self.0.send_replace(fault);
    }

    /// A receiver that wakes when the fault changes.
    pub fn subscribe(&self) -> watch::Receiver<Fault> {
        self.0.subscribe()
    }
}

/// A simulator's listening socket under a [`FaultSwitch`]: `stall` stops accepting (the
/// kernel still completes handshakes into its backlog), `refused` closes the port, and
/// clearing either resumes on the same address.
#[derive(Debug)]
pub struct FaultyListener {
    listener: Option<TcpListener>,
    addr: SocketAddr,
    fault: watch::Receiver<Fault>,
    /// Keeps the switch alive, so the receiver never sees it closed.
    _switch: FaultSwitch,
}

impl FaultyListener {
    pub fn new(listener: TcpListener, switch: &FaultSwitch) -> io::Result<Self> {
        Ok(Self {
            addr: listener.local_addr()?,
            listener: Some(listener),
            fault: switch.subscribe(),
            _switch: switch.clone(),
        })
    }

    /// The next connection the fault lets through. Cancel-safe.
    pub async fn accept(&mut self) -> io::Result<TcpStream> {
        loop {
            let fault = *self.fault.borrow_and_update();
            if fault == Fault::Refused {
                // Dropping the listener also resets whatever waited in its backlog.
                self.listener = None;
            } else if self.listener.is_none() {
                match TcpListener::bind(self.addr).await {
                    Ok(listener) => self.listener = Some(listener),
                    Err(_) => {
                        // The port is briefly unavailable: try again soon.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
            }
            let accepting = !matches!(fault, Fault::Stall | Fault::Refused);
            let (Some(listener), true) = (&self.listener, accepting) else {
                // The switch lives in `self`, so this never fails.
                let _ = self.fault.changed().await;
                continue;
            };
            tokio::select! {
                _ = self.fault.changed() => {}
                accepted = listener.accept() => return accepted.map(|(stream, _)| stream),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_every_mode_and_rejects_others() {
        for (name, fault) in NAMED {
            assert_eq!(name.parse(), Ok(fault));
            assert_eq!(fault.to_string(), name, "round trip");
        }
        assert_eq!(
            "slow:250".parse(),
            Ok(Fault::Slow(Duration::from_millis(250)))
        );
        assert_eq!(
            Fault::Slow(Duration::from_millis(250)).to_string(),
            "slow:250"
        );
        assert!("slow:x".parse::<Fault>().is_err());
        let unknown = "explode".parse::<Fault>().unwrap_err();
        assert!(unknown.contains("other-patient"), "{unknown}");
    }

    #[test]
    fn someone_else_is_a_different_valid_number() {
        for n in ["9992754133", "9434765919", "0000000000"] {
            let n = NhsNumber::parse(n).unwrap();
            let other = someone_else(&n);
            assert_ne!(other, n);
            assert!(NhsNumber::parse(&other.expose()).is_ok());
        }
    }

    #[tokio::test]
    async fn refused_closes_the_port_and_clearing_it_opens_the_same_port_again() {
        let switch = FaultSwitch::default();
        let mut listener =
            FaultyListener::new(TcpListener::bind("127.0.0.1:0").await.unwrap(), &switch).unwrap();
        let addr = listener.addr;
        let server = tokio::spawn(async move {
            loop {
                let Ok(stream) = listener.accept().await else {
                    continue;
                };
                drop(stream);
            }
        });
        TcpStream::connect(addr).await.unwrap();

        switch.set(Fault::Refused);
        let refused = eventually(|| async {
            matches!(TcpStream::connect(addr).await, Err(e) if e.kind() == io::ErrorKind::ConnectionRefused)
        })
        .await;
        assert!(refused, "connects are refused while the fault holds");

        switch.set(Fault::None);
        assert!(
            eventually(|| async { TcpStream::connect(addr).await.is_ok() }).await,
            "the port comes back when the fault is cleared"
        );
        server.abort();
    }

    /// Whether `check` comes true within a generous guard (the listener reacts on its task).
    async fn eventually<F, Fut>(check: F) -> bool
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        for _ in 0..200 {
            if check().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }
}
