//! `/metrics` on the admin listener: the families SREs need, valid exposition text (checked
//! by `promtool check metrics`), and no patient in any label.

use super::{Demo, send, tool};

#[tokio::test]
async fn metrics_expose_requests_sources_and_audit_and_pass_promtool() {
    let demo = Demo::start(&["--fault", "RXR=error"]).await;
    for (nhs, _) in demo.samples.clone().iter().take(4) {
        demo.get(&format!("/Patient/{nhs}/$everything")).await;
    }
    demo.get("/Patient/9434765918").await; // 400
    let reply = send("GET", &format!("{}/metrics", demo.admin), &[], None).await;
    assert_eq!(reply.status, 200);
    assert!(
        reply.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = reply.text;
    for needle in [
        r#"tributary_request_duration_seconds_count{route="/fhir/Patient/{id}/$everything",status="200"} 4"#,
        r#"tributary_request_duration_seconds_count{route="/fhir/Patient/{id}",status="400"} 1"#,
        r#"tributary_source_call_duration_seconds_count{source="RXR",kind="trust",outcome="rejected"}"#,
        r#"tributary_source_call_duration_seconds_bucket{source="RXL",kind="trust",outcome="answered",le="+Inf"}"#,
        r#"tributary_source_calls_in_flight{source="RXL"} 0"#,
        r#"tributary_source_breaker_state{source="RXL"} 0"#,
        r#"tributary_source_hedges_total{source="RXL"} 0"#,
        "tributary_cache_hits_total 0",
        r#"tributary_policy_reloads_total{result="rejected"} 0"#,
        "tributary_audit_write_duration_seconds_count 4",
        "tributary_audit_commit_records_bucket",
        "tributary_audit_head_seq 4",
    ] {
        assert!(text.contains(needle), "missing {needle}\n{text}");
    }
    for (nhs, _) in &demo.samples {
        assert!(!text.contains(nhs.as_str()));
    }
    // What a leak check counts before and after a fault: all read live, all positive.
    for gauge in [
        "tributary_runtime_alive_tasks",
        "process_open_fds",
        "tributary_process_open_sockets",
        "process_resident_memory_bytes",
    ] {
        let value = text
            .lines()
            .find_map(|line| line.strip_prefix(gauge)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("missing {gauge}\n{text}"));
        assert!(value.parse::<f64>().unwrap() > 0.0, "{gauge} {value}");
    }

    let Some(promtool) = tool("promtool") else {
        return;
    };
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
