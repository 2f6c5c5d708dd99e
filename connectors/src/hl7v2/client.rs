//! The HL7 v2 connector: one QBP^Q22 query by NHS number over MLLP, one RSP^K22 reply,
//! checked and mapped to FHIR R4.
//!
//! # Why QBP^Q22 / RSP^K22 and not QRY^A19 / ADR^A19
//! QRY^A19 is HL7's original-mode query, deprecated since v2.4 and withdrawn since v2.7; its
//! QRD/QRF segments carry the key in a free-text "who" field and the reply has no query
//! acknowledgment. QBP^Q22 is the conformance-based query that IHE PDQ (ITI-21) profiles and
//! that current PAS and MPI engines (and the IHE test tools) speak: the key is a typed
//! field path (`@PID.3.1^<NHS number>~@PID.3.4.1^NHS`), the reply's QAK echoes our query tag
//! and states OK / NF (no data found) / AE / AR, and MSA and ERR work as for any message. A PAS
//! answering strictly to PDQ returns PID (and PD1) only; the Tributary profile asks the PAS to
//! append the patient's PV1/PV2, AL1, DG1, PR1 and OBX segments after the PID, in the same
//! way the ADT grammars carry them. A source that sends only the PID still maps correctly.
//!
//! # Checks, in order
//! MLLP frame within the size cap and read timeout -> text and segments parse -> MSA-2 equals
//! our fresh MSH-10 (else the stream is out of step: the reply is dropped, and so is the
//! connection) -> MSA-1 AA (AE/AR become `Rejected` naming the ERR codes, never their text) ->
//! QAK-1 equals our query tag, QAK-2 OK or NF (empty answer) -> exactly one PID whose PID-3
//! NHS number is the one asked for (else `PatientMismatch`: discarded, never merged).
//!
//! # TLS
//! With a `tls` block the same MLLP framing runs over TLS (tokio-rustls, the source's CA only,
//! and a client certificate for mutual TLS); the handshake is part of connecting and counts
//! against `connect_timeout`. A failed handshake, or a server that rejects our client
//! certificate on the first read (TLS 1.3), is a [`ConnectorError::Tls`] naming the reason.
//!
//! # Cancel safety
//! A connection is owned by the future that uses it and goes back to the idle pool only
//! after a whole, in-step exchange. A future dropped mid-exchange drops its connection with
//! it, so no later call can read a stale reply.

use std::{
    hash::{BuildHasher, RandomState},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt, future::BoxFuture};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};
use tokio_util::{codec::Framed, either::Either};

use super::{
    Hl7v2Config, datetime,
    mapping::map_message,
    message::{Builder, Message, Text, components},
    mllp::{MllpCodec, MllpError},
};
use crate::{
    Connector, ConnectorError, ResourceType, SourceDescriptor, SourceQuery, SourceRecord,
    nhs::NhsNumber, tls::TlsFailure,
};

/// A connection to the PAS: plain TCP, or TLS over TCP; the pool holds either.
type MllpStream = Either<TcpStream, TlsStream<TcpStream>>;
type Conn = Framed<MllpStream, MllpCodec>;

/// How to wrap a fresh TCP connection in TLS, built once from the source's `tls` block.
struct TlsSetup {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// The HL7 v2 (MLLP) connector for one source.
#[derive(Debug, Clone)]
pub struct Hl7v2Connector {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    descriptor: SourceDescriptor,
    config: Hl7v2Config,
    tls: Option<TlsSetup>,
    idle: Mutex<Vec<Conn>>,
    /// Random per connector, so control ids differ across restarts and replicas.
    nonce: u32,
    counter: AtomicU64,
}

impl Hl7v2Connector {
    pub fn new(descriptor: SourceDescriptor, config: Hl7v2Config) -> Result<Self, String> {
        let problems = config.validate();
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        let tls = match &config.tls {
            None => None,
            Some(tls) => {
                let loaded = tls.load().map_err(|p| p.join("; "))?;
                let server_name = match loaded.server_name {
                    Some(name) => name,
                    None => config
                        .host()
                        .and_then(|h| ServerName::try_from(h.to_owned()).ok())
                        .ok_or_else(|| {
                            format!("address `{}` has no host to check", config.address)
                        })?,
                };
                Some(TlsSetup {
                    connector: TlsConnector::from(loaded.config),
                    server_name,
                })
            }
        };
        let nonce = RandomState::new().hash_one(&descriptor.id) as u32;
        Ok(Self {
            inner: Arc::new(Inner {
                descriptor,
                config,
                tls,
                idle: Mutex::new(Vec::new()),
                nonce,
                counter: AtomicU64::new(1),
            }),
        })
    }

