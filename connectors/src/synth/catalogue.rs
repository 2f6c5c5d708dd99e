//! The fixed tables the generator draws from: organisations, places, names and coded content.
//!
//! Organisations are Lancashire and South Cumbria's five trusts (real names and ODS codes);
//! practices, councils' codes and the private provider are synthetic. Clinical codes are
//! SNOMED CT (dm+d for medicines); phone numbers come from Ofcom's drama ranges.

use super::model::Code;

/// The five trusts: ODS code, name, the towns they mainly serve (indexes into [`TOWNS`];
/// empty: region-wide, as the mental health and community trust is).
pub const TRUSTS: [(&str, &str, &[usize]); 5] = [
    (
        "RXL",
        "Blackpool Teaching Hospitals NHS Foundation Trust",
        &[0, 1, 2],
    ),
    (
        "RXN",
        "Lancashire Teaching Hospitals NHS Foundation Trust",
        &[3, 4, 5],
    ),
    ("RXR", "East Lancashire Hospitals NHS Trust", &[6, 7, 8]),
    (
        "RTX",
        "University Hospitals of Morecambe Bay NHS Foundation Trust",
        &[9, 10, 11, 12],
    ),
    (
        "RW5",
        "Lancashire & South Cumbria NHS Foundation Trust",
        &[],
    ),
];

/// The demographics source: NHS England's ODS code for the Personal Demographics Service.
pub const PDS: (&str, &str) = ("X26", "NHS England Personal Demographics Service");

/// Councils with social care systems. The ODS-like codes are synthetic. The first serves
/// Blackpool's towns (indexes into [`TOWNS`]); the second every other town.
pub const COUNCILS: [(&str, &str, &str); 2] = [
    ("blackpool", "LA0BP", "Blackpool Council"),
    ("lancashire", "LA0LC", "Lancashire County Council"),
];
pub const BLACKPOOL_TOWNS: &[usize] = &[0];

/// The private provider (synthetic code and name).
pub const PRIVATE: (&str, &str) = ("NPV01", "Fylde Coast Private Hospital");

/// A town and its postcode districts.
pub struct Town {
    pub name: &'static str,
    pub districts: &'static [&'static str],
}

pub const TOWNS: [Town; 13] = [
    Town {
        name: "Blackpool",
        districts: &["FY1", "FY2", "FY3", "FY4"],
    },
    Town {
        name: "Lytham St Annes",
        districts: &["FY8"],
    },
    Town {
        name: "Fleetwood",
        districts: &["FY7"],
    },
    Town {
        name: "Preston",
        districts: &["PR1", "PR2"],
    },
    Town {
        name: "Chorley",
        districts: &["PR6", "PR7"],
    },
    Town {
        name: "Leyland",
        districts: &["PR25", "PR26"],
    },
    Town {
        name: "Blackburn",
        districts: &["BB1", "BB2"],
    },
    Town {
        name: "Burnley",
        districts: &["BB10", "BB11", "BB12"],
    },
    Town {
        name: "Accrington",
        districts: &["BB5"],
    },
    Town {
        name: "Lancaster",
        districts: &["LA1"],
    },
    Town {
        name: "Morecambe",
        districts: &["LA3", "LA4"],
    },
    Town {
        name: "Kendal",
        districts: &["LA9"],
    },
    Town {
        name: "Barrow-in-Furness",
        districts: &["LA13", "LA14"],
    },
];

pub const STREETS: [&str; 40] = [
    "Marsh Lane",
    "Church Street",
    "Talbot Road",
    "Whitegate Drive",
    "Garstang Road",
    "Fishergate",
    "Moor Lane",
    "Station Road",
    "Preston New Road",
    "Manchester Road",
    "Bolton Road",
    "Accrington Road",
    "Colne Road",
    "Scotland Road",
    "Queen Street",
    "Victoria Road",
    "Park Road",
    "Mill Lane",
    "Clifton Drive",
    "Lord Street",
    "Watling Street Road",
    "Ribbleton Avenue",
    "Blackpool Road",
    "Whalley Road",
    "Bank Top",
    "Hollins Lane",
    "Greaves Road",
    "Bowerham Road",
    "Marine Road",
    "Highfield Road",
    "Stricklandgate",
    "Abbey Road",
    "Dalton Road",
    "Duke Street",
    "Cemetery Road",
    "Waterloo Road",
    "Lytham Road",
    "Poulton Road",
    "Ashton Lane",
    "Kirkham Road",
];

pub const PRACTICE_SUFFIXES: [&str; 5] = [
    "Surgery",
    "Medical Centre",
    "Health Centre",
    "Medical Practice",
    "Family Practice",
];

