//! Re-wrap campaigns (`notes-store rewrap`) and key-usage reports (`notes-store key-usage`).
//!
//! After a KMS key is rotated, revisions keep their data keys wrapped under older versions
//! until they are re-wrapped. A campaign counts the revisions per (key, version) (optionally of
//! one key), learns each key's primary version (`DescribeKey`, once per key) and walks only the
//! (key, version) pairs below it, each in (note_id, revision) order, page by page, along the
//! `note_revisions_by_key_version` index: revisions already current are never read. It
//! re-wraps them with `BatchReEncrypt` (the plaintext data key never leaves the KMS; each blob
//! keeps its encryption context and moves to its own key's primary version) and stores each
//! new blob with a conditional update — only if the row still holds the blob that was
//! re-wrapped — in one transaction per batch.
//!
//! Resumable without a checkpoint: a campaign killed at any point (kill -9) leaves every row
//! either with its old blob or with a new one, both decryptable; running it again re-wraps what
//! is still below the primary version, never a row twice. Per-item failures (a disabled key,
//! a damaged blob) are counted by reason and reported; a KMS or database outage aborts the
//! campaign with an error (exit status 1), and a rerun continues.
//!
//! The report at the end tells, per key and version, how many revisions still depend on it, so
//! raising the key's minimum decryption version is safe once only the primary is used.

mod progress;
mod report;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kms_client::{AuditMetadata, KeyState, ReEncryptItem, ReEncryptOutcome, MAX_BATCH_RE_ENCRYPT};
use serde::Serialize;
use tokio::task::JoinSet;
use uuid::Uuid;

pub use progress::{Progress, TokenBucket};
pub use report::{key_report, render, KeyReport};

use crate::crypto::RevisionIds;
use crate::kms::Kms;
use crate::store::{NoteStore, RewrapRow, RewrapUpdate};

/// What to re-wrap and how fast.
#[derive(Debug, Clone)]
pub struct Options {
    /// Only revisions under this KMS key (alias or id); `None` = every key.
    pub key: Option<String>,
    /// Blobs per `BatchReEncrypt` call (1..=1000).
    pub batch: usize,
    /// Blobs per second at most; `None` = as fast as the KMS answers.
    pub rate: Option<f64>,
    /// Batches in flight at once.
    pub parallel: usize,
    /// Count what would be re-wrapped; change nothing, call no re-encryption.
    pub dry_run: bool,
    /// Between plain progress lines (when stderr is not a terminal).
    pub progress_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            key: None,
            batch: 500,
            rate: None,
            parallel: 3,
            dry_run: false,
            progress_interval: Duration::from_secs(2),
        }
    }
}

/// The outcome of a campaign.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Revisions counted (of the chosen key, if any) when the campaign started.
    pub scanned: u64,
    /// Below their key's primary version when the campaign started (the progress total).
    pub to_rewrap: u64,
    /// Re-wrapped and stored by this run.
    pub rewrapped: u64,
    /// Already at their key's primary version.
    pub already_current: u64,
    /// Re-wrapped, but the row had changed meanwhile (another campaign, an erasure): not
    /// stored, nothing lost.
    pub raced: u64,
    /// Under a key that is erased, pending deletion or unknown to the KMS: left alone.
    pub skipped_unusable_key: u64,
    /// Refused by the KMS, by reason.
    pub failed: u64,
    pub failures: BTreeMap<String, u64>,
    pub dry_run: bool,
    pub elapsed_seconds: f64,
    pub rewrapped_per_second: f64,
}

/// What the campaign knows about one key.
#[derive(Debug, Clone)]
struct KeyInfo {
    primary: u32,
    usable: bool,
}

