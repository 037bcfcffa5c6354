//! The verifiable export format: JSON Lines of [`ExportRecord`]s.
//!
//! One JSON object per line, tagged by `"type"`: `{"type":"event",...}` with the
//! [`AuditEvent`] fields, or `{"type":"checkpoint",...}` with the [`Checkpoint`] fields. Events
//! come in seq order; each checkpoint comes right after the event it covers. One export holds
//! one node's chain. Unknown fields are rejected when reading (a field outside the hash must not
//! ride along unnoticed).

use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};

use crate::checkpoint::Checkpoint;
use crate::error::AuditError;
use crate::event::AuditEvent;

/// One line of a JSON Lines export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[allow(
    clippy::large_enum_variant,
    reason = "almost every record is an event: boxing would add an allocation to each"
)]
pub enum ExportRecord {
    /// `{"type":"event",...}`
    Event(AuditEvent),
    /// `{"type":"checkpoint",...}`
    Checkpoint(Checkpoint),
}

impl ExportRecord {
    /// The event, if this record is one.
    pub fn as_event(&self) -> Option<&AuditEvent> {
        match self {
            ExportRecord::Event(e) => Some(e),
            ExportRecord::Checkpoint(_) => None,
        }
    }

    /// The checkpoint, if this record is one.
    pub fn as_checkpoint(&self) -> Option<&Checkpoint> {
        match self {
            ExportRecord::Checkpoint(c) => Some(c),
            ExportRecord::Event(_) => None,
        }
    }
}

/// Lays out events and checkpoints in export order: events by seq, each checkpoint right after
/// the event whose seq it names (several checkpoints of one seq keep their relative order).
/// Checkpoints naming a seq that is not among `events` are left out: an export of a range of
/// the chain carries only the checkpoints that fall inside it.
pub fn interleave(
    mut events: Vec<AuditEvent>,
    mut checkpoints: Vec<Checkpoint>,
) -> Vec<ExportRecord> {
    events.sort_by_key(|e| e.seq);
    checkpoints.sort_by_key(|c| c.seq);
    let mut out = Vec::with_capacity(events.len() + checkpoints.len());
    let mut cps = checkpoints.into_iter().peekable();
    for event in events {
        let seq = event.seq;
        while cps.next_if(|c| c.seq < seq).is_some() {}
        out.push(ExportRecord::Event(event));
        while let Some(c) = cps.next_if(|c| c.seq == seq) {
            out.push(ExportRecord::Checkpoint(c));
        }
    }
    out
}

/// Writes `records` as JSON Lines (each line ends in `\n`).
///
/// # Errors
/// [`AuditError::Io`] or [`AuditError::Serialize`].
pub fn write_jsonl<W: Write>(mut writer: W, records: &[ExportRecord]) -> Result<(), AuditError> {
    for record in records {
        serde_json::to_writer(&mut writer, record).map_err(AuditError::Serialize)?;
        writer.write_all(b"\n")?;
    }
    writer.flush()?;
    Ok(())
}

/// Reads JSON Lines written by [`write_jsonl`]. Blank lines are skipped.
///
/// # Errors
/// [`AuditError::Json`] or [`AuditError::Io`] with the 1-based line number.
pub fn read_jsonl<R: BufRead>(reader: R) -> Result<Vec<ExportRecord>, AuditError> {
    let mut out = Vec::new();
    for (index, line) in reader.lines().enumerate() {
        let number = index + 1;
        let line = line.map_err(|source| AuditError::Io {
            line: Some(number),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(&line).map_err(|source| AuditError::Json {
            line: number,
            source,
        })?;
        out.push(record);
    }
    Ok(out)
}
