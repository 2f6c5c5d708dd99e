//! The region generator: sources and a small summary per patient up front, each patient's
//! full record built on demand from (seed, patient index).
//!
//! # Why on demand
//! A demo region has 10,000 patients and a load test many more; materialising every record
//! would cost memory and start-up time for records nobody asks for. Every random choice
//! comes from a `StdRng` seeded from the region seed and the patient index alone, so a record
//! is the same whenever (and in whatever order) it is built.

use std::{collections::HashMap, fmt};

use rand::{Rng, SeedableRng, rngs::StdRng};

use super::{
    catalogue::{self as cat, Chronic},
    model::{
        Address, Code, Date, DateTime, Demographics, Detail, EncounterDetail, Gender, Item, Label,
        PatientRecord, Protocol, Records, SourceSpec,
    },
};
use crate::{contract::OdsCode, contract::SourceKind, nhs::NhsNumber};

/// The day the synthetic region's history ends (records never go past it), so that a seed
/// gives the same region on any day.
const TODAY: Date = Date {
    year: 2026,
    month: 10,
    day: 31,
};

/// Order of the sources: the demographics source, the trusts, the practices, the councils,
/// the private provider.
const FIRST_TRUST: usize = 1;
const FIRST_PRACTICE: usize = FIRST_TRUST + cat::TRUSTS.len();

/// What the region knows about a patient without building their record: enough for the CLI
/// (`--patients-out`), for tests to pick patients, and to build the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatientSummary {
    pub nhs_number: NhsNumber,
    pub labels: Vec<Label>,
    /// The registered practice.
    pub gp: OdsCode,
    /// The trusts that have seen the patient (0 to 3).
    pub trusts: Vec<OdsCode>,
    pub council: Option<OdsCode>,
    pub private_provider: Option<OdsCode>,
    practice: usize,
}

impl PatientSummary {
    pub fn has(&self, label: Label) -> bool {
        self.labels.contains(&label)
    }
}

/// A deterministic synthetic region: Lancashire and South Cumbria's trusts, `practices` GP
/// practices, two councils, a private provider, a demographics service, and patients.
pub struct Region {
    seed: u64,
    sources: Vec<SourceSpec>,
    /// Index into [`cat::TOWNS`] of each practice's town.
    practice_towns: Vec<usize>,
    patients: Vec<PatientSummary>,
    by_nhs: HashMap<NhsNumber, usize>,
    by_local_id: HashMap<String, usize>,
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Region")
            .field("seed", &self.seed)
            .field("sources", &self.sources.len())
            .field("patients", &self.patients.len())
            .finish()
    }
}

/// The labels [`Region::sample_patients`] gives one patient each, in this order.
const SAMPLE_LABELS: [Label; 6] = [
    Label::Typical,
    Label::Dissent,
    Label::Sensitive,
    Label::Restricted,
    Label::Duplicated,
    Label::SocialCare,
];

