//! The key-usage report: per KMS key and version, how many revisions still depend on it, and
//! the highest minimum decryption version that keeps every stored revision readable.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use kms_client::Code;
use serde::Serialize;

use crate::kms::Kms;
use crate::store::NoteStore;

/// One key's line of the report.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct KeyReport {
    pub kms_key_id: String,
    /// Empty if the key has none or the KMS does not describe it.
    pub alias: String,
    /// ENABLED, DISABLED, DESTROYED, … or NOT_FOUND.
    pub state: String,
    pub primary_version: u32,
    pub min_decryption_version: u32,
    /// Version → revisions wrapped under it.
    pub versions: BTreeMap<u32, u64>,
    /// Revisions below the primary version (a campaign would re-wrap them).
    pub below_primary: u64,
    /// The lowest version still in use: raising the minimum decryption version up to it keeps
    /// every stored revision readable.
    pub safe_min_decryption_version: u32,
}

/// Builds the report from the database's counts and one `DescribeKey` per key.
pub async fn key_report(
    store: &dyn NoteStore,
    kms: &Kms,
    only_key: Option<&str>,
) -> anyhow::Result<Vec<KeyReport>> {
    let mut by_key: BTreeMap<String, BTreeMap<u32, u64>> = BTreeMap::new();
    for u in store.key_usage().await? {
        if only_key.is_some_and(|k| k != u.kms_key_id) {
            continue;
        }
        by_key
            .entry(u.kms_key_id)
            .or_default()
            .insert(u.kms_key_version, u.revisions);
    }
    let mut out = Vec::with_capacity(by_key.len());
    for (kms_key_id, versions) in by_key {
        let (alias, state, primary, min) = match kms.client().describe_key(&kms_key_id).await {
            Ok(k) => (
                k.alias.unwrap_or_default(),
                k.state.to_string(),
                k.primary_version,
                k.min_decryption_version,
            ),
            Err(e) if e.code() == Some(Code::NotFound) => {
                (String::new(), "NOT_FOUND".to_string(), 0, 0)
            }
            Err(e) => return Err(e.into()),
        };
        let below_primary = versions
            .iter()
            .filter(|(v, _)| **v < primary)
            .map(|(_, n)| n)
            .sum();
        let safe = versions.keys().next().copied().unwrap_or(primary);
        out.push(KeyReport {
            kms_key_id,
            alias,
            state,
            primary_version: primary,
            min_decryption_version: min,
            versions,
            below_primary,
            safe_min_decryption_version: safe,
        });
    }
    Ok(out)
}

/// The report as a text table.
pub fn render(report: &[KeyReport]) -> String {
    let mut s = String::from("key usage (revisions per KMS key version):\n");
    if report.is_empty() {
        s.push_str("  no revisions\n");
    }
    for k in report {
        let name = if k.alias.is_empty() { "-" } else { &k.alias };
        let _ = writeln!(
            s,
            "  {} ({name}) state={} primary=v{} min_decryption=v{}",
            k.kms_key_id, k.state, k.primary_version, k.min_decryption_version
        );
        for (v, n) in &k.versions {
            let mark = if *v == k.primary_version {
                " (primary)"
            } else {
                ""
            };
            let _ = writeln!(s, "    v{v}: {n} revisions{mark}");
        }
        let _ = writeln!(
            s,
            "    below primary: {}; min decryption version can be raised to v{} safely",
            k.below_primary, k.safe_min_decryption_version
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_names_versions_and_the_safe_minimum() {
        let r = KeyReport {
            kms_key_id: "k1".into(),
            alias: "notes/a/clients/c-1".into(),
            state: "ENABLED".into(),
            primary_version: 2,
            min_decryption_version: 1,
            versions: BTreeMap::from([(1, 3), (2, 5)]),
            below_primary: 3,
            safe_min_decryption_version: 1,
        };
        let text = render(&[r]);
        assert!(text.contains("v1: 3 revisions\n"), "{text}");
        assert!(text.contains("v2: 5 revisions (primary)"), "{text}");
        assert!(text.contains("below primary: 3; min decryption version can be raised to v1"));
    }
}
