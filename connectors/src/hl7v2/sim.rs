//! A simulated hospital PAS: a real MLLP server answering QBP^Q22 queries by NHS number with
//! RSP^K22 replies rendered from the synthetic region's data for one trust.
//!
//! The reply carries the trust's part of the record: PID (PID-3 repeats the NHS number with
//! assigning authority `NHS` and the hospital number with the trust's ODS code), then for
//! each encounter a PV1 and PV2, then AL1, DG1, PR1 and OBX for allergies, conditions,
//! procedures and observations. Items of other kinds (medication, immunisation, documents,
//! consent) are not held by a PAS and are left out. Times are UK local time with an offset.
//!
//! Faults, per query, as [`crate::fault`] lists them for MLLP: e.g. `hang` reads the query
//! and never answers; `error` answers MSA AE with an ERR segment (207, application internal
//! error); `wrong-shape` answers ACK^Q22; `redirect` sends the query back; `reset` sends half
//! a frame and an RST; `oversize` sends a frame that never ends.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use futures::{SinkExt, StreamExt};
use rustls::ServerConfig;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::Framed;

use super::{
    datetime::{date_to_hl7, now_hl7, to_hl7_uk, to_hl7_uk_date},
    message::{Builder, Message, Text, components},
    mllp::{CR, EB, MllpCodec, SB},
};
use crate::{
    fault::{DRIP_INTERVAL, Fault, FaultSwitch, FaultyListener, OVERSIZE_BYTES, someone_else},
    nhs::NhsNumber,
    synth::model::{Code, Detail, Gender, Item, PatientRecord, Records, SourceSpec},
};

static CONTROL_IDS: AtomicU64 = AtomicU64::new(1);

/// Largest query the simulator reads.
const MAX_QUERY_BYTES: usize = 64 * 1024;

/// Serves one trust's PAS on `listener` until the task is aborted.
pub fn serve(
    listener: TcpListener,
    records: Arc<dyn Records>,
    source: SourceSpec,
    fault: FaultSwitch,
) -> JoinHandle<()> {
    serve_tls(listener, records, source, fault, None)
}

/// As [`serve`], MLLP over TLS when `tls` is given (a client certificate is required when the
/// config has a client verifier). A connection whose handshake fails is drained and closed;
/// the simulator keeps serving.
pub fn serve_tls(
    listener: TcpListener,
    records: Arc<dyn Records>,
    source: SourceSpec,
    fault: FaultSwitch,
    tls: Option<Arc<ServerConfig>>,
) -> JoinHandle<()> {
    let source = Arc::new(source);
    let acceptor = tls.map(TlsAcceptor::from);
    tokio::spawn(async move {
        let mut listener = match FaultyListener::new(listener, &fault) {
            Ok(l) => l,
            Err(_) => {
                tracing::warn!(source = %source.id, "Simulator listener has no address.");
                return;
            }
        };
        loop {
            let Ok(stream) = listener.accept().await else {
                // Out of descriptors or similar: back off briefly instead of spinning.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            };
            let _ = stream.set_nodelay(true);
            let records = Arc::clone(&records);
            let source = Arc::clone(&source);
            let fault = fault.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match acceptor {
                    None => serve_connection(stream, records, source, fault).await,
                    Some(acceptor) => match crate::tls::sim_accept(&acceptor, stream).await {
                        Some(tls) => serve_connection(tls, records, source, fault).await,
                        None => {
                            tracing::debug!(source = %source.id, "Simulator TLS handshake failed.");
                        }
                    },
                }
            });
        }
    })
}

/// A simulator's connection, plain or TLS, with its TCP socket at hand for the faults that
/// end it with an RST.
trait SimStream: AsyncRead + AsyncWrite + Unpin + Send {
    fn tcp(&self) -> &TcpStream;
}

impl SimStream for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl SimStream for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

