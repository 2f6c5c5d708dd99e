//! Tests of the synthetic region: determinism, labels and their properties, ids, launch.
#![allow(clippy::unwrap_used)]

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use super::{
    Region, launch,
    model::{Detail, Label, Protocol, Records},
};
use crate::{
    ConnectorConfig, SourceKind, SourceQuery, contract::OdsCode, fault::Fault, nhs::NhsNumber,
};

const SENSITIVE_CODES: [&str; 4] = ["8098009", "57797005", "52637005", "407377005"];

fn sample(region: &Region, label: Label) -> NhsNumber {
    region
        .sample_patients()
        .into_iter()
        .find(|(_, l)| *l == label)
        .unwrap()
        .0
}

#[test]
fn same_seed_same_region_different_seed_different_patients() {
    let a = Region::generate(42, 20, 400);
    let b = Region::generate(42, 20, 400);
    assert_eq!(a.patients(), b.patients());
    assert_eq!(a.sample_patients(), b.sample_patients());
    for p in a.patients().iter().step_by(37) {
        assert_eq!(a.record(&p.nhs_number), b.record(&p.nhs_number));
    }
    // Records do not depend on the order they are built in.
    let last = a.patients().last().unwrap().nhs_number;
    assert_eq!(a.record(&last), Region::generate(42, 20, 400).record(&last));

    let c = Region::generate(43, 20, 400);
    let numbers = |r: &Region| {
        r.patients()
            .iter()
            .map(|p| p.nhs_number)
            .collect::<Vec<_>>()
    };
    assert_ne!(numbers(&a), numbers(&c));
}

#[test]
fn nhs_numbers_are_valid_unique_and_in_the_test_range() {
    let region = Region::generate(1, 20, 5_000);
    let mut seen = HashSet::new();
    for p in region.patients() {
        assert!(p.nhs_number.is_test_range());
        assert!(NhsNumber::parse(&p.nhs_number.expose()).is_ok());
        assert!(seen.insert(p.nhs_number));
    }
}

#[test]
fn the_demo_default_of_ten_thousand_patients_generates_in_full() {
    let region = Region::generate(2026, 20, 10_000);
    assert_eq!(region.patients().len(), 10_000);
    let last = region.patients().last().unwrap().nhs_number;
    assert!(
        region.record(&last).is_some(),
        "records are built on demand to the last patient"
    );
}

#[test]
fn sources_are_the_region_s_organisations() {
    let region = Region::generate(5, 420, 10);
    let sources = region.sources();
    assert_eq!(sources.len(), 1 + 5 + 420 + 2 + 1);
    let ids: HashSet<_> = sources.iter().map(|s| &s.id).collect();
    let codes: HashSet<_> = sources.iter().map(|s| &s.ods).collect();
    assert_eq!((ids.len(), codes.len()), (sources.len(), sources.len()));
    assert_eq!(
        (sources[0].id.as_str(), sources[0].ods.as_str()),
        ("pds", "X26")
    );
    for s in sources {
        let trust = s.kind == SourceKind::Trust;
        assert_eq!(s.protocol == Protocol::Hl7v2, trust, "{}", s.id);
    }
    let trusts: Vec<_> = sources
        .iter()
        .filter(|s| s.kind == SourceKind::Trust)
        .map(|s| s.id.as_str())
        .collect();
    assert_eq!(
        trusts,
        [
            "trust-rxl",
            "trust-rxn",
            "trust-rxr",
            "trust-rtx",
            "trust-rw5"
        ]
    );
    assert!(sources.iter().any(|s| s.id == "gp-p81001"));
    let kinds = |k| sources.iter().filter(|s| s.kind == k).count();
    assert_eq!(kinds(SourceKind::GpPractice), 420);
    assert_eq!(kinds(SourceKind::Council), 2);
    assert_eq!(kinds(SourceKind::PrivateProvider), 1);
}

#[test]
fn every_label_has_a_sample_with_its_property() {
    let region = Region::generate(9, 20, 1_000);
    let samples = region.sample_patients();
    assert_eq!(samples.len(), 6);

    let typical = region.record(&sample(&region, Label::Typical)).unwrap();
    let gp = &typical.demographics.gp_ods;
    assert!(typical.items_at(gp).count() > 0);
    assert!(
        typical
            .items
            .iter()
            .any(|i| i.source.as_str().starts_with('R'))
    );
    assert!(!typical.demographics.restricted);
    assert!(typical.items.iter().all(|i| !i.confidential
        && !matches!(i.detail, Detail::Consent)
        && !SENSITIVE_CODES.contains(&i.code.code)));

    let dissent = region.record(&sample(&region, Label::Dissent)).unwrap();
    let gp = &dissent.demographics.gp_ods;
    assert!(
        dissent
            .items_at(gp)
            .any(|i| i.code.code == "416409005" && matches!(i.detail, Detail::Consent))
    );

    let sensitive = region.record(&sample(&region, Label::Sensitive)).unwrap();
    let gp = &sensitive.demographics.gp_ods;
    assert!(
        sensitive
            .items_at(gp)
            .any(|i| SENSITIVE_CODES.contains(&i.code.code))
    );
    assert!(sensitive.items_at(gp).any(|i| i.confidential));

    let restricted = region.record(&sample(&region, Label::Restricted)).unwrap();
    assert!(restricted.demographics.restricted);

    let duplicated = region.record(&sample(&region, Label::Duplicated)).unwrap();
    assert!(has_shared_diagnosis(&duplicated));

    let social = sample(&region, Label::SocialCare);
    let council = region.summary(&social).unwrap().council.clone().unwrap();
    let record = region.record(&social).unwrap();
    assert!(
        record
            .items_at(&council)
            .any(|i| matches!(i.detail, Detail::Document { .. }))
    );
}