impl Region {
    /// Builds a region. The first six patients are one of each [`SAMPLE_LABELS`] archetype
    /// (so every label is present whenever `patients >= 6`); the rest are drawn at random.
    /// `practices` is at least 1.
    pub fn generate(seed: u64, practices: usize, patients: usize) -> Region {
        let practices = practices.max(1);
        let (sources, practice_towns) = sources(practices);
        let mut region = Region {
            seed,
            sources,
            practice_towns,
            patients: Vec::with_capacity(patients),
            by_nhs: HashMap::with_capacity(patients),
            by_local_id: HashMap::with_capacity(patients * 3),
        };
        let mut numbers = nhs_numbers(seed);
        for idx in 0..patients {
            let Some(nhs_number) = numbers.next() else {
                break; // the 999 range is exhausted (over 900,000 patients)
            };
            let summary = region.summarise(idx, nhs_number);
            region.by_nhs.insert(nhs_number, idx);
            for (ods, local) in region.local_ids(idx, &summary) {
                if ods.as_str() != cat::PDS.0 {
                    region.by_local_id.insert(local, idx);
                }
            }
            region.patients.push(summary);
        }
        region
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Every source, demographics first, then trusts, practices, councils, private provider.
    pub fn sources(&self) -> &[SourceSpec] {
        &self.sources
    }

    /// Every patient's summary, in generation order.
    pub fn patients(&self) -> &[PatientSummary] {
        &self.patients
    }

    pub fn summary(&self, nhs_number: &NhsNumber) -> Option<&PatientSummary> {
        self.by_nhs.get(nhs_number).map(|&i| &self.patients[i])
    }

    /// One patient per label (Typical, Dissent, Sensitive, Restricted, Duplicated, SocialCare),
    /// the same for the same seed. The Typical one carries no other label.
    pub fn sample_patients(&self) -> Vec<(NhsNumber, Label)> {
        SAMPLE_LABELS
            .into_iter()
            .filter_map(|label| {
                let pure = self.patients.iter().find(|p| p.labels == [label]);
                pure.or_else(|| self.patients.iter().find(|p| p.has(label)))
                    .map(|p| (p.nhs_number, label))
            })
            .collect()
    }

    fn summarise(&self, idx: usize, nhs_number: NhsNumber) -> PatientSummary {
        let mut rng = stream(self.seed, idx, 1);
        let practice = rng.random_range(0..self.practice_towns.len());
        let town = self.practice_towns[practice];
        let mut trusts = Vec::new();
        let seen_at = match rng.random_range(0..100u32) {
            0..20 => 0,
            20..65 => 1,
            65..90 => 2,
            _ => 3,
        };
        if seen_at > 0 {
            trusts.push(local_trust(town));
        }
        while trusts.len() < seen_at {
            let t = rng.random_range(0..cat::TRUSTS.len());
            if !trusts.contains(&t) {
                trusts.push(t);
            }
        }
        let mut council = rng.random_bool(0.12);
        let mut private = rng.random_bool(0.03);
        let mut dissent = rng.random_bool(0.02);
        let mut sensitive = rng.random_bool(0.05);
        let mut restricted = rng.random_bool(0.01);
        let mut duplicated = !trusts.is_empty() && rng.random_bool(0.3);

        // The archetypes sample_patients names.
        if let Some(&archetype) = SAMPLE_LABELS.get(idx) {
            if trusts.is_empty() {
                trusts.push(local_trust(town));
            }
            council = archetype == Label::SocialCare;
            private = false;
            dissent = archetype == Label::Dissent;
            sensitive = archetype == Label::Sensitive;
            restricted = archetype == Label::Restricted;
            duplicated = archetype == Label::Duplicated;
        }

        let mut labels = Vec::new();
        if !dissent && !sensitive && !restricted && !trusts.is_empty() {
            labels.push(Label::Typical);
        }
        for (flag, label) in [
            (dissent, Label::Dissent),
            (sensitive, Label::Sensitive),
            (restricted, Label::Restricted),
            (duplicated, Label::Duplicated),
            (council, Label::SocialCare),
        ] {
            if flag {
                labels.push(label);
            }
        }
        let council_idx = usize::from(!cat::BLACKPOOL_TOWNS.contains(&town));
        PatientSummary {
            nhs_number,
            labels,
            gp: self.sources[FIRST_PRACTICE + practice].ods.clone(),
            trusts: trusts
                .into_iter()
                .map(|t| OdsCode::new(cat::TRUSTS[t].0))
                .collect(),
            council: council.then(|| OdsCode::new(cat::COUNCILS[council_idx].1)),
            private_provider: private.then(|| OdsCode::new(cat::PRIVATE.0)),
            practice,
        }
    }

    /// The patient's id at every source that knows them. Pure functions of (seed, index), each
    /// unique within its source and, by its shape or ODS prefix, across sources (one lookup
    /// table serves them all); the demographics source uses the NHS number, as PDS does.
    fn local_ids(&self, idx: usize, s: &PatientSummary) -> Vec<(OdsCode, String)> {
        let i = idx as u64;
        let mut ids = vec![
            (OdsCode::new(cat::PDS.0), s.nhs_number.expose()),
            (s.gp.clone(), gp_uuid(self.seed, i)),
        ];
        for ods in &s.trusts {
            let salt = splitmix(self.seed ^ hash_str(ods.as_str()));
            ids.push((
                ods.clone(),
                format!("{ods}{}", permuted(i, salt, 1_000_000, 9_000_000)),
            ));
        }
        if let Some(ods) = &s.council {
            let salt = splitmix(self.seed ^ hash_str(ods.as_str()));
            ids.push((
                ods.clone(),
                format!("{ods}-{}", permuted(i, salt, 10_000_000, 90_000_000)),
            ));
        }
        if let Some(ods) = &s.private_provider {
            ids.push((
                ods.clone(),
                format!("{ods}-{}", permuted(i, self.seed, 100_000, 900_000)),
            ));
        }
        ids
    }

    fn build(&self, idx: usize) -> PatientRecord {
        let s = &self.patients[idx];
        let mut rng = stream(self.seed, idx, 2);
        let local_ids = self.local_ids(idx, s);
        let demographics = self.demographics(&mut rng, s);
        let born = day_number(demographics.birth_date);
        let mut b = Builder {
            rng,
            items: Vec::new(),
            born,
            // Ten years of history, or since birth.
            from: born.max(day_number(TODAY) - 3650),
            to: day_number(TODAY),
            at: OdsCode::new(""),
            patient: String::new(),
            next: 1,
        };
        let shared = b.gp_record(&local_ids, s, demographics.gender);
        for (n, ods) in s.trusts.iter().enumerate() {
            b.trust_record(&local_ids, ods, &shared);
            // The shared diagnosis exists only for patients labelled Duplicated: the trust's
            // PAS holds it (DG1) and the GP coded it from the discharge letter.
            if let (0, Some(dx)) = (n, &shared.diagnosis) {
                b.add(
                    dx.code.clone(),
                    dx.recorded,
                    Detail::Condition { active: true },
                );
            }
        }
        if let Some(ods) = &s.council {
            b.council_record(&local_ids, ods);
        }
        if let Some(ods) = &s.private_provider {
            b.private_record(&local_ids, ods);
        }
        PatientRecord {
            demographics,
            local_ids,
            items: b.items,
        }
    }

    fn demographics(&self, rng: &mut StdRng, s: &PatientSummary) -> Demographics {
        let gender = match rng.random_range(0..100u32) {
            0..49 => Gender::Female,
            49..98 => Gender::Male,
            98 => Gender::Other,
            _ => Gender::Unknown,
        };
        let given = match gender {
            Gender::Female => pick(rng, &cat::GIVEN_FEMALE),
            Gender::Male => pick(rng, &cat::GIVEN_MALE),
            Gender::Other | Gender::Unknown => {
                if rng.random_bool(0.5) {
                    pick(rng, &cat::GIVEN_FEMALE)
                } else {
                    pick(rng, &cat::GIVEN_MALE)
                }
            }
        };
        // Patients with items from the sexual-health sets are adults.
        let youngest = if s.has(Label::Sensitive) { 18 * 365 } else { 0 };
        let age_days = rng.random_range(youngest..95 * 365);
        let town = &cat::TOWNS[self.practice_towns[s.practice]];
        const LETTERS: &[u8] = b"ABDEFGHJLNPQRSTUWXYZ";
        let postcode = format!(
            "{} {}{}{}",
            pick(rng, town.districts),
            rng.random_range(1..10u32),
            char::from(pick(rng, LETTERS)),
            char::from(pick(rng, LETTERS)),
        );
        let phone = if rng.random_bool(0.5) {
            format!("07700 900{:03}", rng.random_range(0..1000u32))
        } else {
            format!("01632 960{:03}", rng.random_range(0..1000u32))
        };
        Demographics {
            nhs_number: s.nhs_number,
            given: given.to_owned(),
            family: pick(rng, &cat::FAMILY).to_owned(),
            gender,
            birth_date: date_of(day_number(TODAY) - age_days),
            address: Address {
                lines: vec![format!(
                    "{} {}",
                    rng.random_range(1..250u32),
                    pick(rng, &cat::STREETS)
                )],
                city: town.name.to_owned(),
                postcode,
            },
            phone,
            gp_ods: s.gp.clone(),
            restricted: s.has(Label::Restricted),
        }
    }
}

impl Records for Region {
    fn record(&self, nhs_number: &NhsNumber) -> Option<PatientRecord> {
        self.by_nhs.get(nhs_number).map(|&i| self.build(i))
    }

