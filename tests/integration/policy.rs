//! The negative suite: every way to get withheld data, through the real binary, proving
//! nothing leaks; and policy changes that apply to the very next request.

use std::{collections::BTreeSet, path::Path, time::Duration};

use serde_json::Value;
use tributary::auth::{mint_demo_token, sign_demo};

use super::{Demo, Reply, TempDir, send};

const GP_PREFIX: char = 'P';
const DISSENT: &str = "416409005";
const SENSITIVE: [&str; 4] = ["8098009", "57797005", "52637005", "407377005"];

fn token(role: &str, org: &str) -> String {
    mint_demo_token(
        "policy-test",
        role,
        org,
        "direct-care",
        Duration::from_secs(600),
    )
    .unwrap()
}

impl Demo {
    async fn get_as(&self, path: &str, token: &str, extra: &[(&str, &str)]) -> Reply {
        let auth = format!("Bearer {token}");
        let mut headers = vec![("authorization", auth.as_str())];
        headers.extend_from_slice(extra);
        self.get_with(path, &headers).await
    }

    /// The organisation the demo token was minted for (the typical patient's trust).
    fn org(&self) -> String {
        let payload = self.token.split('.').nth(1).unwrap();
        let json =
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
                .unwrap();
        serde_json::from_slice::<Value>(&json).unwrap()["org"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn alerts(&self) -> Vec<Value> {
        let reply = send("GET", &format!("{}/admin/alerts", self.admin), &[], None).await;
        reply.body["alerts"].as_array().unwrap().clone()
    }
}

fn source_of(r: &Value) -> String {
    r["meta"]["source"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned()
}

/// Every organisation named as reporting a resource.
fn reporters(r: &Value) -> Vec<String> {
    r["meta"]["extension"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter_map(|x| x["valueIdentifier"]["value"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn codes(r: &Value) -> Vec<String> {
    let mut out = Vec::new();
    collect_codes(r, &mut out);
    out
}

fn collect_codes(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            if let Some(c) = o.get("code").and_then(Value::as_str) {
                out.push(c.to_owned());
            }
            o.values().for_each(|x| collect_codes(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| collect_codes(x, out)),
        _ => {}
    }
}

fn is_suppressed(reply: &Reply) -> bool {
    reply.issues().iter().any(|i| i["code"] == "suppressed")
}

/// No count, category or hint of what was withheld.
fn assert_withheld_silently_counted_never(reply: &Reply) {
    let issue = reply
        .issues()
        .into_iter()
        .find(|i| i["code"] == "suppressed")
        .expect("a suppressed issue");
    let text = issue["details"]["text"].as_str().unwrap();
    assert!(
        !text.chars().any(|c| c.is_ascii_digit()),
        "no counts: {text}"
    );
    for word in [
        "dissent",
        "sensitive",
        "sexual",
        "pregnan",
        "fertil",
        "gender",
        "confidential",
        "restricted",
    ] {
        assert!(
            !text.to_lowercase().contains(word),
            "no hint of what: {text}"
        );
    }
    assert_eq!(
        reply.body["total"],
        reply.resources().len(),
        "total counts only released entries"
    );
}

#[tokio::test]
async fn a_non_clinical_role_sees_demographics_only_and_an_unknown_role_nothing() {
    let demo = Demo::start(&[]).await;
    let nhs = demo.patient("typical");
    let org = demo.org();
    let clerk = token("R8008", &org);
    let everything = demo
        .get_as(&format!("/Patient/{nhs}/$everything"), &clerk, &[])
        .await;
    assert_eq!(everything.status, 200, "{}", everything.text);
    let types: BTreeSet<String> = everything
        .resources()
        .iter()
        .map(|r| r["resourceType"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(types, BTreeSet::from(["Patient".to_owned()]));
    assert_withheld_silently_counted_never(&everything);
    let conditions = demo
        .get_as(&format!("/Condition?patient={nhs}"), &clerk, &[])
        .await;
    assert_eq!(conditions.status, 200);
    assert!(conditions.resources().is_empty());
    assert!(is_suppressed(&conditions));

    let unknown = demo
        .get_as(
            &format!("/Patient/{nhs}/$everything"),
            &token("R9999", &org),
            &[],
        )
        .await;
    assert_eq!(unknown.status, 403, "{}", unknown.text);
    assert_eq!(unknown.issues()[0]["code"], "forbidden");
    assert!(!unknown.text.contains(&nhs));
    let read = demo
        .get_as(&format!("/Patient/{nhs}"), &token("R9999", &org), &[])
        .await;
    assert_eq!(read.status, 403);
}

#[tokio::test]
async fn a_tampered_role_claim_or_an_empty_purpose_gets_nothing() {
    let demo = Demo::start(&[]).await;
    let nhs = demo.patient("typical");
    let clerk = token("R8008", &demo.org());
    let parts: Vec<&str> = clerk.split('.').collect();
    let payload =
        base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, parts[1])
            .unwrap();
    let elevated = String::from_utf8(payload)
        .unwrap()
        .replace("R8008", "R8000");
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, elevated),
        parts[2]
    );
    assert_eq!(
        demo.get_as(&format!("/Patient/{nhs}/$everything"), &forged, &[])
            .await
            .status,
        401
    );

    let no_purpose = sign_demo(&serde_json::json!({"sub": "x", "role": "R8000", "org": demo.org(), "purpose": "", "aud": "tributary", "exp": 99_999_999_999u64})).unwrap();
    let reply = demo
        .get_as(&format!("/Patient/{nhs}/$everything"), &no_purpose, &[])
        .await;
    assert!(matches!(reply.status.as_u16(), 401 | 403), "{}", reply.text);
    assert!(!reply.text.contains(&nhs));
}

#[tokio::test]
async fn gp_dissent_withholds_every_gp_item_even_under_break_glass() {
    let demo = Demo::start(&[]).await;
    let nhs = demo.patient("dissent");
    let clinician = token("R8000", &demo.org());
    for (path, extra) in [
        (format!("/Patient/{nhs}/$everything"), vec![]),
        (format!("/Observation?patient={nhs}"), vec![]),
        (
            format!("/Patient/{nhs}/$everything"),
            vec![("x-break-glass", "unconscious in ED, no history available")],
        ),
        (
            format!("/Condition?patient={nhs}"),
            vec![("x-break-glass", "unconscious in ED, no history available")],
        ),
    ] {
        let reply = demo.get_as(&path, &clinician, &extra).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text);
        for r in reply.resources() {
            if r["resourceType"] != "Patient" {
                assert!(
                    !source_of(&r).starts_with(GP_PREFIX),
                    "{path}: GP item released under dissent: {r}"
                );
            }
            assert!(
                !codes(&r).iter().any(|c| c == DISSENT),
                "{path}: the dissent code itself leaked"
            );
        }
    }
    let alerts = demo.alerts().await;
    assert!(
        alerts
            .iter()
            .any(|a| a["kind"].as_str().unwrap().to_lowercase().contains("break")),
        "break glass raised an alert: {alerts:?}"
    );
    assert!(
        !serde_json::to_string(&alerts).unwrap().contains(&nhs),
        "alerts carry no NHS number"
    );
}

#[tokio::test]
async fn sensitive_items_never_leave_by_search_or_everything() {
    let demo = Demo::start(&[]).await;
    let nhs = demo.patient("sensitive");
    let clinician = token("R8000", &demo.org());
    let claim = [(
        "x-legitimate-relationship",
        "reviewing the patient in clinic today",
    )];
    let mut seen_gp_data = false;
    for path in [
        format!("/Patient/{nhs}/$everything"),
        format!("/Condition?patient={nhs}"),
        format!("/Procedure?patient={nhs}"),
        format!("/Observation?patient={nhs}"),
    ] {
        for extra in [
            &claim[..],
            &[("x-break-glass", "collapsed in the waiting room")][..],
        ] {
            let reply = demo.get_as(&path, &clinician, extra).await;
            assert_eq!(reply.status, 200, "{path}: {}", reply.text);
            for r in reply.resources() {
                seen_gp_data |=
                    source_of(&r).starts_with(GP_PREFIX) && r["resourceType"] != "Patient";
                for code in codes(&r) {
                    assert!(
                        !SENSITIVE.contains(&code.as_str()),
                        "{path}: sensitive code {code} released"
                    );
                }
                let security: Vec<String> = r["meta"]["security"]
                    .as_array()
                    .map(|s| {
                        s.iter()
                            .filter_map(|x| x["code"].as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                assert!(
                    !security.contains(&"NOPAT".to_owned()),
                    "{path}: a practice-confidential item was released"
                );
            }
        }
    }
    assert!(seen_gp_data, "the rest of the GP record still arrives");
}

#[tokio::test]
async fn a_restricted_patient_has_no_address_telecom_or_gp_and_the_gp_is_not_asked() {
    let demo = Demo::start(&[]).await;
    let nhs = demo.patient("restricted");
    let clinician = token("R8000", &demo.org());
    let claim = [("x-legitimate-relationship", "admitted under my care")];
    let read = demo
        .get_as(&format!("/Patient/{nhs}"), &clinician, &claim)
        .await;
    assert_eq!(read.status, 200, "{}", read.text);
    for field in ["address", "telecom", "generalPractitioner", "contact"] {
        assert!(
            read.body.get(field).is_none(),
            "{field} released for a restricted patient"
        );
    }
    let everything = demo
        .get_as(&format!("/Patient/{nhs}/$everything"), &clinician, &claim)
        .await;
    for r in everything.resources() {
        assert!(r.get("address").is_none() && r.get("telecom").is_none());
        assert!(!source_of(&r).starts_with(GP_PREFIX), "nothing from the GP");
    }
    assert!(
        !everything.issue_text().contains(" P8"),
        "the GP is not named: {}",
        everything.issue_text()
    );
    let audit = std::fs::read_to_string(demo.audit_dir.join("audit.jsonl")).unwrap();
    for line in audit.lines() {
        let record: Value = serde_json::from_str(line).unwrap();
        // Audit lines are hash-chained AuditEvents; entity[0] is the patient, then each
        // source asked.
        let asked: Vec<&str> = record["event"]["entity"].as_array().unwrap()[1..]
            .iter()
            .map(|s| s["what"]["identifier"]["value"].as_str().unwrap())
            .collect();
        assert!(
            !asked.iter().any(|o| o.starts_with(GP_PREFIX)),
            "a GP was asked about a restricted patient: {asked:?}"
        );
    }
}

#[tokio::test]
async fn a_restricted_patient_stays_restricted_when_demographics_is_down_and_every_gp_is_asked() {
    let demo = Demo::start(&["--fault", "X26=error"]).await;
    let nhs = demo.patient("restricted");
    let clinician = token("R8000", &demo.org());
    let claim = [("x-legitimate-relationship", "admitted under my care")];
    for path in [
        format!("/Patient/{nhs}"),
        format!("/Patient/{nhs}/$everything"),
    ] {
        let reply = demo.get_as(&path, &clinician, &claim).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text);
        let resources = if reply.body["resourceType"] == "Bundle" {
            reply.resources()
        } else {
            vec![reply.body.clone()]
        };
        for r in &resources {
            for field in ["address", "telecom", "generalPractitioner", "contact"] {
                assert!(r.get(field).is_none(), "{path}: {field} released");
            }
            assert!(
                !source_of(r).starts_with(GP_PREFIX),
                "{path}: GP data released"
            );
            assert!(
                !reporters(r).iter().any(|o| o.starts_with(GP_PREFIX)),
                "{path}: the GP is named: {r}"
            );
        }
    }
}

#[tokio::test]
async fn without_a_relationship_a_clinician_sees_demographics_until_they_claim_one() {
    let demo = Demo::start(&[]).await;
    let nhs = demo.patient("typical");
    let stranger = token("R8000", "X99");
    let plain = demo
        .get_as(&format!("/Patient/{nhs}/$everything"), &stranger, &[])
        .await;
    assert_eq!(plain.status, 200);
    assert_eq!(plain.resources().len(), 1, "demographics only");
    assert!(is_suppressed(&plain));
    let claimed = demo
        .get_as(
            &format!("/Patient/{nhs}/$everything"),
            &stranger,
            &[(
                "x-legitimate-relationship",
                "patient presented at walk-in centre",
            )],
        )
        .await;
    assert!(
        claimed.resources().len() > 3,
        "the record, on a stated relationship"
    );
    let alerts = demo.alerts().await;
    assert!(
        alerts.iter().any(|a| a["org"] == "X99"),
        "the self-claimed relationship was raised: {alerts:?}"
    );
    let refused = demo
        .get_as(
            &format!("/Patient/{nhs}/$everything"),
            &token("R8008", "X99"),
            &[("x-break-glass", "curious")],
        )
        .await;
    assert_eq!(refused.status, 403, "a clerk may not break glass");
}

#[tokio::test]
async fn a_tightened_policy_applies_to_the_very_next_request() {
    let dir = TempDir::new();
    let policies = dir.0.join("policies");
    copy_dir(
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/policies")),
        &policies,
    );
    let demo = Demo::start(&["--policies", policies.to_str().unwrap()]).await;
    let nhs = demo.patient("typical");
    let before = demo.get(&format!("/Condition?patient={nhs}")).await;
    assert!(
        !before.resources().is_empty(),
        "clinicians see conditions under the shipped policy"
    );

    // IG takes clinical access away from R8000.
    let roles = policies.join("roles.toml");
    let text = std::fs::read_to_string(&roles).unwrap();
    let tightened = text.replacen(
        r#"groups = ["clinical", "emergency"]"#,
        r#"groups = ["emergency"]"#,
        1,
    );
    assert_ne!(text, tightened);
    std::fs::write(&roles, tightened).unwrap();
    let mut after = None;
    for _ in 0..100 {
        let reply = demo.get(&format!("/Condition?patient={nhs}")).await;
        if reply.resources().is_empty() {
            after = Some(reply);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await; // waiting on the file watcher
    }
    let after = after.expect("the tightened policy took effect");
    assert!(is_suppressed(&after));

    // A broken edit is refused and the tightened set stays in force.
    std::fs::write(
        policies.join("baseline.cedar"),
        "permit (principal, action, resource) when {",
    )
    .unwrap();
    for _ in 0..20 {
        let reply = demo.get(&format!("/Condition?patient={nhs}")).await;
        assert_eq!(reply.status, 200);
        assert!(
            reply.resources().is_empty(),
            "a broken policy file never loosens the rules"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
