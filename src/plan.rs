//! The plan: which sources to ask for a patient.
//!
//! **Locate** (the default) asks the demographics service first, as the NHS finds a patient's
//! GP through PDS, then the registered GP practice and every trust, council and private
//! provider in parallel; the other practices are not asked. A restricted patient's GP is never
//! asked. When demographics cannot answer, locate falls back to **broadcast**: every source.

use serde::Deserialize;

use connectors::{OdsCode, SourceKind};

use crate::fanout::Source;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlanMode {
    Locate,
    Broadcast,
}

/// What demographics said, when it answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Located {
    /// Demographics knows the patient.
    Found {
        registered_gp: Option<OdsCode>,
        restricted: bool,
    },
    /// Demographics answered that it does not know the patient.
    Unknown,
    /// Demographics did not answer (or there is none): broadcast.
    Unavailable,
}

/// The clinical sources to ask, given what demographics said.
pub fn clinical_sources<'a>(sources: &'a [Source], located: &Located) -> Vec<&'a Source> {
    sources
        .iter()
        .filter(|s| match s.descriptor.kind {
            SourceKind::Demographics => false,
            SourceKind::GpPractice => match located {
                Located::Found {
                    registered_gp,
                    restricted,
                } => !restricted && registered_gp.as_ref() == Some(&s.descriptor.ods),
                Located::Unknown => false,
                Located::Unavailable => true,
            },
            SourceKind::Trust | SourceKind::Council | SourceKind::PrivateProvider => {
                !matches!(located, Located::Unknown)
            }
        })
        .collect()
}
