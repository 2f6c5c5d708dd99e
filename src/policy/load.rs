//! Loading a policy directory into one immutable [`Bundle`]: the Cedar schema, the policies,
//! the role list and the code sets, every problem collected before anything is used.
//!
//! # Why everything is loaded or nothing
//! The engine swaps whole bundles. A bundle exists only when every file parsed and every policy
//! passed strict schema validation, so no request is ever judged by a half-loaded set.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs,
    path::{Path, PathBuf},
};

use cedar_policy::{
    Effect, Entities, Entity, EntityUid, PolicyId, PolicySet, RestrictedExpression, Schema,
    ValidationMode, Validator,
};
use serde::Deserialize;

use super::{
    codes::CodeSets,
    diagnostic::{Diagnostic, display_name, from_miette},
};

/// The group every role listed in `roles.toml` belongs to, without saying so.
pub const LISTED_GROUP: &str = "listed";
pub const ROLES_FILE: &str = "roles.toml";
pub const CODESETS_DIR: &str = "codesets";
pub const TESTS_DIR: &str = "tests";

/// Where a policy came from, for explain.
#[derive(Debug, Clone)]
pub struct PolicyOrigin {
    pub file: String,
    pub line: usize,
    /// The policy's `@id("...")`.
    pub name: String,
    /// Its `@reason("...")` if any: the plain-English why.
    pub reason: Option<String>,
    pub effect: Effect,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RolesFile {
    #[serde(rename = "role", default)]
    roles: Vec<toml::Spanned<RoleDef>>,
}

/// One national RBAC role the gateway knows.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RoleDef {
    pub code: String,
    pub name: String,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    #[allow(dead_code)]
    pub note: Option<String>,
}

/// A loaded, validated policy directory.
#[derive(Debug)]
pub struct Bundle {
    pub schema: Schema,
    pub policies: PolicySet,
    pub origins: HashMap<PolicyId, PolicyOrigin>,
    pub roles: BTreeMap<String, RoleDef>,
    pub codes: CodeSets,
    /// Role and RoleGroup entities, built once per bundle.
    pub role_entities: Entities,
    /// Whether any policy file mentions `sourceOrg`. When none does, the source organisation
    /// cannot change a verdict, so evaluate judges all copies of one kind together.
    pub uses_source_org: bool,
}

fn read(path: &Path, name: &str, diags: &mut Vec<Diagnostic>) -> Option<String> {
    match fs::read_to_string(path) {
        Ok(t) => Some(t),
        Err(e) => {
            diags.push(Diagnostic::file(name, format!("cannot read the file: {e}")));
            None
        }
    }
}

fn sorted_entries(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    Ok(v)
}

fn ext(p: &Path) -> &str {
    p.extension().and_then(|e| e.to_str()).unwrap_or("")
}