    fn nhs_number_by_local_id(&self, ods: &OdsCode, local_id: &str) -> Option<NhsNumber> {
        let &idx = self.by_local_id.get(local_id)?;
        let s = &self.patients[idx];
        self.local_ids(idx, s)
            .iter()
            .any(|(o, id)| o == ods && id == local_id)
            .then_some(s.nhs_number)
    }
}

/// The region's sources and each practice's town.
fn sources(practices: usize) -> (Vec<SourceSpec>, Vec<usize>) {
    let spec = |id: String, ods: &str, name: String, kind, protocol| SourceSpec {
        id,
        ods: OdsCode::new(ods),
        name,
        kind,
        protocol,
    };
    let mut out = vec![spec(
        "pds".into(),
        cat::PDS.0,
        cat::PDS.1.into(),
        SourceKind::Demographics,
        Protocol::Fhir,
    )];
    for (ods, name, _) in cat::TRUSTS {
        out.push(spec(
            format!("trust-{}", ods.to_lowercase()),
            ods,
            name.into(),
            SourceKind::Trust,
            Protocol::Hl7v2,
        ));
    }
    let mut towns = Vec::with_capacity(practices);
    for p in 0..practices {
        // Lancashire's practices are P81xxx; past 999 carry on into P82xxx and beyond.
        let ods = format!("P{}{:03}", 81 + (p + 1) / 1000, (p + 1) % 1000);
        let street = cat::STREETS[p % cat::STREETS.len()];
        let suffix =
            cat::PRACTICE_SUFFIXES[(p / cat::STREETS.len()) % cat::PRACTICE_SUFFIXES.len()];
        let town = (p * 7 + p / cat::STREETS.len()) % cat::TOWNS.len();
        let name = if p < cat::STREETS.len() * cat::PRACTICE_SUFFIXES.len() {
            format!("{street} {suffix}")
        } else {
            format!("{street} {suffix}, {}", cat::TOWNS[town].name)
        };
        out.push(spec(
            format!("gp-{}", ods.to_lowercase()),
            &ods,
            name,
            SourceKind::GpPractice,
            Protocol::Fhir,
        ));
        towns.push(town);
    }
    for (key, ods, name) in cat::COUNCILS {
        out.push(spec(
            format!("council-{key}"),
            ods,
            name.into(),
            SourceKind::Council,
            Protocol::Fhir,
        ));
    }
    out.push(spec(
        format!("private-{}", cat::PRIVATE.0.to_lowercase()),
        cat::PRIVATE.0,
        cat::PRIVATE.1.into(),
        SourceKind::PrivateProvider,
        Protocol::Fhir,
    ));
    (out, towns)
}

/// Index into [`cat::TRUSTS`] of the acute trust serving a town.
fn local_trust(town: usize) -> usize {
    cat::TRUSTS
        .iter()
        .position(|(_, _, towns)| towns.contains(&town))
        .unwrap_or(0)
}

/// Distinct valid NHS numbers in the 999 test range: a seed-chosen start, then a stride
/// coprime with 10^6 (so no repeats), skipping the nine-digit stems with no check digit.
fn nhs_numbers(seed: u64) -> impl Iterator<Item = NhsNumber> {
    let start = splitmix(seed) % 1_000_000;
    (0..1_000_000u64).filter_map(move |k| {
        let stem = 999_000_000 + (start + k * 7_919) % 1_000_000;
        NhsNumber::from_nine(stem as u32)
    })
}

/// A number in `base..base+modulus`, unique per `i` for `i < modulus` (7919 is prime and
/// divides none of the moduli used).
fn permuted(i: u64, salt: u64, base: u64, modulus: u64) -> u64 {
    base + (i * 7_919 + salt % modulus) % modulus
}

/// A UUID-shaped id whose last group is a bijection of the index (an odd multiplier and an
/// offset, modulo 2^48), so ids never repeat.
fn gp_uuid(seed: u64, i: u64) -> String {
    let h = splitmix(seed ^ i.wrapping_mul(0xA24B_AED4_963E_E407));
    let tail = i
        .wrapping_mul(0x0005_DEEC_E66D)
        .wrapping_add(splitmix(seed))
        & 0xFFFF_FFFF_FFFF;
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{tail:012x}",
        h >> 32,
        (h >> 16) & 0xFFFF,
        h & 0xFFF,
        0x8000 | ((h >> 12) & 0x3FFF),
    )
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn hash_str(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3)
    })
}

