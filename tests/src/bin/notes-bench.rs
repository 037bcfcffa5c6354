//! notes-bench: throughput and latency of notes-store (CreateNote, GetNote with 2 KiB bodies)
//! over mutual TLS, on SQLite and PostgreSQL, as a ratio of the same KMS's GenerateDataKey
//! throughput measured in the same run; and the durable audit event rate of that KMS while
//! GenerateDataKey runs at full load (every answered call must have its event: `dropped`).
//!
//! The ratio's denominator is GenerateDataKey measured in slices interleaved with the notes
//! measurement's (`--rounds`, README session 17): this VM's speed drifts by up to 2x within
//! minutes and by up to a fifth within half a minute, so a baseline measured apart from the
//! notes (once at the start of the run; later 9 s before and 9 s after the window) compared
//! the notes with another machine state. With an even `--rounds` each series' slices are
//! centred on the same instant; each ratio is total calls over total measured time, for the
//! notes and for the baseline, and the lines carry every slice's rate.
//!
//! `ratio` (issue #3's goal) divides by GenerateDataKey as this benchmark's first phase calls
//! it: one key, a two-pair context. notes-store's own calls cost the KMS more: one key per
//! client and a four-pair context with a fresh note id, which the audit log indexes (README,
//! session 12).
//! `notes_create` therefore also carries `ratio_vs_notes_shaped_gdk`, against GenerateDataKey
//! calls shaped like notes-store's (one key per bench client, the same four context keys, a
//! new time-ordered note id per call), measured the same way around the same window: what
//! notes-store adds to the KMS call it has to make.
//!
//! One self-contained run: the harness starts a kms-server (own token, PKI, SQLite, free port)
//! and one notes-store per database. Progress goes to stderr; stdout carries one JSON line per
//! benchmark. Load generator and servers share the machine's cores: the figures say so.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use kms_client::AuditFilter;
use kms_proto::kms::v1 as pb;
use kms_proto::kms::v1::key_management_service_client::KeyManagementServiceClient;
use kms_proto::notes::v1 as npb;
use kms_proto::notes::v1::notes_service_client::NotesServiceClient;
use kms_tests::cpu::{CpuSnapshot, CpuUse};
use kms_tests::metrics;
use kms_tests::notes::{create_request, get_request};
use kms_tests::{pg, wire_ctx, KmsServer, NotesOptions, NotesServer, ServerOptions, AUDITOR};
use serde_json::{json, Value};
use sqlx::postgres::PgConnectOptions;
use tonic::transport::Channel;

#[derive(Parser, Debug)]
#[command(about = "Load generator for notes-store (CreateNote, GetNote) and the KMS audit log")]
struct Args {
    /// Concurrent request loops (tokio tasks), each with one request in flight.
    #[arg(long, default_value_t = 16)]
    streams: usize,
    /// Clients (practice clients, each with its own KMS key) that each stream writes notes
    /// for. Their keys are created before `notes_create` is measured: a client's first note
    /// creates its key (`notes_first_note` reports that separately).
    #[arg(long, default_value_t = 8)]
    clients_per_stream: u64,
    /// Measured seconds per benchmark.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Unmeasured seconds of load before the first GenerateDataKey measurement.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Slices each notes measurement and its GenerateDataKey baselines are cut into,
    /// interleaved: the measured `--seconds` of each series are spread over this many rounds.
    #[arg(long, default_value_t = 4)]
    rounds: u32,
    /// Unmeasured milliseconds of load before each slice.
    #[arg(long, default_value_t = 500)]
    slice_warmup_ms: u64,
    /// HTTP/2 connections the streams share (round robin).
    #[arg(long, default_value_t = 4)]
    channels: usize,
    /// Note body size in bytes.
    #[arg(long, default_value_t = 2048)]
    body_bytes: usize,
    /// Databases to run notes-store on: sqlite, pg-tcp (KMS_TEST_PG_URL or 127.0.0.1:5432),
    /// pg-unix (the same server, and port, through the socket directory below).
    #[arg(long, value_delimiter = ',', default_value = "sqlite,pg-tcp,pg-unix")]
    db: Vec<String>,
    /// Directory of the Unix socket for `pg-unix` (`scripts/with-postgres.sh` sets the
    /// variable for a cluster it starts).
    #[arg(
        long,
        env = "KMS_TEST_PG_SOCKET_DIR",
        default_value = "/var/run/postgresql"
    )]
    pg_socket_dir: String,
    /// notes-store's `server.worker_threads` (unset: notes-store's default, one per core).
    /// Each notes line says what it ran with (`notes_store_worker_threads`).
    #[arg(long)]
    notes_store_worker_threads: Option<usize>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.streams == 0
        || args.seconds == 0
        || args.channels == 0
        || args.body_bytes == 0
        || args.rounds == 0
    {
        bail!("--streams, --seconds, --channels, --body-bytes and --rounds must be positive");
    }
    // Before any thread exists: the harness reads these to find the binaries.
    for name in ["kms-server", "notes-store"] {
        let var = format!("KMS_{}_BIN", name.to_uppercase().replace('-', "_"));
        let bin = match std::env::var_os(&var) {
            Some(p) => PathBuf::from(p),
            None => {
                let exe = std::env::current_exe().context("locating notes-bench")?;
                let sibling = exe.with_file_name(name);
                if !sibling.exists() {
                    bail!("no {name} next to {}: build it or set {var}", exe.display());
                }
                std::env::set_var(&var, &sibling);
                sibling
            }
        };
        eprintln!("notes-bench: {name} binary {}", bin.display());
        if !bin.components().any(|c| c.as_os_str() == "release") {
            eprintln!("notes-bench: WARNING: {name} is not from a release directory");
        }
    }
    if cfg!(debug_assertions) {
        eprintln!("notes-bench: WARNING: this is a debug build of notes-bench; use --release");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?
        .block_on(run(args))
}

