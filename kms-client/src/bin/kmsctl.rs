//! kmsctl: command-line client of the KMS (see `kmsctl --help`). Parses the command line,
//! runs one command, prints its report; on failure prints `error: <GRPC_CODE>: <message>`
//! (or `error: <message>` for local failures) on stderr and exits with 1. A verification
//! that fails (`audit verify`) prints its verdict on stdout and also exits with 1.

#[path = "kmsctl/audit.rs"]
mod audit;
#[path = "kmsctl/audit_cli.rs"]
mod audit_cli;
#[path = "kmsctl/cli.rs"]
mod cli;
#[path = "kmsctl/commands.rs"]
mod commands;
#[path = "kmsctl/disclosures.rs"]
mod disclosures;
#[path = "kmsctl/output.rs"]
mod output;

use std::{io::Write, process::ExitCode};

use clap::Parser;
use kms_client::code_name;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(&anyhow::anyhow!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(commands::run(&cli)) {
        Ok(report) => {
            let mut stdout = std::io::stdout().lock();
            match stdout
                .write_all(report.render(cli.json).as_bytes())
                .and_then(|()| stdout.flush())
            {
                Ok(()) if report.success() => ExitCode::SUCCESS,
                Ok(()) => ExitCode::FAILURE,
                Err(e) => fail(&anyhow::anyhow!("cannot write the output: {e}")),
            }
        }
        Err(err) => fail(&err),
    }
}

/// Prints the one-line error and returns the failure exit code.
fn fail(err: &anyhow::Error) -> ExitCode {
    eprintln!("{}", error_line(err));
    ExitCode::FAILURE
}

/// `error: CODE: message` for gRPC failures, `error: message` otherwise; always one line.
fn error_line(err: &anyhow::Error) -> String {
    let text = match err
        .downcast_ref::<kms_client::Error>()
        .and_then(kms_client::Error::status)
    {
        Some(status) => {
            let message = if status.message().is_empty() {
                status.code().description()
            } else {
                status.message()
            };
            format!("{}: {message}", code_name(status.code()))
        }
        None => format!("{err:#}"),
    };
    format!(
        "error: {}",
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_lines() {
        let rpc = anyhow::Error::new(kms_client::Error::Rpc {
            method: "Decrypt",
            endpoint: "https://a:1".into(),
            status: tonic::Status::permission_denied("not\nallowed"),
        });
        assert_eq!(error_line(&rpc), "error: PERMISSION_DENIED: not allowed");
        let local = anyhow::anyhow!("missing --ca");
        assert_eq!(error_line(&local), "error: missing --ca");
    }
}