    /// Idle connections held for reuse (for tests and the admin page).
    pub fn idle_connections(&self) -> usize {
        self.inner.idle_len()
    }
}

impl Connector for Hl7v2Connector {
    fn descriptor(&self) -> &SourceDescriptor {
        &self.inner.descriptor
    }

    fn fetch(
        &self,
        query: SourceQuery,
    ) -> BoxFuture<'static, Result<SourceRecord, ConnectorError>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.fetch(query).await })
    }
}

/// Why one round trip failed, and whether the connection was merely stale.
struct RoundTripError {
    error: ConnectorError,
    /// The peer had closed the (reused) connection before we sent: try a fresh one.
    stale: bool,
}

impl Inner {
    fn idle_len(&self) -> usize {
        self.idle.lock().map(|v| v.len()).unwrap_or(0)
    }

    fn take_idle(&self) -> Option<Conn> {
        self.idle.lock().ok()?.pop()
    }

    fn give_back(&self, conn: Conn) {
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < self.config.max_idle_connections
        {
            idle.push(conn);
        }
    }

    /// A fresh control id: 8 hex digits of nonce and a 12-digit counter (MSH-10 is 20 chars).
    fn next_control_id(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed) % 1_000_000_000_000;
        format!("{:08X}{n:012}", self.nonce)
    }

    async fn fetch(&self, query: SourceQuery) -> Result<SourceRecord, ConnectorError> {
        let control_id = self.next_control_id();
        let tag = format!("Q{control_id}");
        let request = build_query(
            &self.config,
            &self.descriptor,
            &control_id,
            &tag,
            &query.nhs_number,
        );
        let (frame, conn) = self.exchange(Bytes::from(request)).await?;
        let (result, in_step) = interpret(&frame, &control_id, &tag, &query);
        if in_step {
            self.give_back(conn);
        }
        result
    }

    async fn exchange(&self, request: Bytes) -> Result<(BytesMut, Conn), ConnectorError> {
        if let Some(conn) = self.take_idle() {
            match self.round_trip(conn, request.clone()).await {
                Ok(done) => return Ok(done),
                Err(RoundTripError { stale: true, .. }) => {
                    tracing::debug!(
                        source = %self.descriptor.ods,
                        "Idle connection was closed by the source; reconnecting."
                    );
                }
                Err(e) => return Err(e.error),
            }
        }
        let conn = self.connect().await?;
        self.round_trip(conn, request).await.map_err(|e| e.error)
    }

    /// Opens a connection (and its TLS session), all within `connect_timeout`.
    async fn connect(&self) -> Result<Conn, ConnectorError> {
        let stream = tokio::time::timeout(self.config.connect_timeout, self.open())
            .await
            .map_err(|_| ConnectorError::Connect("connect timed out".into()))??;
        Ok(Framed::new(
            stream,
            MllpCodec::new(self.config.max_frame_bytes),
        ))
    }

    async fn open(&self) -> Result<MllpStream, ConnectorError> {
        let stream = TcpStream::connect(&self.config.address)
            .await
            .map_err(|e| ConnectorError::Connect(io_kind(&e)))?;
        let _ = stream.set_nodelay(true);
        let Some(tls) = &self.tls else {
            return Ok(Either::Left(stream));
        };
        tls.connector
            .connect(tls.server_name.clone(), stream)
            .await
            .map(Either::Right)
            .map_err(|e| match TlsFailure::find(&e) {
                Some(failure) => ConnectorError::Tls(failure),
                None => ConnectorError::Connect(io_kind(&e)),
            })
    }

    async fn round_trip(
        &self,
        mut conn: Conn,
        request: Bytes,
    ) -> Result<(BytesMut, Conn), RoundTripError> {
        let timeout = self.config.read_timeout;
        match tokio::time::timeout(timeout, conn.send(request)).await {
            Err(_) => return Err(fatal(ConnectorError::Transport("write timed out".into()))),
            Ok(Err(e)) => {
                return Err(RoundTripError {
                    stale: true,
                    error: mllp_error(e),
                });
            }
            Ok(Ok(())) => {}
        }
        match tokio::time::timeout(timeout, conn.next()).await {
            Err(_) => Err(fatal(ConnectorError::Transport(
                "no whole reply within the read timeout".into(),
            ))),
            Ok(None) => Err(RoundTripError {
                stale: true,
                error: ConnectorError::Transport("connection closed before a reply".into()),
            }),
            Ok(Some(Err(e))) => {
                let stale = matches!(&e, MllpError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionReset)
                    && conn.read_buffer().is_empty();
                Err(RoundTripError {
                    stale,
                    error: mllp_error(e),
                })
            }
            Ok(Some(Ok(frame))) => Ok((frame, conn)),
        }
    }
}