/// What one load phase measured.
struct Stats {
    /// Successful calls, warm-up included.
    ok_total: u64,
    /// Successful calls started in the measured window.
    ok_window: u64,
    errors: u64,
    /// Latencies (µs) of the calls counted in `ok_window`.
    latencies_us: Vec<u64>,
    window: Duration,
    /// The measured window, ms since the Unix epoch.
    window_ms: (i64, i64),
    /// CPU per call by process over the measured window (`None` without /proc).
    cpu: Option<CpuUse>,
    /// Calls per second of each slice, for a measurement combined from slices.
    slice_rates: Vec<f64>,
    /// notes-store's batched KMS calls (`GenerateDataKeys` for writes, `BatchDecrypt` for
    /// reads) and the items they carried, per slice (its warm-up included), where measured.
    slice_kms_calls: Vec<(f64, f64)>,
}

impl Stats {
    /// One series' slices as one measurement: calls, time, latencies and CPU added up.
    fn combine(slices: Vec<Stats>) -> Stats {
        let mut all = Stats {
            ok_total: 0,
            ok_window: 0,
            errors: 0,
            latencies_us: Vec::new(),
            window: Duration::ZERO,
            window_ms: (i64::MAX, i64::MIN),
            cpu: None,
            slice_rates: Vec::new(),
            slice_kms_calls: Vec::new(),
        };
        let mut cpu_parts = Vec::new();
        for slice in slices {
            all.slice_rates.push(round(slice.ops_per_s(), 1));
            all.slice_kms_calls.extend(slice.slice_kms_calls);
            all.ok_total += slice.ok_total;
            all.ok_window += slice.ok_window;
            all.errors += slice.errors;
            all.latencies_us.extend(slice.latencies_us);
            all.window_ms = (
                all.window_ms.0.min(slice.window_ms.0),
                all.window_ms.1.max(slice.window_ms.1),
            );
            cpu_parts.push((slice.cpu, slice.ok_window, slice.window.as_secs_f64()));
            all.window += slice.window;
        }
        all.latencies_us.sort_unstable();
        all.cpu = CpuUse::combine(&cpu_parts);
        all
    }

    /// Items per KMS call of each slice, and over all of them; `None` if not measured.
    fn items_per_kms_call(&self) -> Option<(Vec<f64>, f64)> {
        if self.slice_kms_calls.is_empty() {
            return None;
        }
        let per = |(calls, keys): (f64, f64)| {
            if calls > 0.0 {
                round(keys / calls, 2)
            } else {
                0.0
            }
        };
        let slices = self.slice_kms_calls.iter().copied().map(per).collect();
        let total = self
            .slice_kms_calls
            .iter()
            .fold((0.0, 0.0), |(c, k), (dc, dk)| (c + dc, k + dk));
        Some((slices, per(total)))
    }