/// The random stream for one purpose of one patient.
fn stream(seed: u64, idx: usize, purpose: u64) -> StdRng {
    StdRng::seed_from_u64(splitmix(seed ^ splitmix((idx as u64) << 4 | purpose)))
}

fn pick<T: Clone>(rng: &mut StdRng, from: &[T]) -> T {
    from[rng.random_range(0..from.len())].clone()
}

/// A value around `mean`, rounded to one decimal place.
fn around(rng: &mut StdRng, mean: f64, spread: f64) -> f64 {
    let noise: f64 = (0..3).map(|_| rng.random::<f64>()).sum::<f64>() - 1.5;
    ((mean + spread * noise) * 10.0).round() / 10.0
}

/// Days since 1970-01-01 (Howard Hinnant's `days_from_civil`).
fn day_number(d: Date) -> i64 {
    let (m, y) = (
        i64::from(d.month),
        i64::from(d.year) - i64::from(d.month <= 2),
    );
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + i64::from(d.day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number (`civil_from_days`).
fn date_of(days: i64) -> Date {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as u16;
    Date { year, month, day }
}

/// What the GP record shares with the trusts' records.
struct Shared {
    conditions: Vec<Code>,
    allergy: Option<(Code, Code)>,
    /// A diagnosis a trust also records, at the same time (patients labelled Duplicated).
    diagnosis: Option<Item>,
}

/// Builds one patient's items, one source at a time.
struct Builder {
    rng: StdRng,
    items: Vec<Item>,
    born: i64,
    /// The history's first and last day.
    from: i64,
    to: i64,
    /// The source whose items are being built, the patient's local id there, and the next
    /// item number (item ids are `{local id}-{n}`, so unique within the source).
    at: OdsCode,
    patient: String,
    next: u32,
}

impl Builder {
    fn start(&mut self, local_ids: &[(OdsCode, String)], ods: &OdsCode) {
        self.at = ods.clone();
        self.patient = local_ids
            .iter()
            .find(|(o, _)| o == ods)
            .map(|(_, id)| id.clone())
            .unwrap_or_default();
        self.next = 1;
    }

    /// Adds an item at the current source.
    fn add(&mut self, code: Code, at: DateTime, detail: Detail) -> &mut Item {
        let local_id = format!("{}-{}", self.patient, self.next);
        self.next += 1;
        self.items.push(Item {
            source: self.at.clone(),
            local_id,
            code,
            recorded: at,
            confidential: false,
            detail,
        });
        let last = self.items.len() - 1;
        &mut self.items[last]
    }

    /// Adds an encounter of `minutes` from `start`; returns its end.
    fn encounter(
        &mut self,
        code: Code,
        class: &'static str,
        start: DateTime,
        minutes: i64,
        location: String,
        attending: String,
    ) -> DateTime {
        let end = plus_minutes(start, minutes);
        let visit_number = format!("{}-V{}", self.patient, self.next);
        let detail = EncounterDetail {
            class,
            end: Some(end),
            location,
            attending,
            visit_number,
        };
        self.add(code, start, Detail::Encounter(detail));
        end
    }

    fn between(&mut self, from: i64, to: i64) -> DateTime {
        let day = if from < to {
            self.rng.random_range(from..=to)
        } else {
            from
        };
        DateTime {
            date: date_of(day),
            hour: self.rng.random_range(8..18u8),
            minute: self.rng.random_range(0..12u8) * 5,
        }
    }

    fn any_time(&mut self) -> DateTime {
        self.between(self.from, self.to)
    }

    /// The autumn (flu season) of `t`'s year, when that falls inside the history.
    fn flu_season(&mut self, t: DateTime) -> DateTime {
        let date = Date {
            year: t.date.year,
            month: self.rng.random_range(10..12u8),
            day: self.rng.random_range(1..29u8),
        };
        if (self.from..=self.to).contains(&day_number(date)) {
            DateTime { date, ..t }
        } else {
            t
        }
    }

    fn clinician(&mut self) -> String {
        pick(&mut self.rng, &cat::CLINICIANS).to_owned()
    }

    fn gp_record(
        &mut self,
        local_ids: &[(OdsCode, String)],
        s: &PatientSummary,
        gender: Gender,
    ) -> Shared {
        self.start(local_ids, &s.gp);
        let age_years = (self.to - self.born) / 365;
        let chronic_count = match age_years {
            0..18 => 0,
            18..30 => self.rng.random_range(0..2usize),
            30..60 => self.rng.random_range(0..3usize),
            _ => self.rng.random_range(1..4usize),
        };
        let mut chronic: Vec<&Chronic> = Vec::new();
        while chronic.len() < chronic_count {
            let c = &cat::CHRONIC[self.rng.random_range(0..cat::CHRONIC.len())];
            if !chronic.iter().any(|k| k.condition == c.condition) {
                chronic.push(c);
            }
        }
        let mut conditions = Vec::new();
        let mut diagnosis = None;
        for c in chronic {
            let onset = self.any_time();
            let since = day_number(onset.date);
            let item = self
                .add(
                    c.condition.clone(),
                    onset,
                    Detail::Condition { active: true },
                )
                .clone();
            diagnosis.get_or_insert(item);
            conditions.push(c.condition.clone());
            if let Some((med, dose)) = &c.medication {
                let at = self.between(since, self.to);
                let dose = (*dose).to_owned();
                self.add(med.clone(), at, Detail::Medication { dose });
            }
            if let Some((code, unit, mean, spread)) = &c.monitoring {
                for _ in 0..self.rng.random_range(1..4u32) {
                    let at = self.between(since, self.to);
                    let value = around(&mut self.rng, *mean, *spread);
                    self.add(code.clone(), at, Detail::Observation { value, unit });
                }
            }
        }
        for _ in 0..self.rng.random_range(1..3u32) {
            let (code, unit, mean, spread) = pick(&mut self.rng, &cat::VITALS);
            let at = self.any_time();
            let value = around(&mut self.rng, mean, spread);
            self.add(code, at, Detail::Observation { value, unit });
        }
        let allergy = self
            .rng
            .random_bool(0.2)
            .then(|| pick(&mut self.rng, &cat::ALLERGIES));
        if let Some((code, reaction)) = &allergy {
            let at = self.any_time();
            let reaction = reaction.clone();
            self.add(code.clone(), at, Detail::Allergy { reaction });
        }
        for _ in 0..self.rng.random_range(1..3u32) {
            let at = self.any_time();
            let doctor = self.clinician();
            let room = format!("Consulting Room {}", self.rng.random_range(1..6u32));
            self.encounter(cat::OUTPATIENT, "AMB", at, 15, room, doctor);
        }
        if diagnosis.is_none() && s.has(Label::Duplicated) {
            let at = self.any_time();
            let code = cat::CHRONIC[0].condition.clone();
            diagnosis = Some(
                self.add(code, at, Detail::Condition { active: true })
                    .clone(),
            );
        }
        // Older patients and those with long-term conditions have more immunisations.
        let jabs = if age_years >= 65 || !conditions.is_empty() {
            2
        } else {
            1
        };
        for _ in 0..jabs {
            let code = pick(&mut self.rng, &cat::IMMUNISATIONS);
            let mut at = self.any_time();
            if code == cat::IMMUNISATIONS[0] {
                at = self.flu_season(at);
            }
            self.add(code, at, Detail::Immunization);
        }
        if self.rng.random_bool(0.08) {
            let code = pick(&mut self.rng, &[cat::DEPRESSION, cat::ANXIETY]);
            let at = self.any_time();
            self.add(code, at, Detail::Condition { active: true });
        }
        if s.has(Label::Dissent) {
            let at = self.any_time();
            self.add(cat::DISSENT, at, Detail::Consent);
        }
        if s.has(Label::Sensitive) {
            let mut choices = vec![cat::STI, cat::IVF, cat::GENDER_REASSIGNMENT];
            if gender == Gender::Female {
                choices.push(cat::TERMINATION);
            }
            let code = pick(&mut self.rng, &choices);
            let detail = if code == cat::TERMINATION || code == cat::IVF {
                Detail::Procedure
            } else {
                Detail::Condition {
                    active: code != cat::STI,
                }
            };
            let at = self.any_time();
            self.add(code, at, detail);
            // A practice-confidential entry, as GP Connect marks with NOPAT.
            let at = self.any_time();
            self.add(cat::DEPRESSION, at, Detail::Condition { active: true })
                .confidential = true;
        }
        Shared {
            conditions,
            allergy,
            diagnosis: diagnosis.filter(|_| s.has(Label::Duplicated)),
        }
    }

    /// What a PAS holds: encounters (PV1), diagnoses (DG1), procedures (PR1), observations
    /// (OBX), allergies (AL1), and discharge summaries.
    fn trust_record(&mut self, local_ids: &[(OdsCode, String)], ods: &OdsCode, shared: &Shared) {
        self.start(local_ids, ods);
        if ods.as_str() == "RW5" {
            for _ in 0..self.rng.random_range(1..3u32) {
                let at = self.any_time();
                let doctor = self.clinician();
                let team = "Community Mental Health Team".to_owned();
                self.encounter(cat::OUTPATIENT, "AMB", at, 60, team, doctor);
            }
            let code = pick(&mut self.rng, &[cat::DEPRESSION, cat::ANXIETY]);
            let at = self.any_time();
            self.add(code, at, Detail::Condition { active: true });
            return;
        }
        for _ in 0..self.rng.random_range(1..4u32) {
            let start = self.any_time();
            let doctor = self.clinician();
            let (code, class, minutes, place) = match self.rng.random_range(0..100u32) {
                0..35 => {
                    let minutes = self.rng.random_range(1..10i64) * 1440 + 120;
                    let ward = pick(&mut self.rng, &cat::WARDS);
                    (cat::ADMISSION, "IMP", minutes, ward)
                }
                35..80 => {
                    let clinic = pick(&mut self.rng, &cat::CLINICS);
                    (cat::OUTPATIENT, "AMB", 40, clinic)
                }
                _ => {
                    let minutes = self.rng.random_range(2..7i64) * 60;
                    (cat::EMERGENCY, "EMER", minutes, "Emergency Department")
                }
            };
            let end = self.encounter(code, class, start, minutes, place.to_owned(), doctor);
            // The reason: an acute problem, or at a clinic a condition the GP also records.
            let reason = match shared.conditions.first() {
                Some(c) if class == "AMB" => c.clone(),
                _ => pick(&mut self.rng, &cat::ACUTE),
            };
            self.add(reason, start, Detail::Condition { active: false });
            // Observations taken on arrival.
            let (code, unit, mean, spread) = pick(&mut self.rng, &cat::VITALS);
            let value = around(&mut self.rng, mean, spread);
            self.add(
                code,
                plus_minutes(start, 10),
                Detail::Observation { value, unit },
            );
            if class == "IMP" {
                if self.rng.random_bool(0.4) {
                    let code = pick(&mut self.rng, &cat::PROCEDURES);
                    self.add(code, plus_minutes(start, 1440), Detail::Procedure);
                }
                let title = "Discharge summary".to_owned();
                self.add(cat::DISCHARGE_SUMMARY, end, Detail::Document { title });
            }
        }
        if let Some((code, reaction)) = &shared.allergy
            && self.rng.random_bool(0.5)
        {
            let at = self.any_time();
            let reaction = reaction.clone();
            self.add(code.clone(), at, Detail::Allergy { reaction });
        }
    }

    fn council_record(&mut self, local_ids: &[(OdsCode, String)], ods: &OdsCode) {
        self.start(local_ids, ods);
        let at = self.any_time();
        let worker = pick(&mut self.rng, &cat::SOCIAL_CARE_STAFF).to_owned();
        let end = self.encounter(cat::HOME_VISIT, "HH", at, 90, "Home".into(), worker);
        let title = "Care Act needs assessment".to_owned();
        self.add(cat::ASSESSMENT_REPORT, end, Detail::Document { title });
        if self.rng.random_bool(0.6) {
            let later = self.between(day_number(at.date), self.to);
            let title = "Care and support plan".to_owned();
            self.add(cat::CARE_PLAN, later, Detail::Document { title });
        }
    }

    fn private_record(&mut self, local_ids: &[(OdsCode, String)], ods: &OdsCode) {
        self.start(local_ids, ods);
        let at = self.any_time();
        let doctor = self.clinician();
        self.encounter(
            cat::OUTPATIENT,
            "AMB",
            at,
            240,
            "Day Case Unit".into(),
            doctor,
        );
        let code = pick(&mut self.rng, &cat::PRIVATE_PROCEDURES);
        self.add(code, plus_minutes(at, 60), Detail::Procedure);
    }
}

fn plus_minutes(t: DateTime, minutes: i64) -> DateTime {
    let total = day_number(t.date) * 1440 + i64::from(t.hour) * 60 + i64::from(t.minute) + minutes;
    DateTime {
        date: date_of(total.div_euclid(1440)),
        hour: (total.rem_euclid(1440) / 60) as u8,
        minute: (total.rem_euclid(60)) as u8,
    }
}
