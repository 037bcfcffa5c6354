//! notes-store entry point: parse arguments, set up logging, then either serve until SIGINT or
//! SIGTERM (no subcommand), or run an administrative command against the same database and
//! KMS: `rewrap` (a re-wrap campaign) or `key-usage` (the per-key-version report).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use notes_store::config::Config;
use notes_store::rewrap;

#[derive(Parser)]
#[command(
    version,
    about = "gRPC store of clinical session notes, envelope-encrypted with data keys from the KMS"
)]
struct Args {
    /// TOML configuration file (see config/notes-store.example.toml).
    #[arg(long, env = "NOTES_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Load and check the configuration, then exit.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Re-wrap every stored data key below its KMS key's primary version (after a rotation).
    /// Resumable: run it again after an interruption. Exit status 0 when done, 3 when some
    /// blobs were refused by the KMS (listed), 1 when aborted (KMS or database unreachable).
    Rewrap {
        /// Only revisions under this KMS key (alias or id).
        #[arg(long, conflicts_with = "all")]
        key: Option<String>,
        /// Every key (the default).
        #[arg(long)]
        all: bool,
        /// Blobs per BatchReEncrypt call (1-1000).
        #[arg(long, default_value_t = 500)]
        batch: usize,
        /// At most this many blobs per second.
        #[arg(long)]
        rate: Option<f64>,
        /// Batches in flight at once (3 kept two cores busiest in rewrap-bench).
        #[arg(long, default_value_t = 3)]
        parallel: usize,
        /// Count what would be re-wrapped; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Only print the key-usage report.
        #[arg(long)]
        report_only: bool,
        /// Print the summary and report as one JSON object on stdout.
        #[arg(long)]
        json: bool,
        /// Milliseconds between progress lines when stderr is not a terminal.
        #[arg(long, default_value_t = 2000)]
        progress_interval_ms: u64,
    },
    /// How many revisions depend on each KMS key version.
    KeyUsage {
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        json: bool,
    },
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
    let path = args
        .config
        .context("--config (or NOTES_CONFIG) is required")?;
    let cfg = Config::load(&path)?;
    if args.check_config {
        println!("configuration OK");
        return Ok(());
    }
    init_logging(&cfg);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = cfg.server.worker_threads {
        builder.worker_threads(threads);
    }
    let runtime = builder.enable_all().build().context("tokio runtime")?;
    match args.command {
        None => runtime.block_on(async {
            // Signal handlers go in before anything else, so no signal is ever missed.
            let stop = svc_common::shutdown::signal();
            notes_store::server::run(cfg, stop).await
        }),
        Some(Command::Rewrap {
            key,
            all: _,
            batch,
            rate,
            parallel,
            dry_run,
            report_only,
            json,
            progress_interval_ms,
        }) => {
            let opts = rewrap::Options {
                key,
                batch,
                rate,
                parallel,
                dry_run,
                progress_interval: Duration::from_millis(progress_interval_ms),
            };
            let code = runtime.block_on(rewrap_command(cfg, opts, report_only, json))?;
            std::process::exit(code)
        }
        Some(Command::KeyUsage { key, json }) => runtime.block_on(usage_command(cfg, key, json)),
    }
}

async fn open(
    cfg: &Config,
) -> anyhow::Result<(
    Arc<dyn notes_store::store::NoteStore>,
    notes_store::kms::Kms,
)> {
    let store = notes_store::store::connect(&cfg.database.url)
        .await
        .context("opening the notes database")?;
    let kms = notes_store::kms::Kms::from_config(cfg).context("KMS client")?;
    Ok((store, kms))
}

async fn rewrap_command(
    cfg: Config,
    opts: rewrap::Options,
    report_only: bool,
    json: bool,
) -> anyhow::Result<i32> {
    let (store, kms) = open(&cfg).await?;
    let summary = if report_only {
        None
    } else {
        Some(
            rewrap::run(store.clone(), kms.clone(), &opts)
                .await
                .context("re-wrap campaign aborted (run it again to continue)")?,
        )
    };
    let only = match &opts.key {
        Some(k) => Some(kms.client().describe_key(k).await?.key_id),
        None => None,
    };
    let report = rewrap::key_report(store.as_ref(), &kms, only.as_deref()).await?;
    if json {
        let out = serde_json::json!({ "summary": summary, "key_usage": report });
        println!("{out}");
    } else {
        if let Some(s) = &summary {
            println!(
                "rewrap {}: scanned {} revisions, re-wrapped {}, already current {}, raced {}, \
                 skipped (key unusable) {}, failed {} in {:.1} s ({:.0}/s)",
                if s.dry_run { "(dry run)" } else { "done" },
                s.scanned,
                if s.dry_run { s.to_rewrap } else { s.rewrapped },
                s.already_current,
                s.raced,
                s.skipped_unusable_key,
                s.failed,
                s.elapsed_seconds,
                s.rewrapped_per_second
            );
            for (reason, n) in &s.failures {
                println!("  failed x{n}: {reason}");
            }
        }
        print!("{}", rewrap::render(&report));
    }
    Ok(match summary {
        Some(s) if s.failed > 0 => 3,
        _ => 0,
    })
}

async fn usage_command(cfg: Config, key: Option<String>, json: bool) -> anyhow::Result<()> {
    let (store, kms) = open(&cfg).await?;
    let only = match &key {
        Some(k) => Some(kms.client().describe_key(k).await?.key_id),
        None => None,
    };
    let report = rewrap::key_report(store.as_ref(), &kms, only.as_deref()).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", rewrap::render(&report));
    }
    Ok(())
}
