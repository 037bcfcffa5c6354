//! kms-server entry point: parse arguments, set up logging, run until SIGINT or SIGTERM.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use kms_server::config::Config;

#[derive(Parser)]
#[command(
    version,
    about = "gRPC key management service (PKCS#11 HSM / TPM master keys)"
)]
struct Args {
    /// TOML configuration file (see config/kms-server.example.toml).
    #[arg(long, env = "KMS_CONFIG")]
    config: PathBuf,
    /// Load and check the configuration, then exit.
    #[arg(long)]
    check_config: bool,
}

fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if cfg.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg = Config::load(&args.config)?;
    if args.check_config {
        if let Some(file) = &cfg.policy.file {
            kms_server::policy::Policy::load(file)
                .with_context(|| format!("policy {}", file.display()))?;
        }
        println!("configuration OK");
        return Ok(());
    }
    init_logging(&cfg);
    // libtss2 (TPM backend) prints every failed TPM command on stderr unless told otherwise;
    // the backend logs what matters. Set while this process has a single thread.
    if std::env::var_os("TSS2_LOG").is_none() {
        std::env::set_var("TSS2_LOG", "all+none");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    runtime.block_on(async {
        // Signal handlers go in before anything else, so no signal is ever missed.
        let stop = svc_common::shutdown::signal();
        kms_server::server::run(cfg, stop).await
    })
}