    fn ops_per_s(&self) -> f64 {
        self.ok_window as f64 / self.window.as_secs_f64()
    }
    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies_us.len() as f64 * p).ceil() as usize)
            .clamp(1, self.latencies_us.len())
            - 1;
        self.latencies_us[i] as f64 / 1000.0
    }
}

type CallFuture = Pin<Box<dyn Future<Output = Result<()>> + Send>>;
type Call = Arc<dyn Fn(usize, u64) -> CallFuture + Send + Sync>;

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Runs `call` from `streams` tasks for `warmup` + `seconds`; measures the last `seconds`.
async fn load(streams: usize, warmup: Duration, seconds: Duration, call: Call) -> Result<Stats> {
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + seconds;
    let wall_from_ms = unix_ms() + i64::try_from(warmup.as_millis()).unwrap_or_default();
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let mut tasks = Vec::with_capacity(streams);
    for stream in 0..streams {
        let call = call.clone();
        let first_error = first_error.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok_total, mut ok_window, mut errors) = (0u64, 0u64, 0u64);
            let mut latencies = Vec::new();
            let mut i = 0u64;
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let r = call(stream, i).await;
                i += 1;
                match r {
                    Ok(()) => {
                        ok_total += 1;
                        if t >= measure_from {
                            ok_window += 1;
                            latencies.push(t.elapsed().as_micros() as u64);
                        }
                    }
                    Err(e) => {
                        errors += 1;
                        first_error
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_or_insert(format!("{e:#}"));
                    }
                }
            }
            (ok_total, ok_window, errors, latencies)
        }));
    }
    // The machine's CPU over the measured window, read from /proc on a blocking thread so
    // that the load generator's runtime workers keep serving the streams meanwhile.
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu_before = tokio::task::spawn_blocking(CpuSnapshot::take).await?;
    tokio::time::sleep_until(end.into()).await;
    let cpu_after = tokio::task::spawn_blocking(CpuSnapshot::take).await?;
    let mut stats = Stats {
        ok_total: 0,
        ok_window: 0,
        errors: 0,
        latencies_us: Vec::new(),
        window: seconds,
        window_ms: (
            wall_from_ms,
            wall_from_ms + i64::try_from(seconds.as_millis()).unwrap_or_default(),
        ),
        cpu: None,
        slice_rates: Vec::new(),
        slice_kms_calls: Vec::new(),
    };
    for task in tasks {
        let (ok_total, ok_window, errors, latencies) = task.await?;
        stats.ok_total += ok_total;
        stats.ok_window += ok_window;
        stats.errors += errors;
        stats.latencies_us.extend(latencies);
    }
    stats.latencies_us.sort_unstable();
    if let (Some(before), Some(after)) = (cpu_before, cpu_after) {
        stats.cpu = Some(after.since(&before, stats.ok_window, seconds.as_secs_f64()));
    }
    if let Some(e) = first_error.lock().unwrap_or_else(|e| e.into_inner()).take() {
        eprintln!("notes-bench:   {} errors; first: {e}", stats.errors);
    }
    Ok(stats)
}

/// Prints one JSON object with its fields in the given order ("bench" first).
fn emit(fields: &[(&str, Value)]) {
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}:{v}", Value::from(*k)))
        .collect();
    println!("{{{}}}", body.join(","));
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

