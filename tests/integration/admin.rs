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

#[tokio::test]
async fn upstreams_table_has_rolling_percentiles_in_flight_and_breaker() {
    let demo = Demo::start(&["--fault", "RXR=error"]).await;
    for _ in 0..3 {
        demo.get(&format!("/Patient/{}/$everything", demo.patient("typical")))
            .await;
    }
    let reply = send("GET", &format!("{}/admin/upstreams", demo.admin), &[], None).await;
    let rows = reply.body["upstreams"].as_array().unwrap();
    let rxr = rows.iter().find(|r| r["ods"] == "RXR").unwrap();
    assert_eq!(rxr["error_rate"], 1.0);
    assert_eq!(
        rxr["last_error"], "rejected",
        "an HL7 v2 trust that errors rejects the query"
    );
    assert_eq!(rxr["breaker"], "closed");
    assert_eq!(rxr["in_flight"], 0);
    let rxl = rows.iter().find(|r| r["ods"] == "RXL").unwrap();
    assert_eq!(rxl["window_calls"], 3);
    assert!(rxl["p50_ms"].as_f64().unwrap() <= rxl["p99_ms"].as_f64().unwrap());
    assert_eq!(rxl["error_rate"], 0.0);
}

/// The SRE page in a real browser: rendered, sorted slowest first, refreshing itself; and a
/// screenshot of it is taken (kept in the target directory for a human to look at).
#[tokio::test]
async fn upstreams_page_renders_in_headless_chromium_slowest_first() {
    let Some(chromium) = super::tool("chromium") else {
        return;
    };
    let demo = Demo::start(&["--fault", "RXL=slow:400"]).await;
    for (nhs, _) in demo.samples.clone().iter().take(3) {
        demo.get(&format!("/Patient/{nhs}/$everything")).await;
    }
    let url = format!("{}/admin/upstreams", demo.admin);
    let profile = super::TempDir::new();
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--no-first-run",
                "--window-size=1600,900",
            ])
            .arg(format!("--user-data-dir={}", profile.0.display()))
            .args(extra)
            .arg(&url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Chromium asks for text/html like any browser, and gets the page.
    let dom = run(&["--dump-dom"]);
    assert!(dom.contains("<table id=\"upstreams\">"), "{dom}");
    assert!(
        dom.contains("http-equiv=\"refresh\""),
        "the page refreshes itself"
    );
    let first_row = dom.split("<tr ").nth(1).expect("a data row");
    assert!(
        first_row.contains("data-ods=\"RXL\""),
        "the slow trust is the top row: {first_row}"
    );

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("admin-upstreams.png");
    let _ = std::fs::remove_file(&shot);
    run(&[&format!("--screenshot={}", shot.display())]);
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
}