fn fatal(error: ConnectorError) -> RoundTripError {
    RoundTripError {
        error,
        stale: false,
    }
}

fn io_kind(e: &std::io::Error) -> String {
    e.kind().to_string().to_lowercase()
}

fn mllp_error(e: MllpError) -> ConnectorError {
    if let MllpError::Io(io) = &e
        && let Some(failure) = TlsFailure::find(io)
    {
        return ConnectorError::Tls(failure);
    }
    match e {
        MllpError::TooLarge { limit } => ConnectorError::TooLarge { limit },
        MllpError::NoStartBlock | MllpError::BadEndBlock => {
            ConnectorError::Malformed(format!("not mllp: {e}"))
        }
        MllpError::Truncated => ConnectorError::Transport("connection closed mid-reply".into()),
        MllpError::Io(io) => ConnectorError::Transport(io_kind(&io)),
    }
}

/// The QBP^Q22 query for one NHS number.
pub fn build_query(
    config: &Hl7v2Config,
    descriptor: &SourceDescriptor,
    control_id: &str,
    tag: &str,
    nhs: &NhsNumber,
) -> String {
    let receiving_facility = if config.receiving_facility.is_empty() {
        descriptor.ods.as_str()
    } else {
        config.receiving_facility.as_str()
    };
    let mut b = Builder::new();
    b.segment(
        "MSH",
        [
            vec![config.sending_application.as_str()],
            vec![config.sending_facility.as_str()],
            vec![config.receiving_application.as_str()],
            vec![receiving_facility],
            vec![datetime::now_hl7().as_str()],
            vec![],
            vec!["QBP", "Q22", "QBP_Q21"],
            vec![control_id],
            vec!["P"],
            vec!["2.5"],
            vec![],
            vec![],
            vec!["NE"],
            vec!["AL"],
            vec!["GBR"],
            vec!["UNICODE UTF-8"],
        ]
        .iter()
        .map(|f| f.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
    );
    let key = format!(
        "{}~{}",
        components(["@PID.3.1", nhs.expose().as_str()]),
        components(["@PID.3.4.1", "NHS"])
    );
    b.segment_raw(
        "QPD",
        &[components(["IHE PDQ Query"]), components([tag]), key],
    );
    b.segment("RCP", [["I"]]);
    b.finish()
}

/// HL7 table 0357 texts for the codes we may name (never the sender's own text: ERR-7/8 and
/// free text may carry patient data).
fn err_code_text(code: &str) -> &'static str {
    match code {
        "0" => "message accepted",
        "100" => "segment sequence error",
        "101" => "required field missing",
        "102" => "data type error",
        "103" => "table value not found",
        "200" => "unsupported message type",
        "201" => "unsupported event code",
        "202" => "unsupported processing id",
        "203" => "unsupported version id",
        "204" => "unknown key identifier",
        "205" => "duplicate key identifier",
        "206" => "application record locked",
        "207" => "application internal error",
        _ => "",
    }
}

/// The ERR codes of a reply, as safe text: `204 unknown key identifier; 207 ...`.
fn err_summary(msg: &Message<'_>) -> String {
    let mut parts: Vec<String> = Vec::new();
    for seg in msg.segments().filter(|s| s.name() == "ERR") {
        // v2.5 ERR-3 (CWE), else v2.3 ERR-1 ELD.4 (CE).
        let code = Some(seg.get(3, 1, 1))
            .filter(|c| !c.trim().is_empty())
            .unwrap_or_else(|| seg.sub(1, 1, 4, 1));
        let code: String = code.trim().to_owned();
        if code.is_empty() || code.len() > 8 || !code.chars().all(|c| c.is_ascii_alphanumeric()) {
            continue;
        }
        let text = err_code_text(&code);
        let part = if text.is_empty() {
            format!("code {code}")
        } else {
            format!("{code} {text}")
        };
        if !parts.contains(&part) {
            parts.push(part);
        }
    }
    if parts.is_empty() {
        "no error code given".into()
    } else {
        parts.join("; ")
    }
}

