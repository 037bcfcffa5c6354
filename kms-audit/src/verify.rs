//! Offline verification of an export: [`verify`] and its [`VerifyReport`].
//!
//! # Rules
//! Records are checked in export order; the first failure stops verification and is reported
//! with the sequence number it concerns.
//!
//! For each event, in this order:
//! 1. **Sequence**: the first event must have seq ≥ 1; every later one must have the previous
//!    seq + 1. A jump forward names the expected seq as bad (reason "missing" if that seq is
//!    nowhere in the export, "out of order" if it comes later); a repeat or step back names
//!    the repeated seq.
//! 2. **Hash**: `hash` must equal [`AuditEvent::compute_hash`] (catches any edited field).
//! 3. **Node**: `node_id` must equal the export's node (that of the first record).
//! 4. **Link**: `prev_hash` must equal the previous event's `hash`. For the first exported
//!    event: seq 1 must have `prev_hash` = [`ZERO_HASH`] (the chain starts at genesis);
//!    any other seq must have a well-formed, non-zero `prev_hash`, which is taken as the
//!    starting point (an export of a later range, or of a chain whose start was pruned).
//!
//! For each checkpoint: `node_id` must match; `public_key_fingerprint` must be the given key's;
//! the signature must verify over [`Checkpoint::digest`]; and the event it names must appear
//! earlier in the export with `hash` = `head_hash`. Any failure names the checkpoint's seq.
//!
//! # What "OK" means
//! The chain is anchored by signatures: events are authenticated from the first exported event
//! through the highest checkpoint (`covered_through_seq`), because that checkpoint signs a
//! hash that commits, link by link, to every one of them (and to the first one's
//! `prev_hash`). Events after it (`uncovered_tail`) passed rules 1–4 but are not
//! authenticated: whoever can write the file could have rewritten or dropped them. An export
//! with no checkpoint at all therefore fails. Two limits no export can overcome on its own:
//! dropping events *and* the checkpoints after them leaves a shorter export that still
//! verifies (compare `covered_through_seq` with a checkpoint obtained independently, e.g. a
//! previous export or the live server), and dropping a prefix leaves an export that starts
//! later (`from_genesis` is then false and `first_seq` says where it starts).

use std::collections::HashSet;
use std::fmt;

use crate::checkpoint::{Checkpoint, VerifyingKeyInput};
use crate::encoding::is_hex_sha256;
use crate::event::{AuditEvent, ZERO_HASH};
use crate::export::ExportRecord;

/// The outcome of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// True if every rule held and at least one checkpoint covers an event.
    pub ok: bool,
    /// Events that passed the per-event rules (all events when `ok`, covered or not).
    pub events_checked: u64,
    /// Checkpoints that passed every checkpoint rule.
    pub checkpoints_checked: u64,
    /// Highest seq covered by a valid checkpoint.
    pub covered_through_seq: Option<u64>,
    /// Events after `covered_through_seq`: intact but not authenticated.
    pub uncovered_tail: u64,
    /// The sequence number the failure concerns.
    pub first_bad_seq: Option<u64>,
    /// Why verification failed.
    pub reason: Option<String>,
    /// The export's node id (of its first record).
    pub node_id: Option<String>,
    /// Seq of the first exported event.
    pub first_seq: Option<u64>,
    /// True if the export starts at seq 1 with the zero `prev_hash`.
    pub from_genesis: bool,
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.ok {
            let reason = self.reason.as_deref().unwrap_or("unknown reason");
            return match self.first_bad_seq {
                Some(seq) => write!(f, "FAILED at seq {seq}: {reason}"),
                None => write!(f, "FAILED: {reason}"),
            };
        }
        let through = self.covered_through_seq.unwrap_or(0);
        let covered = self.events_checked - self.uncovered_tail;
        write!(
            f,
            "OK: {covered} events, {} checkpoints verified (through seq {through})",
            self.checkpoints_checked
        )?;
        if self.uncovered_tail > 0 {
            write!(
                f,
                "; {} later events are intact but not yet covered by a checkpoint",
                self.uncovered_tail
            )?;
        }
        if let (false, Some(first)) = (self.from_genesis, self.first_seq) {
            write!(f, "; the export starts at seq {first}, not at genesis")?;
        }
        Ok(())
    }
}

/// Verifies a whole export against the checkpoint-signing public key. Pure: no I/O, no clock.
pub fn verify(records: &[ExportRecord], key: &VerifyingKeyInput) -> VerifyReport {
    let mut state = State::default();
    let failure = state.run(records, key).err();
    state.into_report(failure)
}

struct Failure {
    seq: Option<u64>,
    reason: String,
}

fn fail<T>(seq: u64, reason: impl Into<String>) -> Result<T, Failure> {
    Err(Failure {
        seq: Some(seq),
        reason: reason.into(),
    })
}

#[derive(Default)]
struct State<'a> {
    node_id: Option<&'a str>,
    first_seq: Option<u64>,
    /// Hashes of the events seen so far; index = seq - first_seq (seqs are consecutive).
    hashes: Vec<&'a str>,
    checkpoints: u64,
    covered: Option<u64>,
}