/// Answers the queries on one connection, each under the fault of the moment.
async fn serve_connection<S: SimStream>(
    stream: S,
    records: Arc<dyn Records>,
    source: Arc<SourceSpec>,
    fault: FaultSwitch,
) {
    let mut framed = Framed::new(stream, MllpCodec::new(MAX_QUERY_BYTES));
    while let Some(Ok(frame)) = framed.next().await {
        let answer = |shape| answer(&frame, records.as_ref(), &source, shape).into_bytes();
        let reply = match fault.get() {
            // Read the query, never answer: wait for the next one (or the close). On a
            // connection already open, a stall is a hang.
            Fault::Hang | Fault::Stall => continue,
            Fault::Garbage => b"<html><body>502 Bad Gateway</body></html>\r\n".to_vec(),
            Fault::Slow(delay) => {
                tokio::time::sleep(delay).await;
                answer(Shape::Normal)
            }
            // A TLS fault shows in the handshake (see `synth::launch`).
            Fault::None | Fault::Tls => answer(Shape::Normal),
            Fault::Error => answer(Shape::Error),
            Fault::WrongShape => answer(Shape::WrongType),
            Fault::OtherPatient => answer(Shape::OtherPatient),
            // MLLP has no redirects; a routing loop sends the query back as the "reply".
            Fault::Redirect => frame.to_vec(),
            // The source is gone: open connections are reset, new ones refused (the listener).
            Fault::Refused => {
                let _ = framed.get_ref().tcp().set_zero_linger();
                return;
            }
            Fault::Reset => {
                let reply = answer(Shape::Normal);
                let half = reply.get(..reply.len() / 2).unwrap_or_default();
                let stream = framed.get_mut();
                let _ = stream.write_all(&[SB]).await;
                let _ = stream.write_all(half).await;
                let _ = stream.flush().await;
                // Let the bytes reach the peer before the RST overtakes them.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                let _ = stream.tcp().set_zero_linger();
                return;
            }
            Fault::Drip => {
                let wire = [&[SB][..], &answer(Shape::Normal), &[EB, CR]].concat();
                for byte in wire {
                    tokio::time::sleep(DRIP_INTERVAL).await;
                    if framed.get_mut().write_all(&[byte]).await.is_err() {
                        return;
                    }
                }
                continue;
            }
            Fault::Oversize => {
                static PAD: [u8; 64 * 1024] = [b'X'; 64 * 1024];
                let stream = framed.get_mut();
                let _ = stream.write_all(&[SB]).await;
                for _ in 0..OVERSIZE_BYTES / PAD.len() {
                    if stream.write_all(&PAD).await.is_err() {
                        break;
                    }
                }
                // A frame that never ends: all that is left is to close.
                return;
            }
        };
        if framed.send(reply).await.is_err() {
            break;
        }
    }
}

/// What the reply to a query should look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Normal,
    /// MSA AE with ERR 207.
    Error,
    /// A well-formed message of the wrong type: ACK^Q22 AA, no query response.
    WrongType,
    /// The reply's PID carries a different NHS number.
    OtherPatient,
}

/// What the query asked, as far as the reply needs it.
struct Asked {
    control_id: String,
    tag: String,
    sender_app: String,
    sender_facility: String,
    qpd: Vec<String>,
    nhs: Option<NhsNumber>,
}

fn read_query(msg: &Message<'_>) -> Asked {
    let msh = msg.segment("MSH");
    let qpd = msg.segment("QPD");
    let get = |s: Option<super::message::Segment<'_, '_>>, f: usize| {
        s.map(|s| s.get(f, 1, 1).into_owned()).unwrap_or_default()
    };
    let mut nhs_value = None;
    let mut authority_ok = true;
    if let Some(q) = qpd {
        for rep in 1..=q.repeats(3) {
            match q.get(3, rep, 1).trim() {
                "@PID.3.1" => nhs_value = Some(q.get(3, rep, 2)),
                "@PID.3.4.1" => authority_ok = q.get(3, rep, 2).trim() == "NHS",
                _ => {}
            }
        }
    }
    Asked {
        control_id: msg.control_id(),
        tag: get(qpd, 2),
        sender_app: get(msh, 3),
        sender_facility: get(msh, 4),
        qpd: qpd
            .map(|q| (1..=3).map(|f| q.raw(f).to_owned()).collect())
            .unwrap_or_default(),
        nhs: nhs_value
            .filter(|_| authority_ok)
            .and_then(|v| NhsNumber::parse(v.trim()).ok()),
    }
}

