//! The audit trail end to end: durable before release (kill -9 under load), hash chain
//! checked by `tributary audit verify`, tamper detection, break-glass alerts.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use serde_json::Value;

use super::{BIN, Demo, PATIENCE, TempDir, send};

/// Runs `tributary audit verify` on `paths`; (success, stdout).
fn verify(paths: &[&Path]) -> (bool, String) {
    let out = std::process::Command::new(BIN)
        .args(["audit", "verify"])
        .args(paths)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Every committed AuditEvent in `dir`, in chain order.
fn events(dir: &Path) -> Vec<Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    // Rotated files (audit-<seq>.jsonl) sort before the active audit.jsonl.
    files.sort_by_key(|p| (p.ends_with("audit.jsonl"), p.clone()));
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap()["event"].clone())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn extension<'a>(event: &'a Value, name: &str) -> &'a Value {
    event["extension"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["url"].as_str().unwrap().ends_with(name))
        .map_or(&Value::Null, |e| {
            e.get("valueString")
                .or_else(|| e.get("valueInteger"))
                .unwrap()
        })
}

#[tokio::test]
async fn every_response_a_client_received_survives_kill_9_and_the_chain_verifies_after_restart() {
    let audit = TempDir::new();
    let demo = Demo::start_in(TempDir::new(), audit.0.clone(), &[]).await;
    let patients: Vec<String> = demo.samples.iter().map(|(n, _)| n.clone()).collect();
    let received = Arc::new(Mutex::new(Vec::<String>::new()));
    let (base, token) = (demo.base.clone(), demo.token.clone());

    // Load: 8 clients in a loop until the process dies under them.
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let (base, token, patients, received) = (
                base.clone(),
                token.clone(),
                patients.clone(),
                received.clone(),
            );
            tokio::spawn(async move {
                let client: hyper_util::client::legacy::Client<
                    _,
                    http_body_util::Empty<hyper::body::Bytes>,
                > = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .build_http();
                for i in 0.. {
                    let nhs = &patients[(c * 7 + i) % patients.len()];
                    let req = hyper::Request::get(format!("{base}/Patient/{nhs}/$everything"))
                        .header("authorization", format!("Bearer {token}"))
                        .body(http_body_util::Empty::new())
                        .unwrap();
                    let Ok(Ok(resp)) = tokio::time::timeout(PATIENCE, client.request(req)).await
                    else {
                        return;
                    };
                    if resp.status() == 200 {
                        let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
                        // Only a complete body counts as received.
                        if http_body_util::BodyExt::collect(resp.into_body())
                            .await
                            .is_ok()
                        {
                            received.lock().unwrap().push(id);
                        }
                    }
                }
            })
        })
        .collect();
    let started = tokio::time::Instant::now();
    while received.lock().unwrap().len() < 300 {
        assert!(started.elapsed() < PATIENCE * 2, "load did not get going");
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut demo = demo;
    demo.child.start_kill().unwrap(); // SIGKILL
    demo.child.wait().await.unwrap();
    for c in clients {
        let _ = c.await;
    }
    let received = received.lock().unwrap().clone();
    assert!(received.len() >= 300);

    let (ok, out) = verify(&[&audit.0]);
    assert!(ok, "chain after kill -9: {out}");
    let audited: HashSet<String> = events(&audit.0)
        .iter()
        .map(|e| extension(e, "request-id").as_str().unwrap().to_owned())
        .collect();
    let missing: Vec<_> = received
        .iter()
        .filter(|id| !audited.contains(*id))
        .collect();
    assert!(missing.is_empty(), "released without audit: {missing:?}");

    // A restart picks the chain up where the killed process left it.
    let demo = Demo::start_in(TempDir::new(), audit.0.clone(), &[]).await;
    assert_eq!(
        demo.get(&format!("/Patient/{}", patients[0])).await.status,
        200
    );
    demo.stop().await;
    let (ok, out) = verify(&[&audit.0]);
    assert!(ok, "chain after restart: {out}");
    assert!(out.contains("seq 0 to"), "{out}");
}

