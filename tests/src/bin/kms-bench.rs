//! kms-bench: throughput and latency of kms-server's hot path over mutual TLS, against the raw
//! HSM ceiling of the same SoftHSM token.
//!
//! One self-contained run: start a kms-server (the harness: own token, PKI, SQLite, free port),
//! measure the ceiling with the server idle (a single-thread `C_Encrypt` `CKM_AES_GCM` loop on a
//! throwaway non-extractable AES-256 token key, 32-byte plaintext, fresh 96-bit IV, AAD the size
//! of the server's), then drive GenerateDataKey and Decrypt from `--streams` concurrent tasks
//! sharing one or a few HTTP/2 connections. Progress goes to stderr; stdout carries one JSON
//! line per benchmark. Client and server share the machine's cores: the figures say so.
//!
//! Then the TPM backend (`kms_generate_data_key_tpm`, also alone with `--bench tpm`): a private
//! swtpm, its raw ceiling measured in the same run (`kms_tests::tpm_ceiling`: the TPM commands
//! one data key needs — GetRandom, EncryptDecrypt2, HMAC — issued directly, 1 thread), then
//! a kms-server on that TPM under the same GenerateDataKey load; ratio = KMS rate / ceiling.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use kms_proto::kms::v1 as pb;
use kms_proto::kms::v1::key_management_service_client::KeyManagementServiceClient;
use kms_tests::hsm_ceiling::HsmCeiling;
use kms_tests::tpm_ceiling::TpmCeiling;
use kms_tests::{wire_ctx, KmsServer, ServerOptions, Swtpm};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The server seals with AAD = 26-byte envelope header || canonical context: about this long
/// for the bench's three-pair contexts.
const CEILING_AAD_LEN: usize = 80;

#[derive(Parser, Debug)]
#[command(
    about = "Load generator for kms-server (GenerateDataKey, Decrypt) vs the raw HSM ceiling"
)]
struct Args {
    /// Concurrent request loops (tokio tasks), each with one request in flight.
    #[arg(long, default_value_t = 16)]
    streams: usize,
    /// Measured seconds per benchmark.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Unmeasured seconds of load before each measurement.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// kms-server binary. Default: $KMS_KMS_SERVER_BIN, else the kms-server next to this
    /// executable (target/release when the bench is a release build).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// HTTP/2 connections the streams share: a number, or "auto" to try 1 and 4 with a short
    /// GenerateDataKey trial and keep the faster.
    #[arg(long, default_value = "auto", value_parser = parse_channels)]
    channels: Channels,
    /// Seconds of each "auto" channel trial (after one second of warm-up).
    #[arg(long, default_value_t = 3)]
    trial_seconds: u64,
    /// Seconds of the single-thread HSM ceiling loop.
    #[arg(long, default_value_t = 3)]
    ceiling_seconds: u64,
    /// The server's HSM session pool size (`backend.max_sessions`).
    #[arg(long, default_value_t = 2)]
    hsm_sessions: usize,
    /// Worker threads of the load generator's tokio runtime (0: one per core).
    #[arg(long, default_value_t = 0)]
    client_threads: usize,
    /// Which benchmarks to run.
    #[arg(long, value_enum, default_value_t = Which::All)]
    bench: Which,
}

#[derive(Debug, Clone, Copy)]
enum Channels {
    Auto,
    Fixed(usize),
}