/// Runs a campaign. Errors (KMS or database unreachable, invalid options) abort it; everything
/// stored until then stays stored.
pub async fn run(store: Arc<dyn NoteStore>, kms: Kms, opts: &Options) -> anyhow::Result<Summary> {
    anyhow::ensure!(
        (1..=MAX_BATCH_RE_ENCRYPT).contains(&opts.batch),
        "--batch must be 1-{MAX_BATCH_RE_ENCRYPT}"
    );
    anyhow::ensure!(opts.parallel >= 1, "--parallel must be at least 1");
    if let Some(rate) = opts.rate {
        anyhow::ensure!(rate > 0.0, "--rate must be positive");
    }
    let started = Instant::now();
    let key_filter = match &opts.key {
        Some(k) => Some(kms.client().describe_key(k).await?.key_id),
        None => None,
    };
    // The total for the progress display, and which (key, version) pairs need re-wrapping.
    let mut keys: HashMap<String, KeyInfo> = HashMap::new();
    let mut summary = Summary {
        dry_run: opts.dry_run,
        ..Summary::default()
    };
    let mut targets: Vec<(String, u32)> = Vec::new();
    for usage in store.key_usage().await? {
        if key_filter.as_ref().is_some_and(|k| *k != usage.kms_key_id) {
            continue;
        }
        summary.scanned += usage.revisions;
        let info = key_info(&kms, &mut keys, &usage.kms_key_id).await?;
        if !info.usable {
            summary.skipped_unusable_key += usage.revisions;
        } else if usage.kms_key_version >= info.primary {
            summary.already_current += usage.revisions;
        } else {
            summary.to_rewrap += usage.revisions;
            targets.push((usage.kms_key_id, usage.kms_key_version));
        }
    }
    let mut progress = Progress::new(summary.to_rewrap, opts.progress_interval);
    let mut bucket = opts
        .rate
        .map(|r| TokenBucket::new(r, opts.batch as f64, Instant::now()));
    let mut in_flight: JoinSet<anyhow::Result<BatchResult>> = JoinSet::new();
    let mut pending: Vec<RewrapRow> = Vec::with_capacity(opts.batch);
    let page = u32::try_from(opts.batch.max(500)).unwrap_or(1000);
    let mut done = 0u64;
    for (key, version) in &targets {
        // Re-wrapped rows leave this (key, version); the rows after the cursor stay put, so
        // the keyset walk neither skips nor repeats any.
        let mut after: Option<(Uuid, u32)> = None;
        loop {
            let rows = store.rewrap_page(key, *version, after, page).await?;
            let last_page = rows.len() < page as usize;
            if let Some(last) = rows.last() {
                after = Some((last.note_id, last.revision));
            }
            for row in rows {
                pending.push(row);
                if pending.len() == opts.batch {
                    let batch = std::mem::replace(&mut pending, Vec::with_capacity(opts.batch));
                    done += submit(
                        &mut in_flight,
                        batch,
                        &store,
                        &kms,
                        opts,
                        &mut bucket,
                        &mut summary,
                    )
                    .await?;
                    progress.update(done, summary.rewrapped, summary.failed, false);
                }
            }
            if last_page {
                break;
            }
        }
    }
    if !pending.is_empty() {
        done += submit(
            &mut in_flight,
            pending,
            &store,
            &kms,
            opts,
            &mut bucket,
            &mut summary,
        )
        .await?;
    }
    while let Some(joined) = in_flight.join_next().await {
        done += absorb(joined, &mut summary)?;
    }
    progress.update(done, summary.rewrapped, summary.failed, true);
    progress.finish();
    summary.elapsed_seconds = started.elapsed().as_secs_f64();
    summary.rewrapped_per_second = progress::per_second(summary.rewrapped, started.elapsed());
    Ok(summary)
}

/// Describes a key once; a key the KMS cannot use (erased, pending deletion, unknown) is
/// marked unusable and its revisions are left alone.
async fn key_info(
    kms: &Kms,
    keys: &mut HashMap<String, KeyInfo>,
    key_id: &str,
) -> anyhow::Result<KeyInfo> {
    if let Some(info) = keys.get(key_id) {
        return Ok(info.clone());
    }
    let info = match kms.client().describe_key(key_id).await {
        Ok(k) => KeyInfo {
            primary: k.primary_version,
            usable: matches!(k.state, KeyState::Enabled | KeyState::Disabled),
        },
        Err(e) if e.code() == Some(kms_client::Code::NotFound) => KeyInfo {
            primary: 0,
            usable: false,
        },
        Err(e) => return Err(e.into()),
    };
    keys.insert(key_id.to_string(), info.clone());
    Ok(info)
}

