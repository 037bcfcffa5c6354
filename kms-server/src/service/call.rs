//! One RPC in flight: who called, its request id, and what the audit event will say about it.
//! Handlers fill in the key, version, context and acting user as they learn them; `observe`
//! turns the note into an audit event once the outcome is known.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kms_audit::EventFields;
use uuid::Uuid;

use crate::auth::Identity;
use crate::context::EncryptionContext;

#[derive(Debug, Default)]
struct AuditNote {
    key_id: Option<String>,
    key_version: Option<u32>,
    context: BTreeMap<String, String>,
    acting_user: String,
    purpose: String,
    role: String,
    detail: String,
}

/// Cheap to clone; clones share the audit note.
#[derive(Debug, Clone)]
pub struct Call {
    pub identity: Option<Identity>,
    pub request_id: String,
    note: Arc<Mutex<AuditNote>>,
}

impl Call {
    pub fn new(identity: Option<Identity>, request_id: String) -> Self {
        Call {
            identity,
            request_id,
            note: Arc::default(),
        }
    }

    fn with_note(&self, f: impl FnOnce(&mut AuditNote)) {
        if let Ok(mut n) = self.note.lock() {
            f(&mut n);
        }
    }

    /// The key (and version, once known) the call is about.
    pub fn key(&self, key_id: Uuid, version: Option<u32>) {
        self.with_note(|n| {
            n.key_id = Some(key_id.to_string());
            if version.is_some() {
                n.key_version = version;
            }
        });
    }

    pub fn context(&self, context: &EncryptionContext) {
        let pairs = context.pairs().clone();
        self.with_note(|n| n.context = pairs);
    }

    /// Who the caller acts for and why (from notes-store's audit metadata).
    pub fn actor(&self, acting_user: &str, purpose: &str) {
        let (u, p) = (acting_user.to_string(), purpose.to_string());
        self.with_note(|n| {
            n.acting_user = u;
            n.purpose = p;
        });
    }

    /// A short non-secret note for a successful call (errors carry their message instead).
    pub fn detail(&self, detail: String) {
        self.with_note(|n| n.detail = detail);
    }

    pub fn role(&self, role: &str) {
        let r = role.to_string();
        self.with_note(|n| n.role = r);
    }

    /// The audit fields for this call with its outcome.
    pub fn into_fields(
        self,
        operation: &str,
        outcome: &str,
        latency_us: u64,
        detail: String,
    ) -> EventFields {
        let note = match self.note.lock() {
            Ok(mut n) => std::mem::take(&mut *n),
            Err(_) => AuditNote::default(),
        };
        let (caller, caller_fingerprint) = match self.identity {
            Some(i) => (i.name, i.key_fingerprint),
            None => ("<unauthenticated>".to_string(), String::new()),
        };
        EventFields {
            time_ms: crate::audit::now_ms(),
            request_id: self.request_id,
            caller,
            caller_fingerprint,
            role: note.role,
            operation: operation.to_string(),
            key_id: note.key_id,
            key_version: note.key_version,
            context: note.context,
            acting_user: note.acting_user,
            purpose: note.purpose,
            outcome: outcome.to_string(),
            latency_us,
            detail: if detail.is_empty() {
                note.detail
            } else {
                detail
            },
        }
    }
}
