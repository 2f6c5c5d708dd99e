//! Parse + map cost per HL7 v2 message: the simulator's RSP^K22 for a typical trust record,
//! the same checked end to end as the connector does (`interpret`), and a real UK ADT^A01
//! read from `../shared/testdata` at run time (GPL-3.0: never compiled in), and a whole
//! fetch over loopback against the simulator.
#![allow(clippy::unwrap_used)]

use std::{hint::black_box, sync::Arc};

use connectors::{
    Connector, ConnectorKind, OdsCode, SourceDescriptor, SourceKind, SourceQuery,
    fault::FaultSwitch,
    hl7v2::{
        Hl7v2Config, Hl7v2Connector, interpret, mapping::map_message, message::Builder,
        message::Text, sim,
    },
    nhs::NhsNumber,
    synth::model::{
        Address, Code, Date, DateTime, Demographics, Detail, EncounterDetail, Gender, Item,
        PatientRecord, Protocol, Records, SourceSpec,
    },
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const TRUST: &str = "RAJ";

fn at(year: u16, month: u8, day: u8) -> DateTime {
    DateTime {
        date: Date { year, month, day },
        hour: 10,
        minute: 30,
    }
}

fn item(n: usize, code: Code, detail: Detail) -> Item {
    Item {
        source: OdsCode::new(TRUST),
        local_id: format!("ITEM-{n}"),
        code,
        recorded: at(2024, 1 + (n % 12) as u8, 1 + (n % 28) as u8),
        confidential: false,
        detail,
    }
}

/// A typical trust record: 4 encounters, 2 allergies, 6 conditions, 2 procedures, 10
/// observations (25 segments after MSH).
fn typical(nhs: NhsNumber) -> PatientRecord {
    let mut items = Vec::new();
    for n in 0..4 {
        items.push(item(
            n,
            Code::snomed("32485007", "Hospital admission"),
            Detail::Encounter(EncounterDetail {
                class: "IMP",
                end: Some(at(2024, 8, 2)),
                location: "Ward 7".into(),
                attending: "Dr Ada Lovelace".into(),
                visit_number: format!("V{n}"),
            }),
        ));
    }
    for n in 4..6 {
        items.push(item(
            n,
            Code::snomed("91936005", "Allergy to penicillin"),
            Detail::Allergy {
                reaction: Code::snomed("271807003", "Eruption of skin"),
            },
        ));
    }
    for n in 6..12 {
        items.push(item(
            n,
            Code::snomed("195967001", "Asthma"),
            Detail::Condition { active: true },
        ));
    }
    for n in 12..14 {
        items.push(item(
            n,
            Code::snomed("80146002", "Appendicectomy"),
            Detail::Procedure,
        ));
    }
    for n in 14..24 {
        items.push(item(
            n,
            Code::snomed("27113001", "Body weight"),
            Detail::Observation {
                value: 70.0 + n as f64,
                unit: "kg",
            },
        ));
    }
    PatientRecord {
        demographics: Demographics {
            nhs_number: nhs,
            given: "Siân".into(),
            family: "O'Brien".into(),
            gender: Gender::Female,
            birth_date: Date {
                year: 1980,
                month: 3,
                day: 30,
            },
            address: Address {
                lines: vec!["1 High Street".into()],
                city: "Leeds".into(),
                postcode: "LS1 1AA".into(),
            },
            phone: "0113 496 0000".into(),
            gp_ods: OdsCode::new("P81001"),
            restricted: false,
        },
        local_ids: vec![(OdsCode::new(TRUST), "H123456".into())],
        items,
    }
}

fn spec() -> SourceSpec {
    SourceSpec {
        id: "trust-raj".into(),
        ods: OdsCode::new(TRUST),
        name: "Bench Trust".into(),
        kind: SourceKind::Trust,
        protocol: Protocol::Hl7v2,
    }
}

/// One patient's records.
struct One(NhsNumber);

impl Records for One {
    fn record(&self, nhs_number: &NhsNumber) -> Option<PatientRecord> {
        (*nhs_number == self.0).then(|| typical(self.0))
    }
}

fn reply(nhs: NhsNumber) -> Vec<u8> {
    let spec = spec();
    let mut b = Builder::new();
    b.segment(
        "MSH",
        [
            vec!["PAS"],
            vec![TRUST],
            vec!["TRIBUTARY"],
            vec!["TRIBUTARY"],
            vec!["202407011030+0100"],
            vec![],
            vec!["RSP", "K22", "RSP_K21"],
            vec!["SIM1"],
            vec!["P"],
            vec!["2.5"],
        ],
    );
    b.segment("MSA", [["AA"], ["CTRL1"]]);
    b.segment("QAK", [["QCTRL1"], ["OK"]]);
    b.segment("QPD", [["IHE PDQ Query"], ["QCTRL1"]]);
    sim::render_record(&mut b, &typical(nhs), "H123456", &spec);
    b.finish().into_bytes()
}

fn bench(c: &mut Criterion) {
    let nhs = NhsNumber::parse("9434765919").unwrap();
    let rsp = reply(nhs);
    let query = SourceQuery::everything(nhs);

    let mut g = c.benchmark_group("hl7v2");
    g.throughput(Throughput::Elements(1));
    g.bench_function("rsp_k22_parse_map_typical", |b| {
        b.iter(|| {
            let text = Text::decode(black_box(&rsp)).unwrap();
            let msg = text.parse().unwrap();
            black_box(map_message(&msg))
        })
    });
    g.bench_function("rsp_k22_interpret_checked", |b| {
        b.iter(|| black_box(interpret(black_box(&rsp), "CTRL1", "QCTRL1", &query)))
    });
    g.bench_function("rsp_k22_parse_only", |b| {
        b.iter(|| {
            let text = Text::decode(black_box(&rsp)).unwrap();
            black_box(text.parse().unwrap().segments().count())
        })
    });
    let normalised = Text::decode(&rsp).unwrap().as_str().to_owned();
    g.bench_function("rsp_k22_hl7_parser_crate_only", |b| {
        b.iter(|| {
            black_box(
                hl7_parser::Message::parse(black_box(&normalised))
                    .unwrap()
                    .segments
                    .len(),
            )
        })
    });
    g.bench_function("rsp_k22_decode_text_only", |b| {
        b.iter(|| black_box(Text::decode(black_box(&rsp)).unwrap()))
    });
    let adt = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/testdata/uclh-emap-hl7v2-adt/generic__A01.txt");
    if let Ok(adt) = std::fs::read(adt) {
        g.bench_function("uclh_adt_a01_parse_map", |b| {
            b.iter(|| {
                let text = Text::decode(black_box(&adt)).unwrap();
                let msg = text.parse().unwrap();
                black_box(map_message(&msg))
            })
        });
    }
    // The whole exchange over loopback against the simulator, connection reused: query
    // build, MLLP write, simulator render, read, parse, checks and mapping.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let connector = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        sim::serve(listener, Arc::new(One(nhs)), spec(), FaultSwitch::default());
        let descriptor = SourceDescriptor {
            id: "trust-raj".into(),
            ods: OdsCode::new(TRUST),
            name: "Bench Trust".into(),
            kind: SourceKind::Trust,
            connector: ConnectorKind::Hl7v2,
            endpoint: addr.to_string(),
        };
        Hl7v2Connector::new(descriptor, Hl7v2Config::new(addr.to_string())).unwrap()
    });
    g.bench_function("fetch_over_loopback_reused_connection", |b| {
        b.iter(|| {
            rt.block_on(connector.fetch(SourceQuery::everything(nhs)))
                .unwrap()
        })
    });
    g.finish();
    println!("rsp_k22 typical reply: {} bytes", rsp.len());
}

criterion_group!(benches, bench);
criterion_main!(benches);