/// The outcome of one batch.
#[derive(Debug, Default)]
struct BatchResult {
    handled: u64,
    rewrapped: u64,
    raced: u64,
    failures: Vec<String>,
}

/// Paces, then starts one batch; first waits for a slot if `parallel` batches are in flight.
/// Returns how many rows finished batches handled meanwhile.
async fn submit(
    in_flight: &mut JoinSet<anyhow::Result<BatchResult>>,
    batch: Vec<RewrapRow>,
    store: &Arc<dyn NoteStore>,
    kms: &Kms,
    opts: &Options,
    bucket: &mut Option<TokenBucket>,
    summary: &mut Summary,
) -> anyhow::Result<u64> {
    let mut handled = 0;
    while in_flight.len() >= opts.parallel {
        if let Some(joined) = in_flight.join_next().await {
            handled += absorb(joined, summary)?;
        }
    }
    if let Some(b) = bucket {
        let wait = b.take(batch.len() as f64, Instant::now());
        tokio::time::sleep(wait).await;
    }
    if opts.dry_run {
        return Ok(handled + batch.len() as u64);
    }
    let (store, kms) = (store.clone(), kms.clone());
    in_flight.spawn(async move { rewrap_batch(store.as_ref(), &kms, batch).await });
    Ok(handled)
}

/// Adds a finished batch to the summary; a failed batch (KMS or database down) aborts.
fn absorb(
    joined: Result<anyhow::Result<BatchResult>, tokio::task::JoinError>,
    summary: &mut Summary,
) -> anyhow::Result<u64> {
    let r = joined.map_err(|e| anyhow::anyhow!("re-wrap task failed: {e}"))??;
    summary.rewrapped += r.rewrapped;
    summary.raced += r.raced;
    summary.failed += r.failures.len() as u64;
    for f in r.failures {
        *summary.failures.entry(f).or_default() += 1;
    }
    Ok(r.handled)
}

/// One `BatchReEncrypt` and one transaction of conditional updates.
async fn rewrap_batch(
    store: &dyn NoteStore,
    kms: &Kms,
    batch: Vec<RewrapRow>,
) -> anyhow::Result<BatchResult> {
    let items: Vec<ReEncryptItem> = batch
        .iter()
        .map(|r| ReEncryptItem {
            ciphertext_blob: r.wrapped_key.clone(),
            source_context: RevisionIds {
                site_id: &r.site_id,
                client_id: &r.client_id,
                note_id: r.note_id,
                revision: r.revision,
            }
            .kms_context(),
            destination_context: None,
        })
        .collect();
    let audit = AuditMetadata {
        acting_user: "notes-store-rewrap".into(),
        purpose: "KEY_ROTATION".into(),
    };
    let outcomes = kms
        .client()
        .batch_re_encrypt(&items, None, Some(audit))
        .await?;
    let mut result = BatchResult {
        handled: batch.len() as u64,
        ..BatchResult::default()
    };
    let mut updates = Vec::with_capacity(batch.len());
    for (row, outcome) in batch.into_iter().zip(outcomes) {
        match outcome {
            ReEncryptOutcome::Ok {
                ciphertext_blob,
                key_id,
                key_version,
                ..
            } if key_id == row.kms_key_id => updates.push(RewrapUpdate {
                note_id: row.note_id,
                revision: row.revision,
                old_wrapped_key: row.wrapped_key,
                new_wrapped_key: ciphertext_blob,
                kms_key_id: key_id,
                kms_key_version: key_version,
            }),
            ReEncryptOutcome::Ok { .. } => result
                .failures
                .push("re-wrapped under another key (not stored)".into()),
            ReEncryptOutcome::Failed { code, message } => result
                .failures
                .push(format!("{}: {message}", kms_client::code_name(code))),
        }
    }
    let applied = store.apply_rewraps(&updates).await?;
    result.rewrapped = applied;
    result.raced = updates.len() as u64 - applied;
    Ok(result)
}