/// Checks and maps one reply frame. The flag says whether the stream is still in step (the
/// reply was for our query), so the connection may be reused.
pub fn interpret(
    frame: &[u8],
    control_id: &str,
    tag: &str,
    query: &SourceQuery,
) -> (Result<SourceRecord, ConnectorError>, bool) {
    let text = match Text::decode(frame) {
        Ok(t) => t,
        Err(e) => return (Err(ConnectorError::Malformed(e.to_string())), false),
    };
    let msg = match text.parse() {
        Ok(m) => m,
        Err(e) => return (Err(ConnectorError::Malformed(e.to_string())), false),
    };
    // Our own query back (an interface engine routing it in a loop) is not an answer.
    if msg.message_type().starts_with("QBP^") {
        return (
            Err(ConnectorError::Malformed(
                "reply is a query, not a response (routing loop)".into(),
            )),
            false,
        );
    }
    let Some(msa) = msg.segment("MSA") else {
        return (
            Err(ConnectorError::Malformed("reply has no msa segment".into())),
            false,
        );
    };
    if msa.get(2, 1, 1).trim() != control_id {
        return (
            Err(ConnectorError::Malformed(
                "reply control id does not match the query".into(),
            )),
            false,
        );
    }
    (check_and_map(&msg, tag, query), true)
}

fn check_and_map(
    msg: &Message<'_>,
    tag: &str,
    query: &SourceQuery,
) -> Result<SourceRecord, ConnectorError> {
    let msa_code = msg
        .segment("MSA")
        .map(|s| s.get(1, 1, 1))
        .unwrap_or_default();
    match msa_code.trim() {
        "AA" | "CA" => {}
        "AE" | "CE" => {
            return Err(ConnectorError::Rejected(format!(
                "application error ({})",
                err_summary(msg)
            )));
        }
        "AR" | "CR" => {
            return Err(ConnectorError::Rejected(format!(
                "application reject ({})",
                err_summary(msg)
            )));
        }
        _ => {
            return Err(ConnectorError::Malformed(
                "msa-1 is not an acknowledgment code".into(),
            ));
        }
    }
    // The type itself is not repeated: every byte of a reply is the source's to fill.
    if msg.message_type() != "RSP^K22" {
        return Err(ConnectorError::Malformed(
            "reply is not an RSP^K22 query response".into(),
        ));
    }
    let Some(qak) = msg.segment("QAK") else {
        return Err(ConnectorError::Malformed("reply has no qak segment".into()));
    };
    if qak.get(1, 1, 1).trim() != tag {
        return Err(ConnectorError::Malformed(
            "qak query tag does not match the query".into(),
        ));
    }
    match qak.get(2, 1, 1).trim() {
        "OK" => {}
        "NF" => return Ok(SourceRecord::default()),
        "AE" => {
            return Err(ConnectorError::Rejected(format!(
                "query error ({})",
                err_summary(msg)
            )));
        }
        "AR" => {
            return Err(ConnectorError::Rejected(format!(
                "query rejected ({})",
                err_summary(msg)
            )));
        }
        _ => {
            return Err(ConnectorError::Malformed(
                "qak-2 is not a query response status".into(),
            ));
        }
    }
    let patients = map_message(msg);
    let asked = query.nhs_number.expose();
    // Safety first: any PID about someone else discards the whole reply.
    if patients
        .iter()
        .any(|p| p.nhs_numbers.is_empty() || p.nhs_numbers.iter().any(|n| *n != asked))
    {
        return Err(ConnectorError::PatientMismatch);
    }
    let mut patients = patients.into_iter();
    let (Some(patient), None) = (patients.next(), patients.next()) else {
        return Err(ConnectorError::Malformed(
            "reply must hold exactly one patient".into(),
        ));
    };
    let resources = patient
        .resources
        .into_iter()
        .filter(|r| {
            r["resourceType"]
                .as_str()
                .and_then(ResourceType::parse)
                .is_some_and(|t| query.wants(t))
        })
        .collect();
    Ok(SourceRecord { resources })
}
