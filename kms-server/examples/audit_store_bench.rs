//! Audit store throughput: durable events/s appended in batches, on SQLite (WAL,
//! `synchronous = FULL`) and PostgreSQL, plus the time of a few typical queries afterwards.
//!
//! ```text
//! cargo run --release -p kms-server --example audit_store_bench -- \
//!     [--events 50000] [--batches 100,250,500] [--pg-url postgres://postgres@127.0.0.1/postgres]
//! ```
//! Each run uses a fresh database: a SQLite file in a temp dir, a PostgreSQL database
//! `kms_audit_bench_<random>` created through `--pg-url` (a role that may create databases) and
//! dropped at the end. Batches are appended one after the other, as the audit writer does.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use kms_audit::{AuditEvent, Chain, EventFields};
use kms_server::audit::{AuditStore, EventFilter};
use kms_server::store;
use sqlx::{Connection, PgConnection};

#[derive(Parser)]
struct Args {
    /// Events appended per run.
    #[arg(long, default_value_t = 50_000)]
    events: u32,
    /// Batch sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "100,250,500")]
    batches: Vec<usize>,
    /// PostgreSQL server (the bench creates and drops its own database there).
    #[arg(
        long,
        env = "KMS_TEST_PG_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pg_url: String,
    /// Skip PostgreSQL.
    #[arg(long)]
    no_postgres: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // RUST_LOG=sqlx::query=debug shows each statement with its time.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let events = make_events(args.events)?;
    println!(
        "{} events of ~{} bytes of JSON each",
        events.len(),
        serde_json::to_string(&events[0])?.len()
    );
    for &batch in &args.batches {
        let dir = tempfile::tempdir()?;
        let url = format!("sqlite:{}", dir.path().join("bench.db").display());
        let (_, audit) = store::connect_both(&url).await?;
        run("sqlite", audit.as_ref(), &events, batch).await?;
        queries(audit.as_ref()).await?;
    }
    if !args.no_postgres {
        for &batch in &args.batches {
            let (name, url) = create_pg_database(&args.pg_url).await?;
            let result = async {
                let (_, audit) = store::connect_both(&url).await?;
                run("postgres", audit.as_ref(), &events, batch).await?;
                queries(audit.as_ref()).await
            }
            .await;
            drop_pg_database(&args.pg_url, &name).await?;
            result?;
        }
    }
    Ok(())
}

/// One node's chain with realistic fields: a service caller, a key, two context pairs.
fn make_events(count: u32) -> anyhow::Result<Vec<AuditEvent>> {
    let mut chain = Chain::genesis("kms-bench-node");
    (0..count)
        .map(|i| {
            let context = BTreeMap::from([
                ("client".to_owned(), format!("c-{}", i % 1000)),
                ("note_id".to_owned(), format!("n-{i}")),
            ]);
            let fields = EventFields {
                time_ms: 1_700_000_000_000 + i64::from(i),
                request_id: format!("{:032x}", u128::from(i) * 0x9e37_79b9_7f4a_7c15),
                caller: format!("spiffe://clinic/svc-{}", i % 8),
                caller_fingerprint: "ab".repeat(32),
                role: "service".to_owned(),
                operation: ["GenerateDataKey", "Decrypt"][i as usize % 2].to_owned(),
                key_id: Some(format!("tenant-{}/notes", i % 50)),
                key_version: Some(1),
                context,
                acting_user: format!("dr-{}", i % 200),
                purpose: "read-note".to_owned(),
                outcome: "OK".to_owned(),
                latency_us: 850,
                detail: String::new(),
            };
            chain.append(fields).context("chain append")
        })
        .collect()
}

async fn run(
    db: &str,
    audit: &dyn AuditStore,
    events: &[AuditEvent],
    batch: usize,
) -> anyhow::Result<()> {
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    for chunk in events.chunks(batch) {
        let t = Instant::now();
        audit.append_events(chunk).await?;
        slowest = slowest.max(t.elapsed());
    }
    let elapsed = started.elapsed();
    let batches = events.len().div_ceil(batch);
    println!(
        "{db:8} batch {batch:4}: {:>8.0} events/s  ({batches} commits, {:.2} ms mean, {:.2} ms max per batch)",
        events.len() as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1000.0 / batches as f64,
        slowest.as_secs_f64() * 1000.0,
    );
    Ok(())
}

/// Typical auditor queries on the filled store, each asking for at most 100 events.
async fn queries(audit: &dyn AuditStore) -> anyhow::Result<()> {
    let node = Some("kms-bench-node".to_owned());
    let cases = [
        (
            "context client=c-7",
            EventFilter {
                context: Some(("client".into(), "c-7".into())),
                ..EventFilter::default()
            },
        ),
        (
            "node + context",
            EventFilter {
                node_id: node.clone(),
                context: Some(("client".into(), "c-7".into())),
                ..EventFilter::default()
            },
        ),
        (
            "key_id",
            EventFilter {
                key_id: Some("tenant-7/notes".into()),
                ..EventFilter::default()
            },
        ),
        (
            "node + after_seq page",
            EventFilter {
                node_id: node.clone(),
                after_seq: Some(20_000),
                ..EventFilter::default()
            },
        ),
        (
            "time range",
            EventFilter {
                from_time_ms: Some(1_700_000_010_000),
                to_time_ms: Some(1_700_000_010_050),
                ..EventFilter::default()
            },
        ),
    ];
    let mut line = String::from("           queries:");
    for (name, filter) in cases {
        let t = Instant::now();
        let found = audit.query_events(&filter, 100).await?.len();
        line.push_str(&format!(
            " {name} {:.1} ms ({found});",
            t.elapsed().as_secs_f64() * 1000.0
        ));
    }
    println!("{line}");
    Ok(())
}

async fn create_pg_database(admin_url: &str) -> anyhow::Result<(String, String)> {
    let name = format!("kms_audit_bench_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(admin_url)
        .await
        .context("connect to --pg-url")?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await?;
    admin.close().await?;
    Ok((name.clone(), url_for_database(admin_url, &name)))
}

/// `url` with its database (path) replaced by `database`, query string (e.g. `host=` of a
/// Unix socket directory) kept.
fn url_for_database(url: &str, database: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let authority = base.find("://").map_or(0, |i| i + 3);
    let prefix = base[authority..]
        .find('/')
        .map_or(base, |i| &base[..authority + i]);
    match query {
        Some(query) => format!("{prefix}/{database}?{query}"),
        None => format!("{prefix}/{database}"),
    }
}

async fn drop_pg_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let mut admin = PgConnection::connect(admin_url).await?;
    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut admin)
        .await?;
    admin.close().await?;
    Ok(())
}