async fn run(args: Args) -> Result<()> {
    let kms = KmsServer::start(ServerOptions::default())
        .await
        .context("starting kms-server")?;
    eprintln!(
        "notes-bench: kms-server pid {:?} on {} (SQLite); {} cores shared by the load generator, \
         kms-server, notes-store and PostgreSQL: the figures are NOT from isolated machines; \
         load average {}",
        kms.pid(),
        kms.addr,
        cores(),
        load_average()
    );

    // 1 + 3: GenerateDataKey at full load, as the notes ratio's denominator and as the audit
    // load (one durable audit event per call, committed before the answer).
    let mut admin = kms.raw("admin").await?;
    let gdk_key = create_key(
        &mut admin,
        "notes-bench-gdk".into(),
        "notes-bench GenerateDataKey baseline",
    )
    .await?;
    let mut kms_clients = Vec::with_capacity(args.channels);
    for _ in 0..args.channels {
        kms_clients.push(kms.raw("app").await?);
    }
    let kms_clients = Arc::new(kms_clients);
    let contexts: Arc<Vec<HashMap<String, String>>> = Arc::new(
        (0..args.streams)
            .map(|i| {
                let client = format!("client-{i:04}");
                wire_ctx(&[("site", "bench"), ("client", &client)])
            })
            .collect(),
    );
    let shaped_gdk_call = notes_shaped_gdk_call(&args, &mut admin, &kms_clients).await?;
    let gdk_call: Call = {
        let (clients, key, contexts) = (kms_clients.clone(), gdk_key.clone(), contexts.clone());
        Arc::new(move |stream, _| {
            let client = clients[stream % clients.len()].clone();
            let request = pb::GenerateDataKeyRequest {
                key: key.clone(),
                encryption_context: contexts[stream].clone(),
            };
            generate_data_key(client, request)
        })
    };
    eprintln!(
        "notes-bench: kms_generate_data_key: {} streams over {} connections, {} s warm-up + {} s",
        args.streams, args.channels, args.warmup, args.seconds
    );
    let gdk = load(
        args.streams,
        Duration::from_secs(args.warmup),
        Duration::from_secs(args.seconds),
        gdk_call.clone(),
    )
    .await?;
    let gdk_rate = gdk.ops_per_s();
    emit(&[
        ("bench", json!("kms_generate_data_key")),
        ("streams", json!(args.streams)),
        ("channels", json!(args.channels)),
        ("seconds", json!(args.seconds)),
        ("ops", json!(gdk.ok_window)),
        ("errors", json!(gdk.errors)),
        ("ops_per_s", json!(round(gdk_rate, 1))),
        ("p50_ms", json!(round(gdk.percentile_ms(0.50), 3))),
        ("p99_ms", json!(round(gdk.percentile_ms(0.99), 3))),
        ("cores_shared", json!(cores())),
        ("cpu_us_per_op", cpu_per_op(&gdk)),
        ("idle_cores", idle_cores(&gdk)),
    ]);

    // Audit: the events of this key's answered GenerateDataKey calls.
    let auditor = kms.audit_client(AUDITOR)?;
    let filter = AuditFilter {
        key_id: Some(gdk_key.clone()),
        operation: Some("GenerateDataKey".into()),
        outcome: Some("OK".into()),
        ..AuditFilter::default()
    };
    let t = Instant::now();
    let events = auditor
        .query_all_audit_events(&filter, None)
        .await
        .context("querying the audit log")?;
    let recorded = events.len() as u64;
    let in_window = events
        .iter()
        .filter(|e| e.time_ms >= gdk.window_ms.0 && e.time_ms < gdk.window_ms.1)
        .count() as u64;
    eprintln!(
        "notes-bench: audit: {recorded} GenerateDataKey events for {} answered calls (query took {:.1} s)",
        gdk.ok_total,
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let verify = auditor
        .verify_audit_log()
        .await
        .context("verifying the audit log")?;
    eprintln!(
        "notes-bench: audit: VerifyAuditLog took {:.1} s: {}",
        t.elapsed().as_secs_f64(),
        verify.report
    );
    emit(&[
        ("bench", json!("audit_events")),
        (
            "events_per_s",
            json!(round(in_window as f64 / gdk.window.as_secs_f64(), 1)),
        ),
        ("dropped", json!(gdk.ok_total as i64 - recorded as i64)),
        ("gdk_ops_per_s", json!(round(gdk_rate, 1))),
        ("chain_ok", json!(verify.ok)),
        ("kms_db", json!("sqlite")),
        ("seconds", json!(args.seconds)),
        ("events_in_window", json!(in_window)),
        ("answered_calls", json!(gdk.ok_total)),
        ("recorded_events", json!(recorded)),
        ("events_checked", json!(verify.events_checked)),
        ("checkpoints_checked", json!(verify.checkpoints_checked)),
        ("streams", json!(args.streams)),
        ("cores_shared", json!(cores())),
    ]);
    drop(events);

    // 2: notes-store on each database.
    let body: String = "lorem ipsum dolor sit amet "
        .chars()
        .cycle()
        .take(args.body_bytes)
        .collect();
    let body = Arc::new(body);
    for db in &args.db {
        let (url, pg_name, label) = match db.as_str() {
            "sqlite" => (None, None, "sqlite"),
            "pg-tcp" | "pg-unix" => {
                let (url, name) = match pg::create_database().await {
                    Ok(v) => v,
                    Err(e) => {
                        eprintln!("notes-bench: {db}: skipped, no PostgreSQL: {e:#}");
                        continue;
                    }
                };
                let url = if db == "pg-unix" {
                    // The socket file is named after the server's port.
                    let port = PgConnectOptions::from_str(&pg::admin_url())
                        .map(|o| o.get_port())
                        .context("KMS_TEST_PG_URL")?;
                    format!(
                        "postgres://postgres@localhost:{port}/{name}?host={}",
                        args.pg_socket_dir
                    )
                } else {
                    url
                };
                (Some(url), Some(name), db.as_str())
            }
            other => bail!("unknown --db {other:?} (sqlite, pg-tcp, pg-unix)"),
        };
        let baselines = GdkBaselines {
            plain: gdk_call.clone(),
            notes_shaped: shaped_gdk_call.clone(),
        };
        let result = bench_notes(&args, &kms, url, label, &baselines, body.clone()).await;
        if let Some(name) = pg_name {
            pg::drop_database(&name).await;
        }
        result?;
    }
    Ok(())
}

/// The GenerateDataKey loads a notes window is compared with.
struct GdkBaselines {
    /// As the first phase calls it: the issue's `ratio`.
    plain: Call,
    /// Shaped like notes-store's calls: `ratio_vs_notes_shaped_gdk`.
    notes_shaped: Call,
}

/// GenerateDataKey calls shaped like notes-store's (`notes-store/src/crypto.rs`): stream `s`'s
/// `i`-th call uses the key of bench client `s * clients_per_stream + i % clients_per_stream`
/// (created here, as notes-store creates one per client) and the context {site, client, note,
/// revision} with a new note id, revision 1.
async fn notes_shaped_gdk_call(
    args: &Args,
    admin: &mut KeyManagementServiceClient<Channel>,
    kms_clients: &Arc<Vec<KeyManagementServiceClient<Channel>>>,
) -> Result<Call> {
    let per_stream = args.clients_per_stream.max(1);
    let mut keys = Vec::new();
    for client in 0..args.streams as u64 * per_stream {
        let alias = format!("notes-bench-client-{client:04}");
        let description = "notes-bench GenerateDataKey baseline shaped like notes-store's";
        keys.push(create_key(admin, alias, description).await?);
    }
    let (keys, clients) = (Arc::new(keys), kms_clients.clone());
    Ok(Arc::new(move |stream, i| {
        let client = clients[stream % clients.len()].clone();
        let index = stream as u64 * per_stream + i % per_stream;
        // Time-ordered, as notes-store's note ids (`service/write.rs`): random ones would
        // cost the KMS's context lookup more than notes-store's calls do.
        let (client_id, note_id) = (format!("client-{index:04}"), uuid::Uuid::now_v7());
        let request = pb::GenerateDataKeyRequest {
            key: keys[index as usize].clone(),
            encryption_context: wire_ctx(&[
                ("site", "bench"),
                ("client", &client_id),
                ("note", &note_id.hyphenated().to_string()),
                ("revision", "1"),
            ]),
        };
        generate_data_key(client, request)
    }))
}

/// Creates a KMS key (no rotation); returns its id.
async fn create_key(
    admin: &mut KeyManagementServiceClient<Channel>,
    alias: String,
    description: &str,
) -> Result<String> {
    Ok(admin
        .create_key(pb::CreateKeyRequest {
            alias,
            description: description.into(),
            rotation_period_seconds: 0,
        })
        .await?
        .into_inner()
        .key
        .ok_or_else(|| anyhow!("CreateKey returned no key"))?
        .key_id)
}

/// One GenerateDataKey call, which must return a 32-byte data key.
fn generate_data_key(
    mut client: KeyManagementServiceClient<Channel>,
    request: pb::GenerateDataKeyRequest,
) -> CallFuture {
    Box::pin(async move {
        let r = client.generate_data_key(request).await?.into_inner();
        anyhow::ensure!(
            r.plaintext.len() == 32,
            "data key of {} bytes",
            r.plaintext.len()
        );
        Ok(())
    })
}

async fn bench_notes(
    args: &Args,
    kms: &KmsServer,
    database_url: Option<String>,
    db: &str,
    baselines: &GdkBaselines,
    body: Arc<String>,
) -> Result<()> {
    let shown_url = database_url.clone().unwrap_or_else(|| "sqlite file".into());
    let notes = NotesServer::start(
        kms,
        NotesOptions {
            database_url: database_url.clone(),
            // For the data keys per KMS call of each `notes_create` slice.
            metrics: true,
            worker_threads: args.notes_store_worker_threads,
            ..NotesOptions::default()
        },
    )
    .await
    .with_context(|| format!("starting notes-store on {shown_url}"))?;
    eprintln!(
        "notes-bench: notes-store on {db} ({shown_url}) at {}; {} streams over {} connections; \
         {} cores shared; load average {}",
        notes.addr,
        args.streams,
        args.channels,
        cores(),
        load_average()
    );
    let workers = notes_store_workers(&notes).await?;
    let mut clients: Vec<NotesServiceClient<Channel>> = Vec::with_capacity(args.channels);
    for _ in 0..args.channels {
        clients.push(notes.client().await?);
    }
    let clients = Arc::new(clients);
    let ids: Arc<Mutex<Vec<String>>> = Arc::default();

    let per_stream = args.clients_per_stream.max(1);
    let create: Call = {
        let (clients, ids, body) = (clients.clone(), ids.clone(), body.clone());
        Arc::new(move |stream, i| {
            let mut client = clients[stream % clients.len()].clone();
            let request = create_request(
                "bench",
                &format!("client-{stream:04}-{}", i % per_stream),
                "2026-11-28",
                &body,
            );
            let ids = ids.clone();
            Box::pin(async move {
                let r = client.create_note(request).await?.into_inner();
                ids.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(r.note_id);
                Ok(())
            })
        })
    };
    first_notes(args, db, &create).await?;
    let [stats, gdk, shaped] = interleaved(
        args,
        [&create, &baselines.plain, &baselines.notes_shaped],
        notes
            .metrics_addr
            .map(|addr| KmsCallProbe::DATA_KEYS.at(addr)),
    )
    .await?;
    emit_notes(
        "notes_create",
        db,
        args,
        workers,
        (&stats, KmsCallProbe::DATA_KEYS),
        &gdk,
        Some(&shaped),
    );

    let ids: Arc<Vec<String>> = Arc::new(std::mem::take(
        &mut *ids.lock().unwrap_or_else(|e| e.into_inner()),
    ));
    if ids.is_empty() {
        bail!("no note was created on {db}; log:\n{}", notes.log());
    }
    let get: Call = {
        let (clients, ids, len) = (clients.clone(), ids.clone(), body.len());
        Arc::new(move |stream, i| {
            let mut client = clients[stream % clients.len()].clone();
            let n = (stream as u64)
                .wrapping_mul(7919)
                .wrapping_add(i.wrapping_mul(104_729)) as usize
                % ids.len();
            let request = get_request(&ids[n], 0);
            Box::pin(async move {
                let r: npb::GetNoteResponse = client.get_note(request).await?.into_inner();
                anyhow::ensure!(r.body.len() == len, "body of {} bytes", r.body.len());
                Ok(())
            })
        })
    };
    // One read first, so that notes-store's unwrap counters exist before the first slice.
    get(0, 0).await?;
    let [stats, gdk] = interleaved(
        args,
        [&get, &baselines.plain],
        notes
            .metrics_addr
            .map(|addr| KmsCallProbe::UNWRAPS.at(addr)),
    )
    .await?;
    emit_notes(
        "notes_get",
        db,
        args,
        workers,
        (&stats, KmsCallProbe::UNWRAPS),
        &gdk,
        None,
    );
    Ok(())
}

/// Measures each call of `calls` (the subject first, then its baselines) for `--seconds` in
/// all, in `--rounds` slices interleaved round by round; returns one combined measurement per
/// call, in order. The order within a round reverses every other round (A B C, C B A, ...),
/// so with an even number of rounds every series' slices are centred on the same instant.
/// With `probe` (notes-store's metrics endpoint and counters), each slice of the subject also
/// records notes-store's batched KMS calls and the items they carried.
async fn interleaved<const N: usize>(
    args: &Args,
    calls: [&Call; N],
    probe: Option<(SocketAddr, KmsCallProbe)>,
) -> Result<[Stats; N]> {
    let slice = Duration::from_secs(args.seconds) / args.rounds;
    let warmup = Duration::from_millis(args.slice_warmup_ms);
    let mut slices: [Vec<Stats>; N] = std::array::from_fn(|_| Vec::new());
    for round in 0..args.rounds {
        let mut order: Vec<usize> = (0..N).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let probe = probe.filter(|_| i == 0);
            let before = match probe {
                Some((addr, counters)) => Some(counters.read(addr).await?),
                None => None,
            };
            let mut stats = load(args.streams, warmup, slice, calls[i].clone()).await?;
            if let (Some((addr, counters)), Some((calls_before, items_before))) = (probe, before) {
                let (calls_after, items_after) = counters.read(addr).await?;
                stats
                    .slice_kms_calls
                    .push((calls_after - calls_before, items_after - items_before));
            }
            slices[i].push(stats);
        }
    }
    Ok(slices.map(Stats::combine))
}

