//! `tributary serve --config FILE` and `tributary check --config FILE` against a region
//! described in TOML: real simulators in this process, the real binary talking to them.

use std::{process::Stdio, sync::Arc, time::Duration};

use connectors::synth::{Region, launch::launch, model::Label};

use super::{BIN, TempDir, check_config, send, served_base_url};

const KEY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/src/auth/demo-verifying-key.pem"
);

#[tokio::test]
async fn serve_runs_a_region_described_in_toml() {
    let region = Arc::new(Region::generate(7, 3, 60));
    let launched = launch(region.clone(), &[]).await.unwrap();
    let dir = TempDir::new();
    let mut sources = toml::Table::new();
    for s in &launched.sources {
        let mut t = toml::Table::new();
        t.insert("ods".into(), s.spec.ods.as_str().into());
        t.insert("name".into(), s.spec.name.as_str().into());
        t.insert("kind".into(), s.spec.kind.as_str().into());
        t.insert(
            "connector".into(),
            toml::Value::try_from(&s.config).unwrap(),
        );
        sources.insert(s.spec.id.clone(), t.into());
    }
    let config = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\naudit_dir = \"audit\"\n\n[budget]\ndefault = \"3s\"\n\n[auth]\naudience = \"tributary\"\nkeys = [{{ algorithm = \"ES256\", public_key_file = \"{KEY}\" }}]\n\n{}",
        toml::to_string(&toml::Table::from_iter([(
            "sources".to_owned(),
            toml::Value::Table(sources)
        )]))
        .unwrap()
    );
    let file = dir.0.join("region.toml");
    std::fs::write(&file, config).unwrap();

    let (passed, err) = check_config(&file).await;
    assert!(passed, "{err}");

    let mut child = tokio::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&file)
        .args([
            "--policies",
            concat!(env!("CARGO_MANIFEST_DIR"), "/policies"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = served_base_url(&mut child).await;
    let (nhs, _) = region
        .sample_patients()
        .into_iter()
        .find(|(_, l)| *l == Label::Typical)
        .unwrap();
    let org = region.summary(&nhs).unwrap().trusts[0].clone();
    let token = tributary::auth::mint_demo_token(
        "u",
        "R8000",
        org.as_str(),
        "direct-care",
        Duration::from_secs(600),
    )
    .unwrap();
    let reply = send(
        "GET",
        &format!("{base}/Patient/{}/$everything", nhs.expose()),
        &[("authorization", &format!("Bearer {token}"))],
        None,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert!(reply.resources().len() > 3);
    assert!(
        dir.0.join("audit").join("audit.jsonl").exists(),
        "audit dir is relative to the config file"
    );
}

#[tokio::test]
async fn check_reports_every_problem_at_once_and_fails() {
    let dir = TempDir::new();
    let file = dir.0.join("broken.toml");
    std::fs::write(
        &file,
        "[budget]\ndefault = \"soon\"\n\n[auth]\naudience = \"x\"\nkeys = []\n\n[sources.gp]\nods = \"P81001\"\nname = \"GP\"\nkind = \"surgery\"\nconnector = { type = \"fhir\", base_url = \"ftp://nope\" }\n\n[sources.rxl]\nods = \"RXL\"\nname = \"Blackpool\"\nkind = \"trust\"\nconnector = { type = \"fhir\", base_url = \"ftp://nope\" }\n",
    )
    .unwrap();
    let (passed, err) = check_config(&file).await;
    assert!(!passed, "{err}");
    for expect in [
        "broken.toml:2:11: [budget]",
        "soon",
        "keys is empty",
        "broken.toml:11:8: [sources.gp]",
        "surgery",
        "[sources.rxl]",
        "ftp://nope",
    ] {
        assert!(err.contains(expect), "missing `{expect}` in:\n{err}");
    }
}

#[tokio::test]
async fn the_example_config_in_the_repository_is_valid() {
    let out = tokio::process::Command::new(BIN)
        .args([
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/examples/region.toml"),
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
}
