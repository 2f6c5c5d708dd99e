//! Every `/fhir` request but `/metadata` needs a valid bearer token.

use base64::Engine as _;
use serde_json::json;
use tributary::auth::sign_demo;

use super::Demo;

fn b64(s: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

#[tokio::test]
async fn each_bad_token_is_401_with_a_reason_and_a_challenge() {
    let demo = Demo::start(&[]).await;
    let nhs = demo.patient("typical");
    let path = format!("/Patient/{nhs}/$everything");
    let far = 99_999_999_999u64;
    let claims = |aud: &str, exp: u64| json!({"sub": "u", "role": "R8000", "org": "RXL", "purpose": "direct-care", "aud": aud, "exp": exp});
    let parts: Vec<String> = demo.token.split('.').map(str::to_owned).collect();
    let forged_payload = format!(
        "{}.{}.{}",
        parts[0],
        b64(&claims("tributary", far).to_string()),
        parts[2]
    );
    let alg_none = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&claims("tributary", far).to_string())
    );
    let no_purpose = sign_demo(
        &json!({"sub": "u", "role": "R8000", "org": "RXL", "aud": "tributary", "exp": far}),
    )
    .unwrap();

    let cases: Vec<(String, Option<String>, &str)> = vec![
        ("missing".into(), None, "no bearer token"),
        (
            "not bearer".into(),
            Some("Basic dXNlcjpwYXNz".into()),
            "not a bearer token",
        ),
        ("garbage".into(), Some("Bearer abc.def".into()), "malformed"),
        (
            "expired".into(),
            Some(format!(
                "Bearer {}",
                sign_demo(&claims("tributary", 1_000)).unwrap()
            )),
            "expired",
        ),
        (
            "wrong audience".into(),
            Some(format!(
                "Bearer {}",
                sign_demo(&claims("someone-else", far)).unwrap()
            )),
            "audience",
        ),
        (
            "forged payload".into(),
            Some(format!("Bearer {forged_payload}")),
            "signature",
        ),
        ("alg none".into(), Some(format!("Bearer {alg_none}")), ""),
        (
            "missing purpose".into(),
            Some(format!("Bearer {no_purpose}")),
            "claim",
        ),
    ];
    for (name, header, reason) in cases {
        let headers: Vec<(&str, &str)> = header
            .as_deref()
            .map(|h| vec![("authorization", h)])
            .unwrap_or_default();
        let reply = demo.get_with(&path, &headers).await;
        assert_eq!(reply.status, 401, "{name}: {}", reply.text);
        assert_eq!(reply.body["resourceType"], "OperationOutcome", "{name}");
        assert_eq!(reply.issues()[0]["code"], "login", "{name}");
        assert!(
            reply.issue_text().contains(reason),
            "{name}: {}",
            reply.issue_text()
        );
        assert!(
            reply.headers["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer"),
            "{name}"
        );
        assert!(!reply.text.contains(&nhs), "{name}: no patient data");
        let challenge = reply.headers["www-authenticate"].to_str().unwrap();
        assert_eq!(
            challenge.contains("error="),
            name != "missing",
            "{name}: RFC 6750 challenge {challenge}"
        );
    }
    // Nothing was audited: nothing was disclosed.
    let audit = std::fs::read_to_string(demo.audit_dir.join("audit.jsonl")).unwrap_or_default();
    assert_eq!(audit.lines().count(), 0);
}

#[tokio::test]
async fn metadata_needs_no_token_and_a_minted_token_works() {
    let demo = Demo::start(&[]).await;
    let meta = demo.get_with("/metadata", &[]).await;
    assert_eq!(meta.status, 200);
    assert_eq!(meta.body["resourceType"], "CapabilityStatement");
    assert_eq!(meta.body["fhirVersion"], "4.0.1");

    let out = tokio::process::Command::new(super::BIN)
        .args([
            "token", "--role", "R8000", "--org", "RXN", "--sub", "nurse-7",
        ])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap();
    let reply = demo
        .get_with(
            &format!("/Patient/{}", demo.patient("typical")),
            &[("authorization", &format!("Bearer {}", token.trim()))],
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
}
