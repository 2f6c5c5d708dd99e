//! The `tributary` command line.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{auth, config::Config, demo, server, telemetry};

#[derive(Debug, Parser)]
#[command(
    name = "tributary",
    version,
    about = "Federated shared care record gateway: one FHIR R4 facade over many organisations' systems"
)]
pub struct Cli {
    /// Log as JSON lines (stderr).
    #[arg(long, global = true)]
    log_json: bool,
    /// Export traces over OTLP to this collector (also OTEL_EXPORTER_OTLP_ENDPOINT).
    #[arg(long, global = true)]
    otlp_endpoint: Option<String>,
    /// OTLP protocol: http/protobuf (default) or grpc (also OTEL_EXPORTER_OTLP_PROTOCOL).
    #[arg(long, global = true)]
    otlp_protocol: Option<String>,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the demo's many flags make its variant large, which costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway and a synthetic region of real upstream servers on loopback.
    Demo(demo::DemoArgs),
    /// Run the gateway against a real region described by a TOML file.
    Serve(ServeArgs),
    /// Check a config file and report every problem at once.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Mint a bearer token signed with the demo key (demo only: the key is public).
    Token(TokenArgs),
    /// Check, test and explain the sharing policies (for IG officers).
    Policy {
        #[command(subcommand)]
        command: crate::policy::cli::PolicyCommand,
    },
    /// The audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the hash chain of audit files (oldest first; a directory means all its audit
    /// files in order) and name the first bad record.
    Verify {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[arg(long)]
    config: PathBuf,
    /// Policy directory (overrides the config's).
    #[arg(long)]
    policies: Option<PathBuf>,
    /// Audit directory (overrides the config's).
    #[arg(long)]
    audit_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct TokenArgs {
    /// National RBAC role code, e.g. R8000 (Clinical Practitioner).
    #[arg(long)]
    role: String,
    /// The caller's organisation's ODS code.
    #[arg(long)]
    org: String,
    #[arg(long, default_value = "demo-user")]
    sub: String,
    #[arg(long, default_value = "direct-care")]
    purpose: String,
    /// How long the token lasts, e.g. 8h, 30m.
    #[arg(long, default_value = "8h", value_parser = humantime::parse_duration)]
    ttl: Duration,
}

/// Parses the command line and runs it.
pub async fn run() -> ExitCode {
    let cli = Cli::parse();
    // The command line wins over `serve`'s config file, which wins over `OTEL_*`.
    let from_config = match &cli.command {
        Command::Serve(args) => Config::load(&args.config)
            .map(|c| c.otlp)
            .unwrap_or_default(),
        _ => telemetry::OtlpSettings::default(),
    };
    let otlp = telemetry::OtlpSettings {
        endpoint: cli.otlp_endpoint.clone().or(from_config.endpoint),
        protocol: cli.otlp_protocol.clone().or(from_config.protocol),
    };
    let telemetry = match telemetry::init(cli.log_json, &otlp) {
        Ok(t) => t,
        Err(e) => return report(Err(e)),
    };
    let code = match cli.command {
        Command::Demo(args) => report(demo::run(args).await),
        Command::Serve(args) => report(serve(args).await),
        Command::Audit(AuditCommand::Verify { files }) => audit_verify(&files),
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: OK ({} sources, plan {:?})",
                    config.display(),
                    c.sources.len(),
                    c.plan
                );
                ExitCode::SUCCESS
            }
            Err(problems) => {
                for p in &problems {
                    eprintln!("{p}");
                }
                eprintln!("{} problem(s) found", problems.len());
                ExitCode::FAILURE
            }
        },
        Command::Policy { command } => command.run(),
        Command::Token(t) => {
            match auth::mint_demo_token(&t.sub, &t.role, &t.org, &t.purpose, t.ttl) {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(e) => report(Err(e)),
            }
        }
    };
    telemetry.shutdown();
    code
}

fn audit_verify(files: &[PathBuf]) -> ExitCode {
    match crate::audit::chain::verify(files) {
        Ok(v) => {
            match (v.first_seq, &v.head) {
                (Some(first), Some((seq, hash))) => println!(
                    "OK: {} records, seq {first} to {seq}, head {hash}{}",
                    v.records,
                    if first == 0 {
                        ""
                    } else {
                        " (continues an earlier file)"
                    }
                ),
                _ => println!("OK: no records"),
            }
            ExitCode::SUCCESS
        }
        Err(bad) => {
            println!("FAILED: first bad record at {bad}");
            ExitCode::FAILURE
        }
    }
}

fn report(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    let config = Config::load(&args.config).map_err(|problems| {
        format!(
            "{} has problems:\n{}",
            args.config.display(),
            problems.join("\n")
        )
    })?;
    let audit_dir = args
        .audit_dir
        .or(config.audit_dir)
        .ok_or("no audit directory: set [gateway] audit_dir or pass --audit-dir (nothing is released unaudited)")?;
    let policies = args
        .policies
        .or(config.policies)
        .unwrap_or_else(|| PathBuf::from("policies"));
    let running = server::start(server::Settings {
        listen: config.listen,
        admin_listen: config.admin_listen,
        budget: config.budget,
        resilience: config.resilience,
        plan: config.plan,
        auth: config.auth,
        audit_dir,
        audit_mode: crate::audit::Mode::Durable,
        policy: crate::policy::load_for_serving(&policies)?,
        public_base_url: config.public_base_url,
        policy_dir: Some(policies),
        limits: config.limits,
        tls: config.tls,
        sources: config.sources,
    })
    .await?;
    println!("base URL {}", running.base_url);
    println!("admin URL {}", running.admin_url);
    server::stop_signal().await;
    running.shutdown().await;
    Ok(())
}