fn has_shared_diagnosis(record: &super::model::PatientRecord) -> bool {
    let gp = &record.demographics.gp_ods;
    record.items_at(gp).any(|g| {
        matches!(g.detail, Detail::Condition { .. })
            && record.items.iter().any(|t| {
                &t.source != gp
                    && matches!(t.detail, Detail::Condition { .. })
                    && t.code == g.code
                    && t.recorded == g.recorded
            })
    })
}

#[test]
fn labels_match_records_across_the_region() {
    let region = Region::generate(3, 20, 2_000);
    let mut duplicated_typical = 0;
    let mut typical = 0;
    for p in region.patients() {
        let record = region.record(&p.nhs_number).unwrap();
        assert_eq!(record.demographics.gp_ods, p.gp);
        assert_eq!(p.has(Label::Duplicated), has_shared_diagnosis(&record));
        assert_eq!(p.has(Label::Restricted), record.demographics.restricted);
        assert_eq!(p.has(Label::SocialCare), p.council.is_some());
        assert_eq!(
            p.has(Label::Dissent),
            record
                .items
                .iter()
                .any(|i| matches!(i.detail, Detail::Consent))
        );
        assert!(p.trusts.len() <= 3);
        if p.has(Label::Typical) {
            typical += 1;
            duplicated_typical += usize::from(p.has(Label::Duplicated));
        }
    }
    for label in [
        Label::Dissent,
        Label::Sensitive,
        Label::Restricted,
        Label::SocialCare,
    ] {
        assert!(
            region.patients().iter().filter(|p| p.has(label)).count() > 5,
            "{label:?}"
        );
    }
    // A meaningful fraction of ordinary patients exercise de-duplication too.
    assert!(
        duplicated_typical * 5 > typical,
        "{duplicated_typical} of {typical}"
    );
}

#[test]
fn local_ids_are_unique_per_source_and_resolve_back() {
    let region = Region::generate(4, 10, 1_500);
    let mut patient_ids: HashMap<OdsCode, HashSet<String>> = HashMap::new();
    for p in region.patients().iter() {
        let record = region.record(&p.nhs_number).unwrap();
        let mut item_ids: HashMap<&OdsCode, HashSet<&str>> = HashMap::new();
        for item in &record.items {
            assert!(
                item_ids
                    .entry(&item.source)
                    .or_default()
                    .insert(&item.local_id)
            );
            assert!(
                record.local_id(&item.source).is_some(),
                "items only at sources that know the patient"
            );
        }
        for (ods, id) in &record.local_ids {
            assert!(
                patient_ids
                    .entry(ods.clone())
                    .or_default()
                    .insert(id.clone())
            );
            if ods.as_str() != "X26" {
                assert_eq!(region.nhs_number_by_local_id(ods, id), Some(p.nhs_number));
                assert_eq!(
                    region.nhs_number_by_local_id(&OdsCode::new("P99999"), id),
                    None
                );
            }
        }
        for trust in &p.trusts {
            let id = record.local_id(trust).unwrap();
            assert!(id.starts_with(trust.as_str()) && id.len() == trust.as_str().len() + 7);
        }
    }
}

#[tokio::test]
async fn launch_starts_a_distinct_endpoint_per_source_and_they_answer() {
    let region = Arc::new(Region::generate(8, 400, 200));
    let ods = OdsCode::new("P81002");
    let launched = launch(region.clone(), &[(ods.clone(), Fault::Error)])
        .await
        .unwrap();
    assert_eq!(launched.sources.len(), region.sources().len());
    let endpoints: HashSet<_> = launched
        .sources
        .iter()
        .map(|s| s.config.endpoint())
        .collect();
    assert_eq!(endpoints.len(), launched.sources.len());
    assert_eq!(launched.by_ods(&ods).unwrap().fault.get(), Fault::Error);
    assert_eq!(launched.source("pds").unwrap().fault.get(), Fault::None);

    // A typical patient's GP and first trust answer through connectors built from the configs.
    let patient = sample(&region, Label::Typical);
    let summary = region.summary(&patient).unwrap();
    for (ods, hl7v2) in [(&summary.gp, false), (&summary.trusts[0], true)] {
        let s = launched.by_ods(ods).unwrap();
        assert_eq!(
            matches!(s.config, ConnectorConfig::Hl7v2(_)),
            hl7v2,
            "trusts speak HL7 v2, GPs FHIR"
        );
        let c = s
            .config
            .build(&s.spec.id, s.spec.ods.clone(), &s.spec.name, s.spec.kind)
            .unwrap();
        let got = c.fetch(SourceQuery::everything(patient)).await.unwrap();
        assert!(got.resources.len() > 1, "{}", s.spec.id);
    }
}
