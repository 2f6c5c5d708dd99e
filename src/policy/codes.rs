//! Code sets (dissent codes, the RCGP sensitive categories) read from `policies/codesets/*.toml`,
//! and the functions that find codes and practice-confidential marks in a FHIR resource.
//!
//! # Why match on the code alone
//! The same concept reaches us as SNOMED CT from one system and Read v2 or CTV3 from another,
//! and some systems send a wrong or missing `system`. Dissent and sensitivity are about not
//! leaking, so a code matches whatever `system` it carries: a false match withholds too much,
//! a missed match leaks. SNOMED ids are digits and Read codes end in `.`, so they do not collide.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::Deserialize;
use serde_json::Value;

use super::diagnostic::Diagnostic;

/// `meta.security` code GP Connect uses to mark a practice-confidential item.
pub const NOPAT: &str = "NOPAT";
pub const ACT_CODE_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
/// The category name every practice-confidential item carries as well.
pub const PRACTICE_CONFIDENTIAL: &str = "practice-confidential";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CodeSetKind {
    /// A patient with one of these codes at their GP has dissented from sharing.
    Dissent,
    /// Items carrying one of these codes belong to a sensitive category.
    Sensitive,
}

/// One code-set file, as IG officers write it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CodeSetFile {
    kind: CodeSetKind,
    /// Sensitive sets only: the category name the policies test, e.g. `sexually-transmitted-infection`.
    #[serde(default)]
    category: Option<toml::Spanned<String>>,
    title: String,
    /// Where the codes come from. Required: a code set without provenance is not trusted.
    source: String,
    #[serde(rename = "code", default)]
    codes: Vec<toml::Spanned<CodeEntry>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CodeEntry {
    code: String,
    system: String,
    display: String,
    #[serde(default)]
    #[allow(dead_code)] // documentation for readers of the file
    note: Option<String>,
}

/// Every code set in force.
#[derive(Debug, Clone, Default)]
pub struct CodeSets {
    dissent: HashSet<String>,
    /// code -> the sensitive categories it belongs to.
    sensitive: HashMap<String, Vec<String>>,
    /// Every sensitive category named by a file, for checks and explain.
    pub categories: BTreeSet<String>,
    /// file name -> (kind, category, number of codes), for `policy check` output.
    pub files: BTreeMap<String, (CodeSetKind, Option<String>, usize)>,
}

impl CodeSets {
    /// Parse one file's text and add it; problems go to `diags`.
    pub fn add_file(&mut self, name: &str, text: &str, diags: &mut Vec<Diagnostic>) {
        let file: CodeSetFile = match toml::from_str(text) {
            Ok(f) => f,
            Err(e) => {
                let msg = format!("not a valid code-set file: {}", e.message().trim());
                diags.push(match e.span() {
                    Some(span) => Diagnostic::at(name, text, span.start, msg),
                    None => Diagnostic::file(name, msg),
                });
                return;
            }
        };
        let before = diags.len();
        if file.title.trim().is_empty() {
            diags.push(Diagnostic::file(name, "the title is empty"));
        }
        if file.source.trim().is_empty() {
            diags.push(Diagnostic::file(
                name,
                "the source is empty: say where these codes come from",
            ));
        }
        if file.codes.is_empty() {
            diags.push(Diagnostic::file(
                name,
                "the file lists no codes (add [[code]] entries)",
            ));
        }
        let category = match (file.kind, &file.category) {
            (CodeSetKind::Dissent, Some(c)) => {
                diags.push(Diagnostic::at(
                    name,
                    text,
                    c.span().start,
                    "a dissent code set has no category; remove this line",
                ));
                None
            }
            (CodeSetKind::Sensitive, None) => {
                diags.push(Diagnostic::file(name, "a sensitive code set needs a category, e.g. category = \"termination-of-pregnancy\""));
                None
            }
            (CodeSetKind::Sensitive, Some(c)) => {
                let ok = !c.get_ref().is_empty()
                    && c.get_ref()
                        .chars()
                        .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-');
                if !ok {
                    diags.push(Diagnostic::at(name, text, c.span().start, "a category is lowercase letters, digits and dashes, e.g. \"gender-reassignment\""));
                }
                Some(c.get_ref().clone())
            }
            (CodeSetKind::Dissent, None) => None,
        };
        for entry in &file.codes {
            let e = entry.get_ref();
            let code = e.code.trim();
            if code.is_empty() || code != e.code {
                diags.push(Diagnostic::at(
                    name,
                    text,
                    entry.span().start,
                    "a code is empty or has spaces around it",
                ));
            }
            if e.system.trim().is_empty() || e.display.trim().is_empty() {
                diags.push(Diagnostic::at(
                    name,
                    text,
                    entry.span().start,
                    "every code needs a system and a display",
                ));
            }
        }
        if diags.len() > before {
            return;
        }
        for entry in &file.codes {
            let code = entry.get_ref().code.clone();
            match (file.kind, &category) {
                (CodeSetKind::Dissent, _) => {
                    self.dissent.insert(code);
                }
                (CodeSetKind::Sensitive, Some(cat)) => {
                    let cats = self.sensitive.entry(code).or_default();
                    if !cats.contains(cat) {
                        cats.push(cat.clone());
                    }
                }
                (CodeSetKind::Sensitive, None) => {}
            }
        }
        if let Some(cat) = &category {
            self.categories.insert(cat.clone());
        }
        self.files
            .insert(name.to_string(), (file.kind, category, file.codes.len()));
    }

    pub fn dissent_count(&self) -> usize {
        self.dissent.len()
    }

    /// The sensitive categories of a resource: from its codes, plus `practice-confidential`
    /// when `meta.security` carries NOPAT. Sorted, without repeats.
    pub fn categories_of(&self, resource: &Value) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for_each_code(resource, |code| {
            if let Some(cats) = self.sensitive.get(code) {
                out.extend(cats.iter().cloned());
            }
        });
        out
    }

    /// Does this resource carry a dissent code?
    pub fn carries_dissent(&self, resource: &Value) -> bool {
        let mut found = false;
        for_each_code(resource, |code| found |= self.dissent.contains(code));
        found
    }
}

/// Calls `f` with every `code` of every Coding under any `coding` array in the resource
/// (`code.coding`, `medicationCodeableConcept.coding`, `reasonCode[].coding`, ...). Iterative, so
/// deep input cannot overflow the stack.
pub fn for_each_code<'a>(resource: &'a Value, mut f: impl FnMut(&'a str)) {
    let mut stack = vec![resource];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(map) => {
                for (k, child) in map {
                    if k == "coding"
                        && let Value::Array(items) = child
                    {
                        for item in items {
                            if let Some(code) = item.get("code").and_then(Value::as_str) {
                                f(code);
                            }
                        }
                    }
                    if matches!(child, Value::Object(_) | Value::Array(_)) {
                        stack.push(child);
                    }
                }
            }
            Value::Array(items) => stack.extend(items.iter()),
            _ => {}
        }
    }
}

/// Is the resource marked practice-confidential (`meta.security` code NOPAT)? Any system is
/// accepted for the same reason codes match on the code alone.
pub fn is_practice_confidential(resource: &Value) -> bool {
    resource
        .get("meta")
        .and_then(|m| m.get("security"))
        .and_then(Value::as_array)
        .is_some_and(|sec| {
            sec.iter()
                .any(|c| c.get("code").and_then(Value::as_str) == Some(NOPAT))
        })
}
