//! Shared harness: start the binary, read what it prints, talk HTTP to it.

mod admin;
mod audit;
mod auth;
mod budgets;
mod errors;
mod facade_tls;
mod faults;
mod federation;
mod hostile_clients;
mod metrics;
mod policy;
mod serve;
mod telemetry;
mod upstream_tls;

use std::{path::PathBuf, process::Stdio, time::Duration};

use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode, body::Bytes, header::HeaderMap};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    process::{Child, Command},
    sync::mpsc,
};

/// `host:port` of a base URL such as `http://127.0.0.1:1234/fhir`.
pub fn authority(base: &str) -> String {
    base.split("://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap()
        .to_owned()
}

/// Runs `tributary check --config FILE`: whether it passed, and what it printed on stderr.
pub async fn check_config(file: &std::path::Path) -> (bool, String) {
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(file)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Reads a started `tributary serve`'s stdout until it prints its base URL.
pub async fn served_base_url(child: &mut Child) -> String {
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = tokio::time::timeout(PATIENCE, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .expect("serve exited early");
        if let Some(b) = line.strip_prefix("base URL ") {
            return b.to_owned();
        }
    }
}

pub const BIN: &str = env!("CARGO_BIN_EXE_tributary");
/// The most any test waits for the binary to start or a response to arrive. A guard against
/// a hung test, never a speed assertion.
pub const PATIENCE: Duration = Duration::from_secs(30);
/// How long a test waits for the gateway to cut off a client it set a 1 s timeout for:
/// generous, yet shorter than the 10 s defaults, so an ignored flag fails the test.
pub const CUT_OFF_GUARD: Duration = Duration::from_secs(8);

/// A running `tributary demo` and what it printed.
pub struct Demo {
    pub child: Child,
    pub base: String,
    pub admin: String,
    pub token: String,
    pub samples: Vec<(String, String)>,
    pub audit_dir: PathBuf,
    /// The demo CA's PEM file (`--tls`).
    pub ca_file: Option<PathBuf>,
    /// Every line printed before ready (the banner and the commands to paste).
    pub printed: Vec<String>,
    /// Everything the process wrote to stderr (its logs), collected as it runs.
    stderr: mpsc::UnboundedReceiver<String>,
    _dir: TempDir,
}

impl Demo {
    /// Starts a small demo region; `extra` adds flags (e.g. `--fault RXL=hang`).
    pub async fn start(extra: &[&str]) -> Demo {
        let dir = TempDir::new();
        let audit_dir = dir.0.join("audit");
        Self::start_in(dir, audit_dir, extra).await
    }

    /// As [`Demo::start`], with the audit log in `audit_dir` (which the test may prepare).
    pub async fn start_in(dir: TempDir, audit_dir: PathBuf, extra: &[&str]) -> Demo {
        Self::start_env(dir, audit_dir, extra, &[]).await
    }

    /// As [`Demo::start_in`], with extra environment variables (e.g. `OTEL_*`).
    pub async fn start_env(
        dir: TempDir,
        audit_dir: PathBuf,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Demo {
        let mut child = Command::new(BIN)
            .args([
                "demo",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--practices",
                "6",
                "--patients",
                "400",
            ])
            .args(if extra.contains(&"--policies") {
                &[][..]
            } else {
                &[
                    "--policies",
                    concat!(env!("CARGO_MANIFEST_DIR"), "/policies"),
                ][..]
            })
            .arg("--audit-dir")
            .arg(&audit_dir)
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn tributary");
        let stdout = child.stdout.take().unwrap();
        let mut stderr = forward_lines(child.stderr.take().unwrap());
        let mut lines = BufReader::new(stdout).lines();
        let (mut base, mut admin, mut token, mut samples) = (None, None, None, Vec::new());
        let (mut ca_file, mut printed) = (None, Vec::new());
        let started = tokio::time::Instant::now();
        loop {
            let line = tokio::time::timeout(
                PATIENCE.saturating_sub(started.elapsed()),
                lines.next_line(),
            )
            .await
            .expect("demo did not become ready in time")
            .expect("read stdout");
            let Some(line) = line else {
                let mut logs = String::new();
                while let Ok(l) = stderr.try_recv() {
                    logs.push_str(&l);
                    logs.push('\n');
                }
                panic!("demo exited before it was ready:\n{logs}");
            };
            printed.push(line.clone());
            if let Some(v) = line.strip_prefix("CA file ") {
                ca_file = Some(PathBuf::from(v));
            } else if let Some(v) = line.strip_prefix("base URL ") {
                base = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("admin URL ") {
                admin = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("token ") {
                token = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("sample patient ") {
                let (nhs, label) = v.split_once(' ').unwrap();
                samples.push((nhs.to_owned(), label.to_owned()));
            } else if line.starts_with("Tributary is ready.") {
                break;
            }
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Demo {
            child,
            base: base.unwrap(),
            admin: admin.unwrap(),
            token: token.unwrap(),
            samples,
            audit_dir,
            ca_file,
            printed,
            stderr,
            _dir: dir,
        }
    }

    /// The first sample patient with this label.
    pub fn patient(&self, label: &str) -> String {
        self.samples
            .iter()
            .find(|(_, l)| l == label)
            .map(|(n, _)| n.clone())
            .unwrap_or_else(|| panic!("no sample patient labelled {label}"))
    }

    /// GET with the demo token.
    pub async fn get(&self, path: &str) -> Reply {
        self.get_with(
            path,
            &[("authorization", &format!("Bearer {}", self.token))],
        )
        .await
    }

    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        send("GET", &format!("{}{path}", self.base), headers, None).await
    }

    /// Stops the process and returns everything it logged.
    pub async fn stop(mut self) -> String {
        self.child.start_kill().ok();
        let _ = self.child.wait().await;
        let mut logs = String::new();
        while let Some(line) = self.stderr.recv().await {
            logs.push_str(&line);
            logs.push('\n');
        }
        logs
    }
}

fn forward_lines(r: impl AsyncRead + Unpin + Send + 'static) -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// An HTTP reply with its body read (as JSON when it is JSON).
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Reply {
    /// The issues of an OperationOutcome body, or of a Bundle's outcome entry.
    pub fn issues(&self) -> Vec<Value> {
        let outcome = if self.body["resourceType"] == "Bundle" {
            self.body["entry"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["search"]["mode"] == "outcome")
                .map(|e| e["resource"].clone())
                .unwrap()
        } else {
            self.body.clone()
        };
        assert_eq!(outcome["resourceType"], "OperationOutcome", "{}", self.text);
        outcome["issue"].as_array().unwrap().clone()
    }

    /// The issues' texts, joined, for `contains` checks.
    pub fn issue_text(&self) -> String {
        self.issues()
            .iter()
            .map(|i| {
                format!(
                    "[{}/{}] {}",
                    i["severity"].as_str().unwrap_or(""),
                    i["code"].as_str().unwrap_or(""),
                    i["details"]["text"].as_str().unwrap_or("")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The match entries' resources.
    pub fn resources(&self) -> Vec<Value> {
        self.body["entry"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["search"]["mode"] == "match")
            .map(|e| e["resource"].clone())
            .collect()
    }
}

pub async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, &str)>,
) -> Reply {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut request = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let body = match body {
        Some((content_type, b)) => {
            request = request.header("content-type", content_type);
            Full::new(Bytes::from(b.to_owned()))
        }
        None => Full::new(Bytes::new()),
    };
    let response = tokio::time::timeout(PATIENCE, client.request(request.body(body).unwrap()))
        .await
        .expect("no response in time")
        .expect("request");
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        text,
    }
}

/// An outside tool a test needs (`promtool`, `chromium`): its path, or `None` to skip the
/// test when it is missing and `CI` is unset. Under `CI=true` a missing tool fails the test.
pub fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
        assert!(
            !ci,
            "{name} is not installed and CI is set: .ci/run installs it (apt-get install prometheus chromium)"
        );
        eprintln!("SKIPPED: {name} is not installed (CI is unset); install it to run this test");
    }
    found
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tributary-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