pub const GIVEN_FEMALE: [&str; 24] = [
    "Olivia", "Amelia", "Isla", "Ava", "Emily", "Sophie", "Grace", "Lily", "Jessica", "Ruby",
    "Margaret", "Susan", "Patricia", "Joan", "Elaine", "Karen", "Hannah", "Aisha", "Fatima",
    "Zainab", "Chloe", "Megan", "Eleanor", "Doris",
];

pub const GIVEN_MALE: [&str; 24] = [
    "Oliver", "George", "Harry", "Jack", "Noah", "Charlie", "Thomas", "Jacob", "William", "James",
    "David", "John", "Peter", "Michael", "Stephen", "Alan", "Brian", "Mohammed", "Imran", "Bilal",
    "Liam", "Ryan", "Daniel", "Arthur",
];

pub const FAMILY: [&str; 40] = [
    "Smith",
    "Jones",
    "Taylor",
    "Brown",
    "Williams",
    "Wilson",
    "Johnson",
    "Davies",
    "Robinson",
    "Wright",
    "Thompson",
    "Evans",
    "Walker",
    "White",
    "Roberts",
    "Green",
    "Hall",
    "Wood",
    "Jackson",
    "Clarke",
    "Ashworth",
    "Hargreaves",
    "Whittaker",
    "Holden",
    "Pilling",
    "Haworth",
    "Duckworth",
    "Singleton",
    "Cornthwaite",
    "Parkinson",
    "Hussain",
    "Patel",
    "Khan",
    "Ali",
    "Begum",
    "Shaw",
    "Fletcher",
    "Kenyon",
    "Nuttall",
    "Tomlinson",
];

pub const CLINICIANS: [&str; 12] = [
    "Dr A Patel",
    "Dr S Hargreaves",
    "Dr J Whittaker",
    "Dr M Khan",
    "Dr R Ashworth",
    "Dr L Fletcher",
    "Dr E Holden",
    "Dr K Singleton",
    "Dr P Nuttall",
    "Dr H Begum",
    "Dr T Kenyon",
    "Dr C Parkinson",
];

