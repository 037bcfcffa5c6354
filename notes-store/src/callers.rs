//! Which caller may act for which site. Callers are the practice applications, named by their
//! verified client certificate (SAN URI or CN, `svc_common::identity`); the configuration's
//! `[[callers]]` entries bind identity patterns to sites. Default deny: a caller no entry
//! names, or a site its entries do not list, is refused before any KMS call.

use svc_common::identity::Identity;
use svc_common::pattern::{Captures, Pattern};

use crate::config::CallerSection;
use crate::error::NotesError;

/// One `[[callers]]` entry, checked.
#[derive(Debug, Clone)]
struct Entry {
    identity: Pattern,
    /// Site ids; `*` = every site; `{name}` = the segment the identity pattern captured.
    sites: Vec<String>,
}

/// The caller → sites table.
#[derive(Debug, Clone, Default)]
pub struct Callers {
    entries: Vec<Entry>,
}

impl Callers {
    pub fn new(sections: &[CallerSection]) -> Result<Callers, String> {
        let mut entries = Vec::new();
        for (i, c) in sections.iter().enumerate() {
            let identity =
                Pattern::parse(&c.identity).map_err(|e| format!("callers[{i}].identity: {e}"))?;
            if c.sites.is_empty() {
                return Err(format!("callers[{i}] ({}): sites is empty", c.identity));
            }
            for s in &c.sites {
                if let Some(name) = s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    if !identity.capture_names().any(|n| n == name) {
                        return Err(format!(
                            "callers[{i}] ({}): site {s} is not captured by the identity pattern",
                            c.identity
                        ));
                    }
                }
            }
            entries.push(Entry {
                identity,
                sites: c.sites.clone(),
            });
        }
        Ok(Callers { entries })
    }

    /// Whether `identity` may act for `site`.
    pub fn allows(&self, identity: &str, site: &str) -> bool {
        self.entries.iter().any(|e| {
            let Some(caps) = e.identity.matches(identity, &Captures::new()) else {
                return false;
            };
            e.sites.iter().any(
                |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    Some(name) => caps.get(name).is_some_and(|v| v == site),
                    None => s == "*" || s == site,
                },
            )
        })
    }

    /// PERMISSION_DENIED unless the caller may act for `site`.
    pub fn authorize(&self, caller: Option<&Identity>, site: &str) -> Result<(), NotesError> {
        match caller {
            Some(c) if self.allows(&c.name, site) => Ok(()),
            Some(c) => Err(NotesError::PermissionDenied(format!(
                "caller {} may not act for site {site}",
                c.name
            ))),
            None => Err(NotesError::PermissionDenied("no client identity".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn callers() -> Callers {
        Callers::new(&[
            CallerSection {
                identity: "spiffe://dev.clinic/client/app".into(),
                sites: vec!["a".into()],
            },
            CallerSection {
                identity: "spiffe://dev.clinic/site/{site}/app".into(),
                sites: vec!["{site}".into()],
            },
            CallerSection {
                identity: "spiffe://dev.clinic/client/ops".into(),
                sites: vec!["*".into()],
            },
        ])
        .unwrap()
    }

    #[test]
    fn sites_by_list_capture_and_wildcard() {
        let c = callers();
        assert!(c.allows("spiffe://dev.clinic/client/app", "a"));
        assert!(!c.allows("spiffe://dev.clinic/client/app", "b"));
        assert!(c.allows("spiffe://dev.clinic/site/b/app", "b"));
        assert!(!c.allows("spiffe://dev.clinic/site/b/app", "a"));
        assert!(c.allows("spiffe://dev.clinic/client/ops", "z"));
        assert!(!c.allows("spiffe://dev.clinic/client/other", "a"));
        assert!(!Callers::default().allows("spiffe://dev.clinic/client/app", "a"));
    }

    #[test]
    fn bad_entries_are_refused() {
        let bad = |identity: &str, sites: &[&str]| {
            Callers::new(&[CallerSection {
                identity: identity.into(),
                sites: sites.iter().map(|s| s.to_string()).collect(),
            }])
            .is_err()
        };
        assert!(bad("x", &[]));
        assert!(bad("x", &["{site}"]));
        assert!(bad("x/**/y", &["a"]));
    }
}