/// Load and validate every file in `dir`. Err lists every problem found.
pub fn load_dir(dir: &Path) -> Result<Bundle, Vec<Diagnostic>> {
    let mut diags = Vec::new();
    let entries = match sorted_entries(dir) {
        Ok(e) => e,
        Err(e) => {
            return Err(vec![Diagnostic::file(
                dir.display().to_string(),
                format!("cannot read the policy directory: {e}"),
            )]);
        }
    };

    // Schema: exactly one *.cedarschema file.
    let schema_files: Vec<&PathBuf> = entries.iter().filter(|p| ext(p) == "cedarschema").collect();
    let schema = match schema_files.as_slice() {
        [one] => {
            let name = display_name(dir, one);
            read(one, &name, &mut diags).and_then(|text| {
                match Schema::from_cedarschema_str(&text) {
                    Ok((schema, _warnings)) => Some(schema),
                    Err(e) => {
                        diags.extend(from_miette(&name, &text, &e, "schema: "));
                        None
                    }
                }
            })
        }
        [] => {
            diags.push(Diagnostic::file(
                display_name(dir, dir),
                "no schema file (*.cedarschema) in the policy directory",
            ));
            None
        }
        many => {
            for p in many {
                diags.push(Diagnostic::file(
                    display_name(dir, p),
                    "more than one schema file; keep exactly one *.cedarschema",
                ));
            }
            None
        }
    };

    // Policies: every *.cedar file; each policy renamed to its @id so explain can name it.
    let mut policies = PolicySet::new();
    let mut origins = HashMap::new();
    let mut texts: HashMap<String, String> = HashMap::new();
    for path in entries.iter().filter(|p| ext(p) == "cedar") {
        let name = display_name(dir, path);
        let Some(text) = read(path, &name, &mut diags) else {
            continue;
        };
        let set: PolicySet = match text.parse() {
            Ok(s) => s,
            Err(e) => {
                let e: cedar_policy::ParseErrors = e;
                for one in e.iter() {
                    diags.extend(from_miette(&name, &text, one, ""));
                }
                continue;
            }
        };
        if set.templates().next().is_some() {
            diags.push(Diagnostic::file(
                &name,
                "templates (?principal / ?resource) are not used here; write plain policies",
            ));
        }
        // Policies come out as policy0, policy1, ... in the order written.
        let mut ps: Vec<_> = set.policies().collect();
        ps.sort_by_key(|p| {
            p.id()
                .to_string()
                .trim_start_matches("policy")
                .parse::<usize>()
                .unwrap_or(usize::MAX)
        });
        let mut search_from = 0;
        for p in ps {
            let Some(id) = p.annotation("id").map(str::to_string) else {
                // Locate the n-th policy by its effect keyword, roughly, for the message.
                diags.push(Diagnostic::at(
                    &name,
                    &text,
                    find_effect(&text, search_from),
                    "every policy needs a name: add @id(\"...\") on the line above it",
                ));
                continue;
            };
            let offset = text[search_from..]
                .find(&format!("\"{id}\""))
                .map_or(0, |o| o + search_from);
            search_from = offset;
            let (line, _) = super::diagnostic::line_col(&text, offset);
            let pid = PolicyId::new(&id);
            if let Some(prev) = origins.get(&pid) {
                let prev: &PolicyOrigin = prev;
                diags.push(Diagnostic::at(
                    &name,
                    &text,
                    offset,
                    format!(
                        "the name @id(\"{id}\") is already used in {}:{}",
                        prev.file, prev.line
                    ),
                ));
                continue;
            }
            origins.insert(
                pid.clone(),
                PolicyOrigin {
                    file: name.clone(),
                    line,
                    name: id.clone(),
                    reason: p.annotation("reason").map(str::to_string),
                    effect: p.effect(),
                },
            );
            if let Err(e) = policies.add(p.new_id(pid)) {
                diags.push(Diagnostic::at(
                    &name,
                    &text,
                    offset,
                    format!("cannot add the policy: {e}"),
                ));
            }
        }
        texts.insert(name, text);
    }
    if origins.is_empty() && diags.is_empty() {
        diags.push(Diagnostic::file(
            display_name(dir, dir),
            "no policies (*.cedar files) in the policy directory; everything would be refused",
        ));
    }

    // Schema validation, strict: every error, located in its file.
    if let Some(schema) = &schema {
        let result = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
        let mut found = Vec::new();
        for e in result.validation_errors() {
            let (file, text) = origins
                .get(e.policy_id())
                .and_then(|o| texts.get(&o.file).map(|t| (o.file.clone(), t.as_str())))
                .unwrap_or_else(|| ("?".to_string(), ""));
            found.extend(from_miette(&file, text, e, "does not fit the schema: "));
        }
        // Cedar reports these in hash order; IG officers should see the same list every run.
        found.sort_by(|a, b| {
            (&a.file, a.line, a.col, &a.message).cmp(&(&b.file, b.line, b.col, &b.message))
        });
        diags.extend(found);
    }

    // Roles.
    let mut roles = BTreeMap::new();
    let roles_path = dir.join(ROLES_FILE);
    if let Some(text) = read(&roles_path, ROLES_FILE, &mut diags) {
        match toml::from_str::<RolesFile>(&text) {
            Ok(file) => {
                for r in file.roles {
                    let span = r.span();
                    let r = r.into_inner();
                    let valid_code =
                        !r.code.is_empty() && r.code.chars().all(|c| c.is_ascii_alphanumeric());
                    if !valid_code {
                        diags.push(Diagnostic::at(
                            ROLES_FILE,
                            &text,
                            span.start,
                            format!(
                                "{:?} is not a role code (letters and digits, e.g. R8000)",
                                r.code
                            ),
                        ));
                    } else if roles.contains_key(&r.code) {
                        diags.push(Diagnostic::at(
                            ROLES_FILE,
                            &text,
                            span.start,
                            format!("role {} is listed twice", r.code),
                        ));
                    } else if let Some(g) =
                        r.groups.iter().find(|g| g.is_empty() || g.contains('"'))
                    {
                        diags.push(Diagnostic::at(
                            ROLES_FILE,
                            &text,
                            span.start,
                            format!("{g:?} is not a group name"),
                        ));
                    } else {
                        roles.insert(r.code.clone(), r);
                    }
                }
            }
            Err(e) => {
                let msg = format!("not a valid roles file: {}", e.message().trim());
                diags.push(match e.span() {
                    Some(s) => Diagnostic::at(ROLES_FILE, &text, s.start, msg),
                    None => Diagnostic::file(ROLES_FILE, msg),
                });
            }
        }
    }

    // Code sets.
    let mut codes = CodeSets::default();
    let codes_dir = dir.join(CODESETS_DIR);
    match sorted_entries(&codes_dir) {
        Ok(files) => {
            for path in files {
                let name = display_name(dir, &path);
                if ext(&path) != "toml" {
                    if path.is_file() && !name.ends_with(".md") {
                        diags.push(Diagnostic::file(
                            &name,
                            "not a code-set file: code sets are *.toml",
                        ));
                    }
                    continue;
                }
                if let Some(text) = read(&path, &name, &mut diags) {
                    codes.add_file(&name, &text, &mut diags);
                }
            }
            if codes.dissent_count() == 0 && diags.is_empty() {
                diags.push(Diagnostic::file(
                    CODESETS_DIR,
                    "no dissent code set: dissent recorded at the GP could not be recognised",
                ));
            }
        }
        Err(e) => diags.push(Diagnostic::file(
            CODESETS_DIR,
            format!("cannot read the code-set directory: {e}"),
        )),
    }

    // Stray top-level data files are most likely typos of a file name we read.
    for p in entries
        .iter()
        .filter(|p| matches!(ext(p), "toml" | "json" | "yaml" | "yml"))
    {
        let name = display_name(dir, p);
        if name != ROLES_FILE {
            diags.push(Diagnostic::file(&name, format!("unknown file; the gateway reads {ROLES_FILE}, *.cedar, one *.cedarschema, {CODESETS_DIR}/*.toml and {TESTS_DIR}/*.toml")));
        }
    }

    let role_entities = match build_role_entities(&roles, schema.as_ref()) {
        Ok(e) => Some(e),
        Err(msg) => {
            diags.push(Diagnostic::file(ROLES_FILE, msg));
            None
        }
    };

    let uses_source_org = texts.values().any(|t| t.contains("sourceOrg"));
    match (schema, role_entities) {
        (Some(schema), Some(role_entities)) if diags.is_empty() => Ok(Bundle {
            schema,
            policies,
            origins,
            roles,
            codes,
            role_entities,
            uses_source_org,
        }),
        _ => Err(diags),
    }
}