/// The reply to one query frame.
fn answer(frame: &[u8], records: &dyn Records, source: &SourceSpec, shape: Shape) -> String {
    let Ok(text) = Text::decode(frame) else {
        return reject(source, "", "100");
    };
    let Ok(msg) = text.parse() else {
        return reject(source, "", "100");
    };
    let asked = read_query(&msg);
    if msg.message_type() != "QBP^Q22" {
        return reject(source, &asked.control_id, "200");
    }
    match shape {
        Shape::Normal | Shape::OtherPatient => {}
        Shape::Error => return reply(source, &asked, "AE", "AE", Some("207"), None),
        Shape::WrongType => {
            let mut b = Builder::new();
            msh(
                &mut b,
                source,
                &asked.sender_app,
                &asked.sender_facility,
                ["ACK", "Q22", "ACK"],
            );
            b.segment("MSA", [["AA"], [asked.control_id.as_str()]]);
            return b.finish();
        }
    }
    let Some(nhs) = asked.nhs else {
        return reply(source, &asked, "AE", "AE", Some("204"), None);
    };
    let record = records.record(&nhs);
    if shape == Shape::OtherPatient
        && let Some(mut someone) = record.clone()
    {
        // Someone else's PID, whether or not this trust knows the patient asked for.
        let hospital_number = someone.local_id(&source.ods).unwrap_or("X1").to_owned();
        someone.demographics.nhs_number = someone_else(&nhs);
        return reply(
            source,
            &asked,
            "AA",
            "OK",
            None,
            Some((&someone, &hospital_number)),
        );
    }
    match record
        .as_ref()
        .and_then(|r| r.local_id(&source.ods).map(|id| (r, id)))
    {
        Some((record, hospital_number)) => reply(
            source,
            &asked,
            "AA",
            "OK",
            None,
            Some((record, hospital_number)),
        ),
        None => reply(source, &asked, "AA", "NF", None, None),
    }
}

