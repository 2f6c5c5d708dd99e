//! The processes a scenario runs (simulated upstreams, the gateway, nginx) and what /proc
//! says about them.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

/// Where things are.
#[derive(Debug, Clone)]
pub struct Env {
    pub repo: PathBuf,
    pub gateway_bin: PathBuf,
    pub nginx_bin: PathBuf,
    pub work: PathBuf,
}

/// The simulated upstreams process and what it told us.
pub struct Upstreams {
    _child: Child,
    pub sources: toml::Table,
    pub patients: Vec<String>,
    stats: PathBuf,
}

impl Upstreams {
    pub async fn start(env: &Env, name: &str, args: &[&str]) -> Result<Self, String> {
        let sources_out = env.work.join(format!("{name}-sources.toml"));
        let stats = env.work.join(format!("{name}-stats"));
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .arg("upstreams")
            .arg("--sources-out")
            .arg(&sources_out)
            .arg("--stats-out")
            .arg(&stats)
            .args(args)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| e.to_string())?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line == "ready" {
                    return Ok(());
                }
            }
            Err("upstreams exited before ready".to_owned())
        })
        .await
        .map_err(|_| "upstreams not ready in 60 s".to_owned())??;
        let text = std::fs::read_to_string(&sources_out).map_err(|e| e.to_string())?;
        let patients = text
            .lines()
            .filter_map(|l| l.strip_prefix("# patient "))
            .map(str::to_owned)
            .collect();
        let sources = text
            .parse::<toml::Table>()
            .map_err(|e| e.to_string())?
            .get("sources")
            .and_then(|s| s.as_table())
            .cloned()
            .unwrap_or_default();
        Ok(Self {
            _child: child,
            sources,
            patients,
            stats,
        })
    }

    /// Requests the proxies have forwarded so far (updated every 200 ms).
    pub async fn requests(&self) -> u64 {
        // Let the file catch up with the last requests.
        tokio::time::sleep(Duration::from_millis(450)).await;
        std::fs::read_to_string(&self.stats)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The `[sources.*]` tables as gateway config (without the harness's own keys).
    pub fn gateway_sources(&self) -> String {
        let mut out = String::new();
        for (id, table) in &self.sources {
            let Some(t) = table.as_table() else { continue };
            let mut t = t.clone();
            t.remove("fault");
            t.remove("upstream");
            let mut wrapper = toml::Table::new();
            let mut sources = toml::Table::new();
            sources.insert(id.clone(), toml::Value::Table(t));
            wrapper.insert("sources".into(), toml::Value::Table(sources));
            out.push_str(&toml::to_string(&wrapper).unwrap_or_default());
            out.push('\n');
        }
        out
    }

    pub fn count(&self) -> usize {
        self.sources.len()
    }

    pub fn has_demographics(&self) -> bool {
        self.sources
            .values()
            .any(|s| s.get("kind").and_then(|k| k.as_str()) == Some("demographics"))
    }
}

/// A running gateway (`tributary serve`).
pub struct Gateway {
    child: Child,
    pub pid: u32,
    pub base: String,
    pub admin: String,
    pub token: String,
}

impl Gateway {
    /// Starts the gateway on a config made of `sections` and the upstreams' sources.
    pub async fn start(
        env: &Env,
        name: &str,
        up: &Upstreams,
        sections: &str,
    ) -> Result<Self, String> {
        let plan = if up.has_demographics() {
            "locate"
        } else {
            "broadcast"
        };
        let key = env.repo.join("src/auth/demo-verifying-key.pem");
        // One generator sends every request with one token, far past any one clinician's
        // rate: the per-user and per-organisation limits would measure themselves, not the
        // gateway, so they are off here (S8 measures shedding, the limit that applies to all).
        let config = format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\n[limits]\nsub_rate = 0\norg_rate = 0\n\n[plan]\nmode = \"{plan}\"\n\n[auth]\naudience = \"tributary\"\nkeys = [{{ algorithm = \"ES256\", public_key_file = \"{}\" }}]\n\n{sections}\n\n{}",
            key.display(),
            up.gateway_sources()
        );
        let path = env.work.join(format!("{name}-gateway.toml"));
        std::fs::write(&path, config).map_err(|e| e.to_string())?;
        let audit = env.work.join(format!("{name}-audit"));
        let mut child = Command::new(&env.gateway_bin)
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .arg("--policies")
            .arg(env.repo.join("policies"))
            .arg("--audit-dir")
            .arg(&audit)
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("{}: {e}", env.gateway_bin.display()))?;
        let pid = child.id().ok_or("gateway has no pid")?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let (mut base, mut admin) = (None, None);
        tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(v) = line.strip_prefix("base URL ") {
                    base = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("admin URL ") {
                    admin = Some(v.to_owned());
                }
                if base.is_some() && admin.is_some() {
                    break;
                }
            }
        })
        .await
        .map_err(|_| "gateway not ready in 60 s".to_owned())?;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let token = Command::new(&env.gateway_bin)
            .args(["token", "--role", "R8000", "--org", "RXL", "--ttl", "2h"])
            .output()
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self {
            child,
            pid,
            base: base.ok_or("no base URL")?,
            admin: admin.ok_or("no admin URL")?,
            token: String::from_utf8_lossy(&token.stdout).trim().to_owned(),
        })
    }

    pub fn auth(&self) -> Vec<(String, String)> {
        vec![("authorization".into(), format!("Bearer {}", self.token))]
    }

    pub fn everything_urls(&self, patients: &[String]) -> Vec<String> {
        patients
            .iter()
            .map(|p| format!("{}/Patient/{p}/$everything", self.base))
            .collect()
    }

    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// nginx with a config of `server` body `body`, on a free port.
