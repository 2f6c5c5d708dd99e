//! The admin listener: health, readiness and the upstream table.

use super::{Demo, send};

#[tokio::test]
async fn upstreams_lists_every_source_with_kind_connector_and_last_outcome() {
    let demo = Demo::start(&["--fault", "RXR=error"]).await;
    assert_eq!(
        send("GET", &format!("{}/healthz", demo.admin), &[], None)
            .await
            .status,
        200
    );
    assert_eq!(
        send("GET", &format!("{}/readyz", demo.admin), &[], None)
            .await
            .status,
        200
    );
    demo.get(&format!("/Patient/{}/$everything", demo.patient("typical")))
        .await;

    let reply = send("GET", &format!("{}/admin/upstreams", demo.admin), &[], None).await;
    assert_eq!(reply.status, 200);
    let rows = reply.body["upstreams"].as_array().unwrap();
    // 5 trusts + 6 practices + 2 councils + 1 private provider + demographics.
    assert_eq!(rows.len(), 15, "{}", reply.text);
    let row = |ods: &str| {
        rows.iter()
            .find(|r| r["ods"] == ods)
            .unwrap_or_else(|| panic!("no row for {ods}"))
    };
    assert_eq!(row("X26")["kind"], "demographics");
    assert_eq!(row("RXL")["kind"], "trust");
    assert_eq!(row("RXR")["last_outcome"], "rejected", "an HL7 v2 AE reply");
    for trust in ["RXL", "RXN", "RXR", "RTX", "RW5"] {
        assert_eq!(
            row(trust)["connector"],
            "hl7v2",
            "{trust} is a PAS over MLLP"
        );
    }
    assert_eq!(row("X26")["connector"], "fhir");
    assert_eq!(row("RXL")["last_outcome"], "answered");
    assert!(
        rows.iter()
            .all(|r| r["endpoint"].as_str().unwrap().contains("127.0.0.1:"))
    );

    let html = send(
        "GET",
        &format!("{}/admin/upstreams", demo.admin),
        &[("accept", "text/html")],
        None,
    )
    .await;
    assert!(
        html.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(html.text.contains("<td>RXR</td>"));
}