impl<'a> State<'a> {
    fn run(&mut self, records: &'a [ExportRecord], key: &VerifyingKeyInput) -> Result<(), Failure> {
        let present: HashSet<u64> = records
            .iter()
            .filter_map(ExportRecord::as_event)
            .map(|e| e.seq)
            .collect();
        self.node_id = records.first().map(|r| match r {
            ExportRecord::Event(e) => e.node_id.as_str(),
            ExportRecord::Checkpoint(c) => c.node_id.as_str(),
        });
        for record in records {
            match record {
                ExportRecord::Event(e) => self.event(e, &present)?,
                ExportRecord::Checkpoint(c) => self.checkpoint(c, key, &present)?,
            }
        }
        let Some(first) = self.first_seq else {
            return Err(Failure {
                seq: None,
                reason: "the export holds no events".to_owned(),
            });
        };
        if self.covered.is_none() {
            return fail(
                first,
                "no checkpoint covers any event: nothing in the export is authenticated",
            );
        }
        Ok(())
    }

    fn last(&self) -> Option<(u64, &'a str)> {
        let first = self.first_seq?;
        let last_hash = self.hashes.last()?;
        Some((first + self.hashes.len() as u64 - 1, last_hash))
    }

    fn hash_of(&self, seq: u64) -> Option<&'a str> {
        let index = seq.checked_sub(self.first_seq?)?;
        usize::try_from(index)
            .ok()
            .and_then(|i| self.hashes.get(i).copied())
    }

    fn event(&mut self, e: &'a AuditEvent, present: &HashSet<u64>) -> Result<(), Failure> {
        let last = self.last();
        // 1. Sequence.
        match last {
            None if e.seq == 0 => return fail(0, "seq 0 is not a valid sequence number"),
            None => {}
            Some((prev, _)) => {
                let Some(expected) = prev.checked_add(1) else {
                    return fail(prev, "no event can follow seq u64::MAX");
                };
                if e.seq > expected {
                    let reason = if present.contains(&expected) {
                        format!("out of order: seq {} follows seq {prev}", e.seq)
                    } else if e.seq - expected == 1 {
                        format!(
                            "seq {expected} is missing (seq {} follows seq {prev})",
                            e.seq
                        )
                    } else {
                        format!(
                            "seqs {expected}..={} are missing (seq {} follows seq {prev})",
                            e.seq - 1,
                            e.seq
                        )
                    };
                    return fail(expected, reason);
                }
                if e.seq < expected {
                    return fail(
                        e.seq,
                        format!(
                            "seq {} appears again after seq {prev} (out of order or duplicated)",
                            e.seq
                        ),
                    );
                }
            }
        }
        // 2. Own hash.
        if e.hash != e.compute_hash() {
            return fail(
                e.seq,
                "event hash does not match its contents (event altered)",
            );
        }
        // 3. Node.
        if Some(e.node_id.as_str()) != self.node_id {
            return fail(
                e.seq,
                format!(
                    "node_id {:?} differs from the export's node_id {:?}",
                    e.node_id,
                    self.node_id.unwrap_or_default()
                ),
            );
        }
        // 4. Link.
        match last {
            Some((prev, prev_hash)) if e.prev_hash != prev_hash => {
                return fail(
                    e.seq,
                    format!(
                        "prev_hash does not match the hash of seq {prev} \
                         (an event was inserted, replaced or re-linked)"
                    ),
                );
            }
            Some(_) => {}
            None if e.seq == 1 && e.prev_hash != ZERO_HASH => {
                return fail(1, "seq 1 must have the zero prev_hash");
            }
            None if e.seq != 1 && (!is_hex_sha256(&e.prev_hash) || e.prev_hash == ZERO_HASH) => {
                return fail(
                    e.seq,
                    "the first exported event after genesis needs a well-formed, non-zero prev_hash",
                );
            }
            None => self.first_seq = Some(e.seq),
        }
        self.hashes.push(&e.hash);
        Ok(())
    }

    fn checkpoint(
        &mut self,
        c: &Checkpoint,
        key: &VerifyingKeyInput,
        present: &HashSet<u64>,
    ) -> Result<(), Failure> {
        if Some(c.node_id.as_str()) != self.node_id {
            return fail(
                c.seq,
                format!(
                    "checkpoint node_id {:?} differs from the export's node_id {:?}",
                    c.node_id,
                    self.node_id.unwrap_or_default()
                ),
            );
        }
        if let Err(e) = c.verify_signature(key) {
            return fail(c.seq, e.to_string());
        }
        let Some(head) = self.hash_of(c.seq) else {
            let reason = if present.contains(&c.seq) {
                format!("checkpoint for seq {0} comes before event {0}", c.seq)
            } else {
                format!(
                    "checkpoint covers seq {}, which is not in the export (events removed)",
                    c.seq
                )
            };
            return fail(c.seq, reason);
        };
        if c.head_hash != head {
            return fail(
                c.seq,
                format!(
                    "checkpoint head_hash differs from the hash of event {} \
                     (covered events were altered)",
                    c.seq
                ),
            );
        }
        self.checkpoints += 1;
        self.covered = Some(self.covered.map_or(c.seq, |s| s.max(c.seq)));
        Ok(())
    }

    fn into_report(self, failure: Option<Failure>) -> VerifyReport {
        let last_seq = self.last().map(|(s, _)| s);
        let uncovered_tail = match (last_seq, self.covered) {
            (Some(last), Some(covered)) => last.saturating_sub(covered),
            _ => self.hashes.len() as u64,
        };
        VerifyReport {
            ok: failure.is_none(),
            events_checked: self.hashes.len() as u64,
            checkpoints_checked: self.checkpoints,
            covered_through_seq: self.covered,
            uncovered_tail,
            first_bad_seq: failure.as_ref().and_then(|f| f.seq),
            reason: failure.map(|f| f.reason),
            node_id: self.node_id.map(str::to_owned),
            first_seq: self.first_seq,
            from_genesis: self.first_seq == Some(1),
        }
    }
}