#[tokio::test]
async fn records_are_audit_events_and_break_glass_feeds_durable_alerts() {
    let audit = TempDir::new();
    let demo = Demo::start_in(TempDir::new(), audit.0.clone(), &[]).await;
    let nhs = demo.patient("typical");
    let reply = demo
        .get_with(
            &format!("/Patient/{nhs}/$everything"),
            &[
                ("authorization", &format!("Bearer {}", demo.token)),
                ("x-break-glass", "patient unconscious in ED"),
                (
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
            ],
        )
        .await;
    assert_eq!(reply.status, 200);
    let request_id = reply.headers["x-request-id"].to_str().unwrap().to_owned();

    let events = events(&audit.0);
    let e = events
        .iter()
        .find(|e| extension(e, "request-id") == request_id.as_str())
        .unwrap();
    assert_eq!(e["resourceType"], "AuditEvent");
    assert_eq!(
        e["agent"][0]["who"]["identifier"]["value"],
        "demo-clinician"
    );
    assert!(
        e["agent"][1]["who"]["identifier"]["value"].is_string(),
        "the organisation"
    );
    assert_eq!(e["entity"][0]["what"]["identifier"]["value"], nhs.as_str());
    assert!(
        e["entity"].as_array().unwrap().len() > 2,
        "each source asked"
    );
    assert_eq!(e["purposeOfEvent"][1]["coding"][0]["code"], "BTG");
    assert_eq!(
        extension(e, "break-glass-reason"),
        "patient unconscious in ED"
    );
    assert_eq!(extension(e, "trace-id"), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(extension(e, "released").as_u64().unwrap() > 0);

    let alerts = send(
        "GET",
        &format!("{}/admin/audit/alerts", demo.admin),
        &[],
        None,
    )
    .await;
    assert_eq!(
        alerts.body["alerts"][0]["reason"],
        "patient unconscious in ED"
    );
    assert_eq!(alerts.body["alerts"][0]["request_id"], request_id.as_str());
    assert_eq!(
        alerts.body["alerts"][0]["refused"], false,
        "break glass was used"
    );
    assert!(
        !alerts.text.contains(nhs.as_str()),
        "alerts name the record, not the patient"
    );
    demo.stop().await;

    // Rebuilt from disk by the next process.
    let demo = Demo::start_in(TempDir::new(), audit.0.clone(), &[]).await;
    let alerts = send(
        "GET",
        &format!("{}/admin/audit/alerts", demo.admin),
        &[],
        None,
    )
    .await;
    assert_eq!(alerts.body["alerts"][0]["request_id"], request_id.as_str());
}

#[tokio::test]
async fn audit_verify_names_the_first_edited_deleted_or_reordered_record() {
    let audit = TempDir::new();
    let demo = Demo::start_in(TempDir::new(), audit.0.clone(), &[]).await;
    for (nhs, _) in demo.samples.clone().iter().take(5) {
        demo.get(&format!("/Patient/{nhs}")).await;
    }
    demo.stop().await;
    let file = audit.0.join("audit.jsonl");
    let (ok, out) = verify(&[&file]);
    assert!(ok && out.starts_with("OK: 5 records"), "{out}");
    let lines: Vec<String> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let tampered = TempDir::new();
    let check = |name: &str, lines: Vec<String>, expect: &str| {
        let f = tampered.0.join(format!("{name}.jsonl"));
        std::fs::write(&f, lines.join("\n") + "\n").unwrap();
        let (ok, out) = verify(&[&f]);
        assert!(!ok, "{name} went unnoticed");
        assert!(out.contains(expect), "{name}: {out}");
    };

    let mut edited = lines.clone();
    edited[2] = edited[2].replace("demo-clinician", "someone-else");
    check("edit", edited, "edit.jsonl:3 (seq 2): record was altered");

    let mut deleted = lines.clone();
    deleted.remove(1);
    check("delete", deleted, "delete.jsonl:2 (seq 2): expected seq 1");

    let mut reordered = lines.clone();
    reordered.swap(3, 4);
    check("reorder", reordered, "reorder.jsonl:4 (seq 4)");
}