fn msh(b: &mut Builder, source: &SourceSpec, to_app: &str, to_facility: &str, ty: [&str; 3]) {
    let n = CONTROL_IDS.fetch_add(1, Ordering::Relaxed) % 1_000_000_000;
    let control_id = format!("SIM{n:09}");
    b.segment(
        "MSH",
        [
            vec!["PAS"],
            vec![source.ods.as_str()],
            vec![to_app],
            vec![to_facility],
            vec![now_hl7().as_str()],
            vec![],
            ty.to_vec(),
            vec![control_id.as_str()],
            vec!["P"],
            vec!["2.5"],
            vec![],
            vec![],
            vec![],
            vec![],
            vec!["GBR"],
            vec!["UNICODE UTF-8"],
        ]
        .iter()
        .map(|f| f.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
    );
}

/// An ACK AR for a query we cannot read at all.
fn reject(source: &SourceSpec, control_id: &str, code: &str) -> String {
    let mut b = Builder::new();
    msh(&mut b, source, "", "", ["ACK", "Q22", "ACK"]);
    b.segment("MSA", [["AR"], [control_id]]);
    err(&mut b, code);
    b.finish()
}

fn err(b: &mut Builder, code: &str) {
    let text = match code {
        "100" => "Segment sequence error",
        "200" => "Unsupported message type",
        "204" => "Unknown key identifier",
        _ => "Application internal error",
    };
    b.segment_raw(
        "ERR",
        &[
            String::new(),
            String::new(),
            components([code, text, "HL70357"]),
            "E".into(),
        ],
    );
}

fn reply(
    source: &SourceSpec,
    asked: &Asked,
    ack: &str,
    status: &str,
    error: Option<&str>,
    data: Option<(&PatientRecord, &str)>,
) -> String {
    let mut b = Builder::new();
    msh(
        &mut b,
        source,
        &asked.sender_app,
        &asked.sender_facility,
        ["RSP", "K22", "RSP_K21"],
    );
    b.segment("MSA", [[ack], [asked.control_id.as_str()]]);
    if let Some(code) = error {
        err(&mut b, code);
    }
    b.segment("QAK", [[asked.tag.as_str()], [status]]);
    // QPD is echoed as it came (already encoded).
    b.segment_raw("QPD", &asked.qpd);
    if let Some((record, hospital_number)) = data {
        render_record(&mut b, record, hospital_number, source);
    }
    b.finish()
}

fn coded(code: &Code) -> String {
    let system = if code.system == crate::synth::model::SNOMED {
        "SCT"
    } else {
        code.system
    };
    components([code.code, code.display, system])
}

/// The trust's part of a record as PID, PV1/PV2, AL1, DG1, PR1 and OBX segments.
pub fn render_record(
    b: &mut Builder,
    record: &PatientRecord,
    hospital_number: &str,
    source: &SourceSpec,
) {
    let d = &record.demographics;
    let ods = source.ods.as_str();
    let pid3 = format!(
        "{}~{}",
        components([d.nhs_number.expose().as_str(), "", "", "NHS", "NH"]),
        components([hospital_number, "", "", ods, "MR"])
    );
    let gender = match d.gender {
        Gender::Male => "M",
        Gender::Female => "F",
        Gender::Other => "O",
        Gender::Unknown => "U",
    };
    let line1 = d.address.lines.first().cloned().unwrap_or_default();
    let line2 = d
        .address
        .lines
        .get(1..)
        .map(|l| l.join(", "))
        .unwrap_or_default();
    let mut pid = vec![String::new(); 13];
    pid[0] = "1".into();
    pid[2] = pid3;
    pid[4] = components([d.family.as_str(), d.given.as_str(), "", "", "", "", "L"]);
    pid[6] = date_to_hl7(&d.birth_date);
    pid[7] = gender.into();
    pid[10] = components([
        line1.as_str(),
        line2.as_str(),
        d.address.city.as_str(),
        "",
        d.address.postcode.as_str(),
        "GBR",
        "H",
    ]);
    pid[12] = components([d.phone.as_str(), "PRN", "PH"]);
    b.segment_raw("PID", &pid);

    let items: Vec<&Item> = record.items_at(&source.ods).collect();
    let mut set = 0;
    for item in &items {
        let Detail::Encounter(e) = &item.detail else {
            continue;
        };
        set += 1;
        let class = match e.class {
            "IMP" => "I",
            "EMER" => "E",
            _ => "O",
        };
        let mut pv1 = vec![String::new(); 50];
        pv1[0] = set.to_string();
        pv1[1] = class.into();
        pv1[2] = components([e.location.as_str(), "", "", ods]);
        pv1[6] = components(["", e.attending.as_str()]);
        pv1[18] = components([item.local_id.as_str()]);
        pv1[43] = to_hl7_uk(&item.recorded);
        pv1[44] = e.end.as_ref().map(to_hl7_uk).unwrap_or_default();
        pv1[49] = components([e.visit_number.as_str()]);
        b.segment_raw("PV1", &pv1);
        b.segment_raw("PV2", &[String::new(), String::new(), coded(&item.code)]);
    }
    let mut set = 0;
    for item in &items {
        let Detail::Allergy { reaction } = &item.detail else {
            continue;
        };
        set += 1;
        b.segment_raw(
            "AL1",
            &[
                set.to_string(),
                String::new(),
                coded(&item.code),
                String::new(),
                components([reaction.display]),
                to_hl7_uk_date(&item.recorded),
            ],
        );
    }
    let mut set = 0;
    for item in &items {
        let Detail::Condition { .. } = &item.detail else {
            continue;
        };
        set += 1;
        let mut dg1 = vec![String::new(); 20];
        dg1[0] = set.to_string();
        dg1[2] = coded(&item.code);
        dg1[4] = to_hl7_uk(&item.recorded);
        dg1[5] = "F".into();
        dg1[19] = components([item.local_id.as_str()]);
        b.segment_raw("DG1", &dg1);
    }
    let mut set = 0;
    for item in &items {
        let Detail::Procedure = &item.detail else {
            continue;
        };
        set += 1;
        let mut pr1 = vec![String::new(); 19];
        pr1[0] = set.to_string();
        pr1[2] = coded(&item.code);
        pr1[4] = to_hl7_uk(&item.recorded);
        pr1[18] = components([item.local_id.as_str()]);
        b.segment_raw("PR1", &pr1);
    }
    let mut set = 0;
    for item in &items {
        let Detail::Observation { value, unit } = &item.detail else {
            continue;
        };
        set += 1;
        let mut obx = vec![String::new(); 21];
        obx[0] = set.to_string();
        obx[1] = "NM".into();
        obx[2] = coded(&item.code);
        obx[4] = value.to_string();
        obx[5] = components([*unit, *unit, "UCUM"]);
        obx[10] = "F".into();
        obx[13] = to_hl7_uk(&item.recorded);
        obx[20] = components([item.local_id.as_str()]);
        b.segment_raw("OBX", &obx);
    }
}
