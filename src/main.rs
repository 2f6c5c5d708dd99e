//! The `tributary` binary.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    tributary::cli::run().await
}
