//! Budgets through the real binary: breakers, the answer cache and load shedding.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{Demo, send};

const FETCHED_AT: &str = "https://tributary.example.org/fhir/StructureDefinition/fetched-at";

/// The upstream table's row for one ODS code.
pub(super) async fn upstream_row(demo: &Demo, ods: &str) -> Value {
    let reply = send("GET", &format!("{}/admin/upstreams", demo.admin), &[], None).await;
    reply.body["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["ods"] == ods)
        .cloned()
        .unwrap_or_else(|| panic!("no row for {ods}: {}", reply.text))
}

#[tokio::test]
async fn a_failing_source_trips_its_breaker_and_later_requests_report_it_not_asked() {
    // RXL (a trust, asked for every patient) answers garbage; two failures open its breaker.
    let demo = Demo::start(&["--fault", "RXL=garbage", "--breaker-failures", "2"]).await;
    let nhs = demo.patient("typical");
    for _ in 0..2 {
        let reply = demo.get(&format!("/Patient/{nhs}/$everything")).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert!(reply.issue_text().contains("RXL"), "{}", reply.issue_text());
    }
    assert_eq!(upstream_row(&demo, "RXL").await["breaker"], "open");
    assert_eq!(upstream_row(&demo, "RXN").await["breaker"], "closed");

    let reply = demo.get(&format!("/Patient/{nhs}/$everything")).await;
    assert_eq!(reply.status, 200, "partial record, not an error");
    let rxl = reply
        .issues()
        .into_iter()
        .filter_map(|i| i["details"]["text"].as_str().map(str::to_owned))
        .find(|t| t.starts_with("RXL"))
        .unwrap_or_else(|| panic!("RXL is named: {}", reply.issue_text()));
    assert!(
        rxl.contains("not asked") && rxl.ends_with("(breaker open)"),
        "{rxl}"
    );
    assert!(
        !reply.resources().is_empty(),
        "the other sources still answer"
    );
    demo.stop().await;
}

/// Every resource's fetch time, by id.
fn fetched_at(reply: &super::Reply) -> BTreeMap<String, String> {
    reply
        .resources()
        .iter()
        .filter_map(|r| {
            let at = r["meta"]["extension"]
                .as_array()?
                .iter()
                .find(|e| e["url"] == FETCHED_AT)?["valueInstant"]
                .as_str()?
                .to_owned();
            Some((r["id"].as_str()?.to_owned(), at))
        })
        .collect()
}

#[tokio::test]
async fn a_cached_answer_is_served_with_its_fetch_time_and_responses_are_no_store() {
    let demo = Demo::start(&[]).await;
    let nhs = demo.patient("typical");
    let first = demo.get(&format!("/Patient/{nhs}/$everything")).await;
    assert_eq!(first.status, 200, "{}", first.text);
    assert_eq!(first.headers["cache-control"], "no-store");
    let first_times = fetched_at(&first);
    assert!(
        first_times.len() > 1,
        "resources show when they were fetched: {}",
        first.text
    );

    let second = demo.get(&format!("/Patient/{nhs}/$everything")).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.headers["cache-control"], "no-store");
    let second_times = fetched_at(&second);
    assert_eq!(
        second_times, first_times,
        "served from the cache: the same fetch instants"
    );
    let metrics = send("GET", &format!("{}/metrics", demo.admin), &[], None).await;
    let hits: f64 = metrics
        .text
        .lines()
        .find(|l| l.starts_with("tributary_cache_hits_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no cache hit counter: {}", metrics.text));
    assert!(hits >= 1.0, "cache hits are counted in /metrics");
    demo.stop().await;
}

#[tokio::test]
async fn over_capacity_requests_are_shed_fast_with_503_retry_after_and_an_outcome() {
    // One request at a time; RXL is slow, so the first holds the only slot.
    let demo = Demo::start(&[
        "--max-in-flight",
        "1",
        "--fault",
        "RXL=slow:3000",
        "--cache-ttl",
        "0s",
    ])
    .await;
    let nhs = demo.patient("typical");
    let path = format!("/Patient/{nhs}/$everything");
    let replies = futures::future::join_all((0..4).map(|_| demo.get(&path))).await;
    let shed: Vec<_> = replies.iter().filter(|r| r.status == 503).collect();
    assert!(
        replies.iter().any(|r| r.status == 200),
        "one was served: {:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert!(!shed.is_empty(), "the others were shed");
    for r in shed {
        assert_eq!(r.headers["retry-after"], "1");
        assert_eq!(r.body["resourceType"], "OperationOutcome", "{}", r.text);
        assert_eq!(r.body["issue"][0]["code"], "throttled");
        assert!(r.headers.contains_key("x-request-id"));
    }
    let metadata = demo.get("/metadata").await;
    assert_eq!(metadata.status, 200, "metadata is never shed");
    demo.stop().await;
}

/// Copies a directory's files (one level of subdirectories) into another.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
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

#[tokio::test]
async fn cache_hit_still_applies_a_policy_tightened_after_the_answer_was_cached() {
    let dir = super::TempDir::new();
    let policies = dir.0.join("policies");
    copy_dir(
        std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/policies")),
        &policies,
    );
    let demo = Demo::start(&["--policies", policies.to_str().unwrap()]).await;
    let nhs = demo.patient("typical");
    let path = format!("/Patient/{nhs}/$everything");
    let loose = demo.get(&path).await;
    assert_eq!(loose.status, 200, "{}", loose.text);
    let clinical = |r: &super::Reply| {
        r.resources()
            .iter()
            .filter(|res| res["resourceType"] != "Patient")
            .count()
    };
    assert!(
        clinical(&loose) > 0,
        "the loose policy releases clinical data"
    );
    let patient_fetched = |r: &super::Reply| fetched_at(r).get(nhs.as_str()).cloned();
    let fetched_before = patient_fetched(&loose);
    assert!(fetched_before.is_some(), "{}", loose.text);

    // Tighten: no clinical data for anyone. Policy hot-reload picks the edit up.
    let mut baseline = std::fs::read_to_string(policies.join("baseline.cedar")).unwrap();
    baseline.push_str(
        "\n@id(\"test-tightened\")\n@reason(\"test: clinical data withheld from everyone\")\nforbid (principal, action == Action::\"read\", resource)\nwhen { resource.type != \"Patient\" };\n",
    );
    std::fs::write(policies.join("baseline.cedar"), baseline).unwrap();

    // Bounded poll: the reload is asynchronous (file watcher + debounce).
    let started = tokio::time::Instant::now();
    let tight = loop {
        let reply = demo.get(&path).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        if clinical(&reply) == 0 {
            break reply;
        }
        assert!(
            started.elapsed() < super::PATIENCE,
            "the tightened policy was never applied"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(
        patient_fetched(&tight),
        fetched_before,
        "the answer came from the cache, fetched before the policy changed"
    );
    assert!(
        tight.issue_text().contains("withheld"),
        "{}",
        tight.issue_text()
    );
    demo.stop().await;
}
