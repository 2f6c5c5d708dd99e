//! Running a gateway: build every source's stack, bind the facade and admin listeners, serve
//! until told to stop, then drain (the accept loop is [`crate::listener`]).

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tracing::info;

use crate::{
    admin::{self, Admin},
    audit::AuditLog,
    auth::Verifier,
    config::{AuthSettings, Budget, Limits, Resilience, SourceConfig},
    facade::{self, Facade},
    fanout::{Source, StackSettings},
    gateway::Gateway,
    listener::{self, Listen},
    plan::PlanMode,
    policy::PolicyEngine,
    ratelimit::RateLimits,
    upstreams::UpstreamStats,
};

/// What a running gateway is made of, whatever started it (`serve` or `demo`).
#[derive(Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub budget: Budget,
    pub resilience: Resilience,
    pub plan: PlanMode,
    pub auth: AuthSettings,
    pub audit_dir: PathBuf,
    /// [`crate::audit::Mode::Durable`] except in benchmarks that price the audit trail.
    pub audit_mode: crate::audit::Mode,
    pub policy: Arc<PolicyEngine>,
    /// Watched for changes: a valid edit is in force within 2 s.
    pub policy_dir: Option<PathBuf>,
    /// The base URL clients use; default `http://{listen address}/fhir`.
    pub public_base_url: Option<String>,
    /// Hostile-client limits at the facade.
    pub limits: Limits,
    /// Serve the facade over TLS (HTTP/2 and HTTP/1.1 by ALPN); plain HTTP without.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub sources: Vec<SourceConfig>,
}

/// A gateway serving on its listeners.
#[derive(Debug)]
pub struct Running {
    pub base_url: String,
    pub admin_url: String,
    pub audit_path: PathBuf,
    stop: watch::Sender<bool>,
    ready: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<std::io::Result<()>>>,
    sweeper: JoinHandle<()>,
    _policy_watch: Option<crate::policy::WatchHandle>,
}

/// Builds the gateway and starts serving; returns once both listeners are bound.
pub async fn start(settings: Settings) -> Result<Running, String> {
    let resilience = &settings.resilience;
    let cache = (resilience.cache.max_bytes > 0)
        .then(|| crate::cache::AnswerCache::new(resilience.cache.clone()));
    let stack = StackSettings {
        breaker: resilience.breaker,
        hedge: resilience.hedge,
        cache,
        ..StackSettings::default()
    };
    let mut sources = Vec::with_capacity(settings.sources.len());
    for s in &settings.sources {
        let connector = s
            .connector
            .build(&s.id, s.ods.clone(), &s.name, s.kind)
            .map_err(|e| format!("source {}: {e}", s.id))?;
        sources.push(Source::new(
            connector,
            StackSettings {
                max_concurrency: s.max_concurrency,
                ..stack.clone()
            },
        ));
    }
    let policy_watch = match &settings.policy_dir {
        Some(dir) => Some(
            settings
                .policy
                .watch(dir)
                .map_err(|e| format!("cannot watch {}: {e}", dir.display()))?,
        ),
        None => None,
    };
    let policy = settings.policy.clone();
    let audit = AuditLog::open_mode(&settings.audit_dir, settings.audit_mode)
        .await
        .map_err(|e| e.to_string())?;
    let audit_path = audit.path().to_owned();
    let gateway = Arc::new(Gateway {
        upstreams: UpstreamStats::new(sources.iter().map(|s| s.stats.clone()).collect()),
        sources,
        plan: settings.plan,
        budget: settings.budget,
        policy: settings.policy,
        audit,
        finish: crate::gateway::FinishTail::starting_at(crate::gateway::FinishTail::COLD_START),
    });
    let verifier = Arc::new(Verifier::new(
        settings.auth.keys,
        settings.auth.audience,
        settings.auth.issuer,
    ));

    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", settings.listen))?;
    let admin_listener = TcpListener::bind(settings.admin_listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", settings.admin_listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let admin_addr = admin_listener.local_addr().map_err(|e| e.to_string())?;
    let base_url = settings.public_base_url.clone().unwrap_or_else(|| {
        let scheme = if settings.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{addr}/fhir")
    });

    let (stop, stopped) = watch::channel(false);
    let ready = Arc::new(AtomicBool::new(true));
    let limits = Arc::new(RateLimits::new(
        settings.limits.sub(),
        settings.limits.org(),
    ));
    let sweeper = RateLimits::sweeper(&limits, Duration::from_secs(60));
    let facade = facade::router(Facade {
        gateway: gateway.clone(),
        verifier,
        base_url: base_url.as_str().into(),
        shed: facade::Shedder::new(settings.resilience.shed),
        limits,
        max_body_bytes: settings.limits.max_body_bytes,
        // The same patience as for the request head.
        body_timeout: settings.limits.header_read_timeout,
    });
    let admin = admin::router(Admin {
        gateway,
        ready: ready.clone(),
    })
    .merge(crate::policy::admin_router(policy));
    let tasks = vec![
        listener::serve(
            listener,
            facade,
            Listen {
                limits: settings.limits,
                tls: settings.tls,
                retry_after: settings.resilience.shed.retry_after,
            },
            stopped.clone(),
        ),
        // The admin listener stays plain HTTP (loopback by default), with the same limits.
        listener::serve(
            admin_listener,
            admin,
            Listen {
                limits: settings.limits,
                tls: None,
                retry_after: settings.resilience.shed.retry_after,
            },
            stopped,
        ),
    ];
    info!(%addr, admin = %admin_addr, "Tributary is serving.");
    Ok(Running {
        base_url,
        admin_url: format!("http://{admin_addr}"),
        audit_path,
        stop,
        ready,
        tasks,
        sweeper,
        _policy_watch: policy_watch,
    })
}

impl Running {
    /// Stops taking new connections, finishes requests in flight, and returns.
    pub async fn shutdown(self) {
        self.ready.store(false, Ordering::Release);
        let _ = self.stop.send(true);
        self.sweeper.abort();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Waits for Ctrl-C or SIGTERM.
pub async fn stop_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
