//! `tributary policy check | test | explain`: the IG officers' tools.

use std::{path::PathBuf, process::ExitCode};

use super::{
    PolicyEngine,
    cases::{Case, load_cases, parse_case},
    load::load_dir,
};

fn default_dir() -> PathBuf {
    PathBuf::from("policies")
}

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Check every file in the policy directory against the schema; lists every problem.
    Check {
        /// The policy directory.
        #[arg(default_value = "policies")]
        dir: PathBuf,
    },
    /// Run the test cases in DIR/tests/*.toml and print each result.
    Test {
        #[arg(default_value = "policies")]
        dir: PathBuf,
    },
    /// Say which policy decided a case, and why. CASE is a file holding one case (TOML or JSON,
    /// the shape of a test case) or a test file of [[case]]s.
    Explain {
        case: PathBuf,
        /// The policy directory.
        #[arg(long, default_value_os_t = default_dir())]
        dir: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

impl PolicyCommand {
    pub fn run(self) -> ExitCode {
        match self {
            Self::Check { dir } => check(&dir),
            Self::Test { dir } => test(&dir),
            Self::Explain { case, dir, json } => explain(&case, &dir, json),
        }
    }
}

#[allow(clippy::print_stdout)]
fn check(dir: &std::path::Path) -> ExitCode {
    let mut problems: Vec<String> = Vec::new();
    let bundle = match load_dir(dir) {
        Ok(b) => Some(b),
        Err(diags) => {
            problems.extend(diags.iter().map(ToString::to_string));
            None
        }
    };
    if let Err(diags) = load_cases(dir) {
        problems.extend(diags.iter().map(ToString::to_string));
    }
    if problems.is_empty() {
        if let Some(b) = bundle {
            println!(
                "ok: {} policies, {} roles, {} code-set files, in {}",
                b.policies.num_of_policies(),
                b.roles.len(),
                b.codes.files.len(),
                dir.display()
            );
        }
        ExitCode::SUCCESS
    } else {
        for p in &problems {
            eprintln!("{p}");
        }
        eprintln!(
            "{} problem(s); the gateway would refuse this policy directory",
            problems.len()
        );
        ExitCode::FAILURE
    }
}

#[allow(clippy::print_stdout)]
fn test(dir: &std::path::Path) -> ExitCode {
    let engine = match PolicyEngine::load(dir) {
        Ok(e) => e,
        Err(diags) => {
            for d in diags {
                eprintln!("{d}");
            }
            return ExitCode::FAILURE;
        }
    };
    let cases = match load_cases(dir) {
        Ok(c) => c,
        Err(diags) => {
            for d in diags {
                eprintln!("{d}");
            }
            return ExitCode::FAILURE;
        }
    };
    let (mut passed, mut failed) = (0, 0);
    for (file, line, case) in &cases {
        let e = case.explain(&engine);
        let got = Case::outcome(&e);
        let want = case.expect;
        if Some(got) == want {
            passed += 1;
            println!("pass  {file}:{line}  {}", case.name);
        } else {
            failed += 1;
            println!(
                "FAIL  {file}:{line}  {}\n      expected {want:?}, got {got:?}: {}",
                case.name, e.summary
            );
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed == 0 && passed > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[allow(clippy::print_stdout)]
fn explain(case_file: &std::path::Path, dir: &std::path::Path, as_json: bool) -> ExitCode {
    let engine = match PolicyEngine::load(dir) {
        Ok(e) => e,
        Err(diags) => {
            for d in diags {
                eprintln!("{d}");
            }
            return ExitCode::FAILURE;
        }
    };
    let text = match std::fs::read_to_string(case_file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: cannot read the file: {e}", case_file.display());
            return ExitCode::FAILURE;
        }
    };
    let cases = match parse_case(&text) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {e}", case_file.display());
            return ExitCode::FAILURE;
        }
    };
    for case in cases {
        let e = case.explain(&engine);
        if as_json {
            match serde_json::to_string_pretty(&e) {
                Ok(s) => println!("{s}"),
                Err(err) => eprintln!("cannot print the explanation: {err}"),
            }
        } else {
            println!(
                "{}: {}",
                if case.name.is_empty() {
                    "case"
                } else {
                    &case.name
                },
                e.summary
            );
            for s in &e.sources {
                println!("  {} {}: {}", s.kind, s.ods, s.why);
                for p in &s.policies {
                    println!(
                        "    {} {} ({}:{}){}",
                        p.effect,
                        p.id,
                        p.file,
                        p.line,
                        p.reason
                            .as_ref()
                            .map(|r| format!(": {r}"))
                            .unwrap_or_default()
                    );
                }
            }
        }
    }
    ExitCode::SUCCESS
}