/// The worker threads notes-store runs with (its default unless the bench configured it), as
/// its metrics report them: the lines say what was measured.
async fn notes_store_workers(notes: &NotesServer) -> Result<u64> {
    let addr = notes
        .metrics_addr
        .ok_or_else(|| anyhow!("notes-store runs without metrics"))?;
    let text = metrics::scrape(addr).await?;
    metrics::sample(&text, "notes_runtime_worker_threads", &[])
        .map(|n| n as u64)
        .ok_or_else(|| anyhow!("notes-store's metrics have no notes_runtime_worker_threads"))
}

/// A pair of notes-store's counters: its batched KMS calls of one kind and the items they
/// carried, and the field of the JSON line that reports items per call.
#[derive(Clone, Copy)]
struct KmsCallProbe {
    calls: &'static str,
    items: &'static str,
    field: &'static str,
    slices_field: &'static str,
}

impl KmsCallProbe {
    /// `GenerateDataKeys` calls (writes).
    const DATA_KEYS: KmsCallProbe = KmsCallProbe {
        calls: "notes_kms_data_key_calls_total",
        items: "notes_kms_data_keys_total",
        field: "data_keys_per_kms_call",
        slices_field: "slices_data_keys_per_kms_call",
    };
    /// `BatchDecrypt` calls (reads).
    const UNWRAPS: KmsCallProbe = KmsCallProbe {
        calls: "notes_kms_unwrap_calls_total",
        items: "notes_kms_unwraps_total",
        field: "unwraps_per_kms_call",
        slices_field: "slices_unwraps_per_kms_call",
    };