fn parse_channels(s: &str) -> Result<Channels, String> {
    match s {
        "auto" => Ok(Channels::Auto),
        n => match n.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(Channels::Fixed(n)),
            _ => Err(format!("expected \"auto\" or a positive number, got {n:?}")),
        },
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Which {
    All,
    GenerateDataKey,
    Decrypt,
    /// Only the TPM benchmark (kms_generate_data_key_tpm).
    Tpm,
    /// Only the transport floor (kms_transport_floor).
    Transport,
}

/// Whose ceiling a ratio is against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Device {
    Hsm,
    Tpm,
    /// No device: the transport floor, whose ratio is against the HSM ceiling for comparison.
    Transport,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.streams == 0 || args.seconds == 0 {
        bail!("--streams and --seconds must be positive");
    }
    // Before any thread exists: the harness reads this to find the server binary.
    let server_bin = server_binary(args.server_bin.as_deref())?;
    std::env::set_var("KMS_KMS_SERVER_BIN", &server_bin);
    eprintln!("kms-bench: server binary {}", server_bin.display());
    if cfg!(debug_assertions) {
        eprintln!("kms-bench: WARNING: this is a debug build of kms-bench; use --release");
    }
    if !server_bin.components().any(|c| c.as_os_str() == "release") {
        eprintln!("kms-bench: WARNING: the server binary is not from a release directory");
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if args.client_threads > 0 {
        runtime.worker_threads(args.client_threads);
    }
    let runtime = runtime.enable_all().build().context("tokio runtime")?;
    runtime.block_on(run(args))
}

/// `--server-bin`, else `$KMS_KMS_SERVER_BIN`, else `kms-server` beside this executable.
fn server_binary(flag: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("KMS_KMS_SERVER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating kms-bench")?;
    let sibling = exe.with_file_name("kms-server");
    if sibling.exists() {
        return Ok(sibling);
    }
    bail!(
        "no kms-server next to {}: build it (cargo build --release -p kms-server) or pass --server-bin",
        exe.display()
    )
}

/// One HTTP/2 connection: the KMS service and, for the transport floor, the health service.
#[derive(Clone)]
struct Client {
    kms: KeyManagementServiceClient<Channel>,
    health: HealthClient<Channel>,
}

async fn run(args: Args) -> Result<()> {
    if args.bench == Which::Tpm {
        let channels = match args.channels {
            Channels::Fixed(n) => n,
            Channels::Auto => 1,
        };
        let errors = tpm_bench(&args, channels).await?;
        if errors > 0 {
            bail!("{errors} requests failed in the TPM benchmark");
        }
        return Ok(());
    }
    let options = ServerOptions {
        max_sessions: args.hsm_sessions,
        ..ServerOptions::default()
    };
    let server = KmsServer::start(options)
        .await
        .context("starting kms-server")?;
    let server_pid = server.pid().ok_or_else(|| anyhow!("server has no pid"))?;
    eprintln!(
        "kms-bench: kms-server pid {server_pid} on {} ({} HSM sessions); {} cores, load average {}",
        server.addr,
        args.hsm_sessions,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        load_average(),
    );

    // The ceiling first, with the server idle.
    let conf = server.token_dir.join("softhsm2.conf");
    let ceiling_time = Duration::from_secs(args.ceiling_seconds.max(1));
    let (hsm, ceiling) = tokio::task::spawn_blocking(move || -> Result<_> {
        let hsm = HsmCeiling::open(&conf, "kms-bench-ceiling", CEILING_AAD_LEN, "kms-bench")?;
        let rate = hsm.measure(ceiling_time)?.ops_per_s;
        Ok((hsm, rate))
    })
    .await
    .context("ceiling task")??;

    // Key administration and data-key use are different roles (harness policy: "admin" is
    // key-admin, "app" a service).
    let mut admin = server.raw("admin").await?;
    let key_id = admin
        .create_key(pb::CreateKeyRequest {
            alias: "bench".into(),
            description: "kms-bench".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .key
        .ok_or_else(|| anyhow!("CreateKey returned no key"))?
        .key_id;
    let mut setup = server.raw("app").await?;

    let contexts: Vec<_> = (0..args.streams).map(stream_context).collect();
    let gdk_op = Op::GenerateDataKey {
        key: key_id.clone(),
        contexts: Arc::new(contexts),
    };

    let channels = match args.channels {
        Channels::Fixed(n) => n,
        Channels::Auto => {
            let mut best = (0usize, 0f64);
            for n in [1usize, 4] {
                let clients = connect(&server, n).await?;
                let load = Load {
                    streams: args.streams,
                    warmup: Duration::from_secs(1),
                    seconds: args.trial_seconds.max(1),
                };
                let r = load.run(&clients, gdk_op.clone()).await?;
                eprintln!(
                    "kms-bench: trial GenerateDataKey over {n} connection(s): {:.0} ops/s, p50 {:.2} ms, p99 {:.2} ms",
                    r.ops_per_s(),
                    r.percentile_ms(0.50),
                    r.percentile_ms(0.99)
                );
                if r.errors > 0 {
                    bail!(
                        "{} errors in the channel trial, first: {}",
                        r.errors,
                        r.first_error.unwrap_or_default()
                    );
                }
                if r.ops_per_s() > best.1 {
                    best = (n, r.ops_per_s());
                }
            }
            eprintln!("kms-bench: using {} connection(s)", best.0);
            best.0
        }
    };
    let clients = connect(&server, channels).await?;
    let load = Load {
        streams: args.streams,
        warmup: Duration::from_secs(args.warmup),
        seconds: args.seconds,
    };

    let mut failed = 0;
    if matches!(args.bench, Which::All | Which::GenerateDataKey) {
        let cpu = CpuMeter::start(server_pid);
        let r = load.run(&clients, gdk_op).await?;
        report(
            "kms_generate_data_key",
            &args,
            channels,
            ceiling,
            &r,
            cpu.stop(),
            Device::Hsm,
        )?;
        failed += r.errors;
    }
    if matches!(args.bench, Which::All | Which::Transport) {
        let cpu = CpuMeter::start(server_pid);
        let r = load.run(&clients, Op::HealthCheck).await?;
        report(
            "kms_transport_floor",
            &args,
            channels,
            ceiling,
            &r,
            cpu.stop(),
            Device::Transport,
        )?;
        failed += r.errors;
    }
    if matches!(args.bench, Which::All | Which::Decrypt) {
        // One blob per stream, each under its own context.
        let mut blobs = Vec::with_capacity(args.streams);
        for i in 0..args.streams {
            let context = stream_context(i);
            let dk = setup
                .generate_data_key(pb::GenerateDataKeyRequest {
                    key: key_id.clone(),
                    encryption_context: context.clone(),
                })
                .await?
                .into_inner();
            blobs.push((dk.ciphertext_blob, context, dk.plaintext));
        }
        let cpu = CpuMeter::start(server_pid);
        let r = load
            .run(
                &clients,
                Op::Decrypt {
                    blobs: Arc::new(blobs),
                },
            )
            .await?;
        report(
            "kms_decrypt",
            &args,
            channels,
            ceiling,
            &r,
            cpu.stop(),
            Device::Hsm,
        )?;
        failed += r.errors;
    }

    // Not used in the ratios: shows how much the machine's speed drifted during the run.
    let after = tokio::task::spawn_blocking(move || {
        hsm.measure(Duration::from_secs(1)).map(|r| r.ops_per_s)
    })
    .await
    .context("ceiling task")??;
    eprintln!(
        "kms-bench: HSM ceiling again after the load (1 s, drift check only): {after:.0} ops/s \
         ({:+.0}%)",
        (after / ceiling - 1.0) * 100.0
    );
    if failed > 0 {
        bail!(
            "{failed} requests failed; server log: {}",
            server.log_path.display()
        );
    }
    if args.bench == Which::All {
        drop(clients);
        drop(server);
        let errors = tpm_bench(&args, channels).await?;
        if errors > 0 {
            bail!("{errors} requests failed in the TPM benchmark");
        }
    }
    Ok(())
}

/// The raw TPM ceiling over `duration` (the TPM must be free: swtpm serves one connection).
async fn tpm_ceiling(tcti: &str, duration: Duration) -> Result<f64> {
    let tcti = tcti.to_string();
    tokio::task::spawn_blocking(move || TpmCeiling::open(&tcti)?.measure(duration))
        .await
        .context("TPM ceiling task")?
}

/// `kms_generate_data_key_tpm`: a private swtpm, its raw ceiling, then a kms-server on it
/// under the GenerateDataKey load. Returns the number of failed requests.
async fn tpm_bench(args: &Args, channels: usize) -> Result<u64> {
    let swtpm = Swtpm::start()?;
    let ceiling = tpm_ceiling(
        &swtpm.tcti(),
        Duration::from_secs(args.ceiling_seconds.max(1)),
    )
    .await?;
    eprintln!(
        "kms-bench: TPM ceiling (swtpm, 1 thread, keys loaded: GetRandom(32) + EncryptDecrypt2 \
         AES-256-CFB 32 B + HMAC-SHA256 = the TPM work of one data key): {ceiling:.0} ops/s \
         ({:.1} µs/op)",
        1e6 / ceiling
    );
    let server = KmsServer::start(ServerOptions {
        tpm_tcti: Some(swtpm.tcti()),
        ..ServerOptions::default()
    })
    .await
    .context("starting kms-server on the TPM")?;
    let server_pid = server.pid().ok_or_else(|| anyhow!("server has no pid"))?;
    let mut admin = server.raw("admin").await?;
    let key_id = admin
        .create_key(pb::CreateKeyRequest {
            alias: "bench-tpm".into(),
            description: "kms-bench on the TPM backend".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .key
        .ok_or_else(|| anyhow!("CreateKey returned no key"))?
        .key_id;
    let op = Op::GenerateDataKey {
        key: key_id,
        contexts: Arc::new((0..args.streams).map(stream_context).collect()),
    };
    let clients = connect(&server, channels).await?;
    let load = Load {
        streams: args.streams,
        warmup: Duration::from_secs(args.warmup),
        seconds: args.seconds,
    };
    let cpu = CpuMeter::start(server_pid);
    let r = load.run(&clients, op).await?;
    report(
        "kms_generate_data_key_tpm",
        args,
        channels,
        ceiling,
        &r,
        cpu.stop(),
        Device::Tpm,
    )?;
    if r.errors > 0 {
        eprintln!("kms-bench: TPM server log: {}", server.log_path.display());
    }
    drop(clients);
    drop(server);
    let after = tpm_ceiling(&swtpm.tcti(), Duration::from_secs(1)).await?;
    eprintln!(
        "kms-bench: TPM ceiling again after the load (1 s, drift check only): {after:.0} ops/s \
         ({:+.0}%)",
        (after / ceiling - 1.0) * 100.0
    );
    Ok(r.errors)
}

/// `n` clients, each over its own HTTP/2 connection (mutual TLS as "app").
async fn connect(server: &KmsServer, n: usize) -> Result<Vec<Client>> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let channel = server.channel("app").await?;
        clients.push(Client {
            kms: KeyManagementServiceClient::new(channel.clone()),
            health: HealthClient::new(channel),
        });
    }
    Ok(clients)
}

fn stream_context(i: usize) -> HashMap<String, String> {
    let client = format!("client-{i:04}");
    let note = format!("note-{i:06}");
    wire_ctx(&[("site", "bench"), ("client", &client), ("note", &note)])
}

/// The 1-minute load average, for the record.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// A blob to decrypt: (blob, context, expected plaintext).
type DecryptCase = (Vec<u8>, HashMap<String, String>, Vec<u8>);

/// What each stream sends.
#[derive(Clone)]
enum Op {
    /// Stream `i` uses `contexts[i % len]`.
    GenerateDataKey {
        key: String,
        contexts: Arc<Vec<HashMap<String, String>>>,
    },
    /// Stream `i` decrypts `blobs[i % len]`: (blob, context, expected plaintext).
    Decrypt { blobs: Arc<Vec<DecryptCase>> },
    /// `grpc.health.v1.Health/Check`: same mTLS connections, no HSM, no audit event.
    HealthCheck,
}

impl Op {
    /// One request; checks the answer so failures cannot pass for throughput.
    async fn call(&self, client: &mut Client, stream: usize) -> Result<()> {
        match self {
            Op::GenerateDataKey { key, contexts } => {
                let r = client
                    .kms
                    .generate_data_key(pb::GenerateDataKeyRequest {
                        key: key.clone(),
                        encryption_context: contexts[stream % contexts.len()].clone(),
                    })
                    .await?
                    .into_inner();
                if r.plaintext.len() != 32 || r.ciphertext_blob.is_empty() {
                    bail!("GenerateDataKey: bad answer");
                }
            }
            Op::Decrypt { blobs } => {
                let (blob, context, expected) = &blobs[stream % blobs.len()];
                let r = client
                    .kms
                    .decrypt(pb::DecryptRequest {
                        ciphertext_blob: blob.clone(),
                        encryption_context: context.clone(),
                        audit: None,
                    })
                    .await?
                    .into_inner();
                if &r.plaintext != expected {
                    bail!("Decrypt: wrong plaintext");
                }
            }
            Op::HealthCheck => {
                let r = client
                    .health
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await?
                    .into_inner();
                if r.status != ServingStatus::Serving as i32 {
                    bail!("Health/Check: not serving");
                }
            }
        }
        Ok(())
    }
}

struct Load {
    streams: usize,
    warmup: Duration,
    seconds: u64,
}

/// Latencies of the requests that started after the warm-up and finished within the window.
struct LoadResult {
    latencies_ns: Vec<u64>,
    window: Duration,
    errors: u64,
    first_error: Option<String>,
}

impl LoadResult {
    fn ops_per_s(&self) -> f64 {
        self.latencies_ns.len() as f64 / self.window.as_secs_f64()
    }

    /// Nearest-rank percentile; `latencies_ns` is sorted.
    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies_ns.is_empty() {
            return f64::NAN;
        }
        let rank = (p * self.latencies_ns.len() as f64).ceil() as usize;
        self.latencies_ns[rank.clamp(1, self.latencies_ns.len()) - 1] as f64 / 1e6
    }
}

impl Load {
    /// `streams` tasks, stream `i` on `clients[i % len]`, each looping on its own request.
    async fn run(&self, clients: &[Client], op: Op) -> Result<LoadResult> {
        let begin = Instant::now();
        let measure_from = begin + self.warmup;
        let window = Duration::from_secs(self.seconds);
        let end = measure_from + window;
        let mut tasks = Vec::with_capacity(self.streams);
        for stream in 0..self.streams {
            let mut client = clients[stream % clients.len()].clone();
            let op = op.clone();
            let expected = (window.as_secs_f64() * 20_000.0 / self.streams as f64) as usize;
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(expected);
                let mut errors = 0u64;
                let mut first_error = None;
                loop {
                    let t0 = Instant::now();
                    if t0 >= end {
                        break;
                    }
                    let result = op.call(&mut client, stream).await;
                    let t1 = Instant::now();
                    match result {
                        Ok(()) if t0 >= measure_from && t1 <= end => {
                            latencies.push((t1 - t0).as_nanos() as u64)
                        }
                        Ok(()) => {}
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| format!("{e:#}"));
                        }
                    }
                }
                (latencies, errors, first_error)
            }));
        }
        let mut result = LoadResult {
            latencies_ns: Vec::new(),
            window,
            errors: 0,
            first_error: None,
        };
        for task in tasks {
            let (latencies, errors, first_error) = task.await.context("load task")?;
            result.latencies_ns.extend(latencies);
            result.errors += errors;
            if result.first_error.is_none() {
                result.first_error = first_error;
            }
        }
        result.latencies_ns.sort_unstable();
        Ok(result)
    }
}