/// A long-term condition and what a GP record carries because of it.
pub struct Chronic {
    pub condition: Code,
    pub medication: Option<(Code, &'static str)>,
    /// A monitoring observation: code, unit (UCUM), typical value and spread.
    pub monitoring: Option<(Code, &'static str, f64, f64)>,
}

pub const CHRONIC: [Chronic; 7] = [
    Chronic {
        condition: Code::snomed("44054006", "Type 2 diabetes mellitus"),
        medication: Some((
            Code::snomed("325278007", "Metformin 500mg tablets"),
            "One tablet twice a day with food",
        )),
        monitoring: Some((
            Code::snomed("1049301000000100", "HbA1c level (IFCC standardised)"),
            "mmol/mol",
            58.0,
            12.0,
        )),
    },
    Chronic {
        condition: Code::snomed("38341003", "Hypertensive disorder"),
        medication: Some((
            Code::snomed("319773006", "Amlodipine 5mg tablets"),
            "One tablet once a day",
        )),
        monitoring: Some((
            Code::snomed("271649006", "Systolic blood pressure"),
            "mm[Hg]",
            146.0,
            12.0,
        )),
    },
    Chronic {
        condition: Code::snomed("195967001", "Asthma"),
        medication: Some((
            Code::snomed(
                "39113611000001102",
                "Salbutamol 100micrograms/dose inhaler CFC free",
            ),
            "Two puffs when required",
        )),
        monitoring: None,
    },
    Chronic {
        condition: Code::snomed("13645005", "Chronic obstructive lung disease"),
        medication: None,
        monitoring: Some((
            Code::snomed("431314004", "Peripheral oxygen saturation"),
            "%",
            94.0,
            2.0,
        )),
    },
    Chronic {
        condition: Code::snomed("49436004", "Atrial fibrillation"),
        medication: None,
        monitoring: Some((Code::snomed("364075005", "Heart rate"), "/min", 84.0, 10.0)),
    },
    Chronic {
        condition: Code::snomed("55822004", "Hyperlipidaemia"),
        medication: Some((
            Code::snomed("320000009", "Atorvastatin 20mg tablets"),
            "One tablet at night",
        )),
        monitoring: None,
    },
    Chronic {
        condition: Code::snomed("396275006", "Osteoarthritis"),
        medication: Some((
            Code::snomed("322236009", "Paracetamol 500mg tablets"),
            "Two tablets up to four times a day when required",
        )),
        monitoring: None,
    },
];

pub const DEPRESSION: Code = Code::snomed("35489007", "Depressive disorder");
pub const ANXIETY: Code = Code::snomed("197480006", "Anxiety disorder");

/// Observations anyone may have: code, UCUM unit, typical value, spread.
pub const VITALS: [(Code, &str, f64, f64); 4] = [
    (Code::snomed("27113001", "Body weight"), "kg", 78.0, 14.0),
    (
        Code::snomed("60621009", "Body mass index"),
        "kg/m2",
        27.0,
        4.0,
    ),
    (Code::snomed("364075005", "Heart rate"), "/min", 74.0, 9.0),
    (
        Code::snomed("271649006", "Systolic blood pressure"),
        "mm[Hg]",
        128.0,
        12.0,
    ),
];

pub const ALLERGIES: [(Code, Code); 4] = [
    (
        Code::snomed("91936005", "Allergy to penicillin"),
        Code::snomed("271807003", "Eruption of skin"),
    ),
    (
        Code::snomed("91935009", "Allergy to peanut"),
        Code::snomed("39579001", "Anaphylaxis"),
    ),
    (
        Code::snomed("300916003", "Latex allergy"),
        Code::snomed("126485001", "Urticaria"),
    ),
    (
        Code::snomed("294505008", "Allergy to amoxicillin"),
        Code::snomed("271807003", "Eruption of skin"),
    ),
];

pub const IMMUNISATIONS: [Code; 3] = [
    Code::snomed("822851000000102", "Seasonal influenza vaccination"),
    Code::snomed("12866006", "Pneumococcal vaccination"),
    Code::snomed(
        "1324681000000101",
        "Administration of first dose of SARS-CoV-2 vaccine",
    ),
];

/// Reasons for a hospital stay or attendance.
pub const ACUTE: [Code; 6] = [
    Code::snomed("233604007", "Pneumonia"),
    Code::snomed("68566005", "Urinary tract infectious disease"),
    Code::snomed("29857009", "Chest pain"),
    Code::snomed("128045006", "Cellulitis"),
    Code::snomed("5913000", "Fracture of neck of femur"),
    Code::snomed("22298006", "Myocardial infarction"),
];

pub const PROCEDURES: [Code; 5] = [
    Code::snomed("80146002", "Appendectomy"),
    Code::snomed("38102005", "Cholecystectomy"),
    Code::snomed("52734007", "Total replacement of hip"),
    Code::snomed("73761001", "Colonoscopy"),
    Code::snomed("54885007", "Cataract extraction"),
];

/// What the private provider does.
pub const PRIVATE_PROCEDURES: [Code; 2] = [
    Code::snomed("54885007", "Cataract extraction"),
    Code::snomed("52734007", "Total replacement of hip"),
];

pub const ADMISSION: Code = Code::snomed("32485007", "Hospital admission");
pub const OUTPATIENT: Code = Code::snomed("11429006", "Consultation");
pub const EMERGENCY: Code = Code::snomed("4525004", "Emergency department patient visit");
pub const HOME_VISIT: Code = Code::snomed("439708006", "Home visit");

pub const WARDS: [&str; 6] = [
    "Ward 12",
    "Ward 23",
    "Acute Medical Unit",
    "Surgical Assessment Unit",
    "Ward 5",
    "Coronary Care Unit",
];
pub const CLINICS: [&str; 4] = [
    "Diabetes Clinic",
    "Cardiology Outpatients",
    "Orthopaedic Clinic",
    "Respiratory Clinic",
];

pub const SOCIAL_CARE_STAFF: [&str; 3] = [
    "A Whittaker (Social Worker)",
    "J Hussain (Social Worker)",
    "K Pilling (Occupational Therapist)",
];

pub const DISCHARGE_SUMMARY: Code = Code::snomed("373942005", "Discharge summary");
pub const CARE_PLAN: Code = Code::snomed("734163000", "Care plan");
pub const ASSESSMENT_REPORT: Code = Code::snomed("371531000", "Report of clinical encounter");

pub const DISSENT: Code = Code::snomed(
    "416409005",
    "Refused consent for upload to local shared electronic record",
);

/// The RCGP exclusion sets' codes the policy code sets match.
pub const STI: Code = Code::snomed("8098009", "Sexually transmitted infectious disease");
pub const TERMINATION: Code = Code::snomed("57797005", "Termination of pregnancy");
pub const IVF: Code = Code::snomed("52637005", "In vitro fertilization");
pub const GENDER_REASSIGNMENT: Code = Code::snomed("407377005", "Female-to-male transsexual");