pub struct Nginx {
    child: Child,
    pub port: u16,
}

impl Nginx {
    pub async fn start(
        env: &Env,
        name: &str,
        http_extra: &str,
        body: &str,
    ) -> Result<Self, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let dir = env.work.join(format!("{name}-nginx"));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let conf = format!(
            "daemon off;\nworker_processes auto;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log error;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {dir};\n  proxy_temp_path {dir};\n  fastcgi_temp_path {dir};\n  uwsgi_temp_path {dir};\n  scgi_temp_path {dir};\n  {http_extra}\n  server {{\n    listen 127.0.0.1:{port};\n    {body}\n  }}\n}}\n",
            dir = dir.display()
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf).map_err(|e| e.to_string())?;
        let child = Command::new(&env.nginx_bin)
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(&dir)
            .kill_on_drop(true)
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("nginx: {e} (apt-get install nginx-light)"))?;
        // Bounded poll until it listens.
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(Self { child, port });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("nginx did not listen".into())
    }

    /// Stops nginx with SIGTERM, so the master takes its workers with it (SIGKILL to the
    /// master alone leaves the workers running); SIGKILL only if it has not gone in 5 s.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
            if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
                .await
                .is_ok()
            {
                return;
            }
        }
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// What /proc says about a process.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ProcStat {
    /// User + system CPU, seconds.
    pub cpu_s: f64,
    pub rss_mb: f64,
    pub threads: u64,
    pub fds: u64,
    pub sockets: u64,
}

pub fn proc_stat(pid: u32) -> ProcStat {
    let base = Path::new("/proc").join(pid.to_string());
    let stat = std::fs::read_to_string(base.join("stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    let cpu_s = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(base.join("status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let (mut fds, mut sockets) = (0, 0);
    if let Ok(entries) = std::fs::read_dir(base.join("fd")) {
        for e in entries.flatten() {
            fds += 1;
            if std::fs::read_link(e.path())
                .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
            {
                sockets += 1;
            }
        }
    }
    ProcStat {
        cpu_s,
        rss_mb: field("VmRSS:") / 1024.0,
        threads: field("Threads:") as u64,
        fds,
        sockets,
    }
}

/// The gateway's live gauges from its admin `/metrics`: tokio tasks alive, open descriptors,
/// open sockets and resident memory.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Gauges {
    pub tasks: u64,
    pub fds: u64,
    pub sockets: u64,
    pub rss_mb: f64,
}

/// Reads [`Gauges`] over a connection of its own that is closed straight after (no idle pool),
/// so the reading leaves nothing behind to be counted by the next one.
pub async fn gauges(admin: &str) -> Result<Gauges, String> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::{
        client::legacy::{Client, connect::HttpConnector},
        rt::TokioExecutor,
    };
    let client: Client<HttpConnector, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(HttpConnector::new());
    let req = hyper::Request::get(format!("{admin}/metrics"))
        .header("connection", "close")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| "/metrics did not answer in 10 s".to_owned())?
        .map_err(|e| e.to_string())?;
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let text = String::from_utf8_lossy(&body);
    let value = |name: &str| -> Result<f64, String> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (n, v) = l.split_once(' ')?;
                (n == name).then(|| v.trim().parse::<f64>().ok()).flatten()
            })
            .ok_or_else(|| format!("/metrics has no {name}"))
    };
    Ok(Gauges {
        tasks: value("tributary_runtime_alive_tasks")? as u64,
        fds: value("process_open_fds")? as u64,
        sockets: value("tributary_process_open_sockets")? as u64,
        rss_mb: value("process_resident_memory_bytes")? / (1024.0 * 1024.0),
    })
}