fn find_effect(text: &str, from: usize) -> usize {
    let rest = text.get(from..).unwrap_or("");
    [rest.find("permit"), rest.find("forbid")]
        .into_iter()
        .flatten()
        .min()
        .map_or(from, |o| o + from)
}

pub fn uid(ty: &str, id: &str) -> Result<EntityUid, String> {
    let ty = ty
        .parse()
        .map_err(|e| format!("bad entity type {ty}: {e}"))?;
    Ok(EntityUid::from_type_name_and_id(
        ty,
        cedar_policy::EntityId::new(id),
    ))
}

fn build_role_entities(
    roles: &BTreeMap<String, RoleDef>,
    schema: Option<&Schema>,
) -> Result<Entities, String> {
    let mut groups: HashSet<String> = HashSet::from([LISTED_GROUP.to_string()]);
    let mut out = Vec::new();
    for r in roles.values() {
        let mut parents = HashSet::from([uid("RoleGroup", LISTED_GROUP)?]);
        for g in &r.groups {
            parents.insert(uid("RoleGroup", g)?);
            groups.insert(g.clone());
        }
        let attrs = HashMap::from([(
            "name".to_string(),
            RestrictedExpression::new_string(r.name.clone()),
        )]);
        out.push(
            Entity::new(uid("Role", &r.code)?, attrs, parents)
                .map_err(|e| format!("role {}: {e}", r.code))?,
        );
    }
    for g in groups {
        out.push(Entity::new_no_attrs(uid("RoleGroup", &g)?, HashSet::new()));
    }
    Entities::from_entities(out, schema).map_err(|e| format!("roles do not fit the schema: {e}"))
}