    fn at(self, addr: SocketAddr) -> (SocketAddr, KmsCallProbe) {
        (addr, self)
    }

    /// Both counters. They exist once the first notes are written (`first_notes`) or read;
    /// a missing one is an error, not a zero that would be reported as a measurement.
    async fn read(self, addr: SocketAddr) -> Result<(f64, f64)> {
        let text = metrics::scrape(addr).await?;
        let value = |name| {
            metrics::sample(&text, name, &[])
                .ok_or_else(|| anyhow!("notes-store's metrics have no {name}"))
        };
        Ok((value(self.calls)?, value(self.items)?))
    }
}

/// Each stream writes the first note of each of its clients, one after the other, so the
/// steady state that `notes_create` measures is notes of known clients. A first note creates
/// the client's KMS key (a token object in the HSM), unless an earlier database's run made it
/// already: the line says how many of these calls there were and how long they took.
async fn first_notes(args: &Args, db: &str, create: &Call) -> Result<()> {
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(args.streams);
    for stream in 0..args.streams {
        let create = create.clone();
        let per_stream = args.clients_per_stream.max(1);
        tasks.push(tokio::spawn(async move {
            for i in 0..per_stream {
                create(stream, i).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await.context("first-note task")??;
    }
    let n = args.streams as u64 * args.clients_per_stream.max(1);
    let secs = started.elapsed().as_secs_f64();
    emit(&[
        ("bench", json!("notes_first_note")),
        ("db", json!(db)),
        ("notes", json!(n)),
        ("seconds", json!(round(secs, 2))),
        ("ops_per_s", json!(round(n as f64 / secs, 1))),
        ("streams", json!(args.streams)),
        ("cores_shared", json!(cores())),
    ]);
    Ok(())
}

/// `gdk`: GenerateDataKey measured in slices interleaved with `stats`' (see [`interleaved`]);
/// the ratio is against its rate over all its slices. `shaped`: the same for the
/// notes-shaped calls, if measured. `probe` names the items per KMS call, if measured.
fn emit_notes(
    bench: &str,
    db: &str,
    args: &Args,
    notes_store_workers: u64,
    (stats, probe): (&Stats, KmsCallProbe),
    gdk: &Stats,
    shaped: Option<&Stats>,
) {
    let rate = stats.ops_per_s();
    let ratio_to = |baseline: &Stats| {
        let baseline = baseline.ops_per_s();
        let ratio = if baseline > 0.0 {
            round(rate / baseline, 3)
        } else {
            0.0
        };
        (baseline, ratio)
    };
    let (gdk_rate, ratio) = ratio_to(gdk);
    let mut fields = vec![
        ("bench", json!(bench)),
        ("db", json!(db)),
        ("ops_per_s", json!(round(rate, 1))),
        ("p50_ms", json!(round(stats.percentile_ms(0.50), 3))),
        ("p99_ms", json!(round(stats.percentile_ms(0.99), 3))),
        ("kms_gdk_ops_per_s", json!(round(gdk_rate, 1))),
        ("ratio", json!(ratio)),
        ("rounds", json!(args.rounds)),
        ("slices_ops_per_s", json!(stats.slice_rates)),
        ("kms_gdk_slices_ops_per_s", json!(gdk.slice_rates)),
        ("kms_gdk_p50_ms", json!(round(gdk.percentile_ms(0.50), 3))),
        ("kms_gdk_cpu_us_per_op", cpu_per_op(gdk)),
    ];
    if let Some((slices, all)) = stats.items_per_kms_call() {
        fields.extend([
            (probe.field, json!(all)),
            (probe.slices_field, json!(slices)),
        ]);
    }
    if let Some(shaped) = shaped {
        let (shaped_rate, shaped_ratio) = ratio_to(shaped);
        fields.extend([
            (
                "kms_gdk_notes_shaped_ops_per_s",
                json!(round(shaped_rate, 1)),
            ),
            ("ratio_vs_notes_shaped_gdk", json!(shaped_ratio)),
        ]);
    }
    fields.extend([
        ("ops", json!(stats.ok_window)),
        ("errors", json!(stats.errors)),
        ("streams", json!(args.streams)),
        ("notes_store_worker_threads", json!(notes_store_workers)),
        ("channels", json!(args.channels)),
        ("seconds", json!(args.seconds)),
        ("body_bytes", json!(args.body_bytes)),
        ("cores_shared", json!(cores())),
        ("cpu_us_per_op", cpu_per_op(stats)),
        ("idle_cores", idle_cores(stats)),
    ]);
    emit(&fields);
}

/// CPU µs per call over the measured window by process name (`postgres`: all its backends;
/// `kernel_workers`: the kernel's worker threads), names under 1 µs summed as `other`. `null`
/// without /proc.
fn cpu_per_op(stats: &Stats) -> Value {
    let Some(cpu) = &stats.cpu else {
        return Value::Null;
    };
    let mut fields = serde_json::Map::new();
    let mut other = 0.0;
    for (name, us) in &cpu.us_per_op {
        if *us >= 1.0 {
            fields.insert(name.clone(), json!(round(*us, 0)));
        } else {
            other += us;
        }
    }
    fields.insert("other".into(), json!(round(other, 0)));
    Value::Object(fields)
}

/// Cores idle on average over the measured window: how far the run was from CPU-bound.
fn idle_cores(stats: &Stats) -> Value {
    stats
        .cpu
        .as_ref()
        .map_or(Value::Null, |cpu| json!(round(cpu.idle_cores, 2)))
}
