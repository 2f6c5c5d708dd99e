//! Bad input gets a precise OperationOutcome, and the gateway keeps serving.

use super::{Demo, TempDir, send};

#[tokio::test]
async fn bad_nhs_numbers_and_queries_are_400_with_a_reason() {
    let demo = Demo::start(&[]).await;
    for (path, expect) in [
        ("/Patient/9434765918/$everything", "Modulus 11"),
        ("/Patient/94347659/$everything", "10 digits"),
        ("/Patient/943476591X", "only the digits"),
        ("/Condition?patient=9434765918", "Modulus 11"),
        ("/Condition", "patient="),
        (
            "/Patient?identifier=http://example.org/mrn|123",
            "only NHS number identifiers",
        ),
        (
            "/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|9434765919&identifier=x",
            "more than once",
        ),
        ("/Patient/9434765919/$everything?_type=Spaceship", "_type"),
    ] {
        let reply = demo.get(path).await;
        assert_eq!(reply.status, 400, "{path}: {}", reply.text);
        assert_eq!(reply.body["resourceType"], "OperationOutcome");
        assert_eq!(reply.issues()[0]["code"], "invalid", "{path}");
        assert!(
            reply.issue_text().contains(expect),
            "{path}: {}",
            reply.issue_text()
        );
        assert!(
            !reply.text.contains("9434765918"),
            "the bad number is not echoed"
        );
    }
    // Still serving.
    assert_eq!(
        demo.get(&format!("/Patient/{}", demo.patient("typical")))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn a_patient_no_source_knows_is_404() {
    let demo = Demo::start(&[]).await;
    let reply = demo.get("/Patient/9434765919/$everything").await;
    assert_eq!(reply.status, 404, "{}", reply.text);
    assert_eq!(reply.issues()[0]["code"], "not-found");
    assert_eq!(demo.get("/Patient/9434765919").await.status, 404);
    assert_eq!(demo.get("/Condition?patient=9434765919").await.status, 404);
    let search = demo
        .get("/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|9434765919")
        .await;
    assert_eq!(
        search.status, 200,
        "a search that matches nothing is an empty searchset"
    );
    assert!(search.resources().is_empty());
}

#[tokio::test]
async fn unsupported_formats_methods_types_and_parameters() {
    let demo = Demo::start(&[]).await;
    let auth = format!("Bearer {}", demo.token);
    let nhs = demo.patient("typical");
    let xml = demo
        .get_with(
            &format!("/Patient/{nhs}"),
            &[("authorization", &auth), ("accept", "application/fhir+xml")],
        )
        .await;
    assert_eq!(xml.status, 406, "{}", xml.text);
    assert_eq!(xml.body["resourceType"], "OperationOutcome");
    assert_eq!(
        demo.get(&format!("/Patient/{nhs}?_format=xml"))
            .await
            .status,
        406
    );

    let json_post = send(
        "POST",
        &format!("{}/Condition/_search", demo.base),
        &[("authorization", &auth)],
        Some(("application/fhir+json", "{}")),
    )
    .await;
    assert_eq!(json_post.status, 415, "{}", json_post.text);
    let form_post = send(
        "POST",
        &format!("{}/Condition/_search", demo.base),
        &[("authorization", &auth)],
        Some((
            "application/x-www-form-urlencoded",
            &format!("patient={nhs}"),
        )),
    )
    .await;
    assert_eq!(form_post.status, 200, "{}", form_post.text);

    let delete = send(
        "DELETE",
        &format!("{}/Patient/{nhs}", demo.base),
        &[("authorization", &auth)],
        None,
    )
    .await;
    assert_eq!(delete.status, 405);
    assert_eq!(delete.body["resourceType"], "OperationOutcome");
    let unknown_type = demo.get(&format!("/Spaceship?patient={nhs}")).await;
    assert_eq!(unknown_type.status, 404);
    assert_eq!(unknown_type.body["resourceType"], "OperationOutcome");

    let lenient = demo
        .get(&format!("/Condition?patient={nhs}&_count=5"))
        .await;
    assert_eq!(lenient.status, 200);
    assert!(
        lenient
            .issue_text()
            .contains("`_count` is not supported and was ignored"),
        "{}",
        lenient.issue_text()
    );
    let strict = demo
        .get_with(
            &format!("/Condition?patient={nhs}&_count=5"),
            &[("authorization", &auth), ("prefer", "handling=strict")],
        )
        .await;
    assert_eq!(strict.status, 400);
}

#[tokio::test]
async fn empty_break_glass_or_relationship_reasons_are_400() {
    let demo = Demo::start(&[]).await;
    let auth = format!("Bearer {}", demo.token);
    let nhs = demo.patient("typical");
    for header in ["x-break-glass", "x-legitimate-relationship"] {
        let reply = demo
            .get_with(
                &format!("/Patient/{nhs}/$everything"),
                &[("authorization", &auth), (header, " ")],
            )
            .await;
        assert_eq!(reply.status, 400, "{header}: {}", reply.text);
        assert!(reply.issue_text().contains("stated reason"));
    }
}

#[tokio::test]
async fn an_unwritable_audit_log_releases_nothing() {
    // The audit log is a disk that is always full: every write fails with ENOSPC.
    let dir = TempDir::new();
    let audit_dir = dir.0.join("audit");
    std::fs::create_dir_all(&audit_dir).unwrap();
    std::os::unix::fs::symlink("/dev/full", audit_dir.join("audit.jsonl")).unwrap();
    let demo = Demo::start_in(dir, audit_dir, &[]).await;
    let nhs = demo.patient("typical");
    for path in [
        format!("/Patient/{nhs}/$everything"),
        format!("/Patient/{nhs}"),
        format!("/Condition?patient={nhs}"),
    ] {
        let reply = demo.get(&path).await;
        assert_eq!(reply.status, 503, "{path}: {}", reply.text);
        assert_eq!(reply.issues()[0]["severity"], "fatal");
        assert!(
            reply.issue_text().contains("audit"),
            "{}",
            reply.issue_text()
        );
        assert!(!reply.text.contains(&nhs), "nothing released");
    }
    assert_eq!(demo.get("/metadata").await.status, 200, "still serving");
}