/// CPU seconds used by the server process and by this process over a benchmark.
struct CpuMeter {
    server_pid: u32,
    started: Instant,
    server0: f64,
    bench0: f64,
}

struct CpuUse {
    server_cores: f64,
    bench_cores: f64,
}

impl CpuMeter {
    fn start(server_pid: u32) -> Self {
        CpuMeter {
            server_pid,
            started: Instant::now(),
            server0: cpu_seconds(&server_pid.to_string()),
            bench0: cpu_seconds("self"),
        }
    }

    fn stop(self) -> CpuUse {
        let wall = self.started.elapsed().as_secs_f64();
        CpuUse {
            server_cores: (cpu_seconds(&self.server_pid.to_string()) - self.server0) / wall,
            bench_cores: (cpu_seconds("self") - self.bench0) / wall,
        }
    }
}

/// CPU seconds of a process (`"self"` or a pid) so far, NaN where unavailable.
fn cpu_seconds(pid: &str) -> f64 {
    kms_tests::cpu::process_cpu_seconds(pid).unwrap_or(f64::NAN)
}

/// A human summary on stderr, then the JSON line on stdout.
fn report(
    bench: &str,
    args: &Args,
    channels: usize,
    ceiling: f64,
    r: &LoadResult,
    cpu: CpuUse,
    device: Device,
) -> Result<()> {
    let ops = r.ops_per_s();
    let (p50, p99) = (r.percentile_ms(0.50), r.percentile_ms(0.99));
    let ratio = ops / ceiling;
    eprintln!(
        "kms-bench: {bench}: {} ok, {} errors in {} s; {ops:.0} ops/s, p50 {p50:.2} ms, p99 {p99:.2} ms, \
         ratio {ratio:.2} of the {} ceiling; CPU: server {:.2} cores ({:.0} µs/op), bench {:.2} cores \
         ({:.0} µs/op), of {} cores",
        r.latencies_ns.len(),
        r.errors,
        args.seconds,
        match device {
            Device::Hsm | Device::Transport => "HSM",
            Device::Tpm => "TPM",
        },
        cpu.server_cores,
        cpu.server_cores * 1e6 / ops,
        cpu.bench_cores,
        cpu.bench_cores * 1e6 / ops,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    );
    if let Some(e) = &r.first_error {
        eprintln!("kms-bench: {bench}: first error: {e}");
    }
    // The TPM executes one command at a time (~3 per data key): its goal is the ratio only.
    let goal = match device {
        Device::Hsm => Some((ratio >= 0.5 && p99 <= 5.0, "ratio >= 0.5, p99 <= 5 ms")),
        Device::Tpm => Some((ratio >= 0.5, "ratio >= 0.5")),
        // No goal: the most any audited RPC could reach over these connections here.
        Device::Transport => None,
    };
    if let Some((met, text)) = goal {
        eprintln!(
            "kms-bench: {bench}: goal ({text}): {}",
            if met { "met" } else { "NOT met" }
        );
    }
    // Field order as documented; a figure that is not finite (no successful request) is null.
    let num = |x: f64, decimals: usize| {
        if x.is_finite() {
            format!("{x:.decimals$}")
        } else {
            "null".into()
        }
    };
    let line = format!(
        "{{\"bench\":\"{bench}\",\"ops_per_s\":{},\"p50_ms\":{},\"p99_ms\":{},\"ceiling_ops_per_s\":{},\
         \"ratio\":{},\"streams\":{},\"seconds\":{},\"channels\":{channels},\"errors\":{}}}",
        num(ops, 1),
        num(p50, 3),
        num(p99, 3),
        num(ceiling, 1),
        num(ratio, 3),
        args.streams,
        args.seconds,
        r.errors
    );
    serde_json::from_str::<serde_json::Value>(&line)
        .with_context(|| format!("not JSON: {line}"))?;
    println!("{line}");
    Ok(())
}
