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
    may_erase: bool,
    may_hold: bool,
}

/// A privileged operation on a client, beyond acting for its site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privilege {
    /// `EraseClient` (`may_erase`).
    Erase,
    /// `PlaceLegalHold` / `LiftLegalHold` (`may_hold`).
    Hold,
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
                may_erase: c.may_erase,
                may_hold: c.may_hold,
            });
        }
        Ok(Callers { entries })
    }

    /// Whether `identity` may act for `site`.
    pub fn allows(&self, identity: &str, site: &str) -> bool {
        self.allows_if(identity, site, |_| true)
    }

    /// Whether one entry that names `identity` and `site` also grants `privilege`.
    pub fn allows_privileged(&self, identity: &str, site: &str, privilege: Privilege) -> bool {
        self.allows_if(identity, site, |e| match privilege {
            Privilege::Erase => e.may_erase,
            Privilege::Hold => e.may_hold,
        })
    }

    fn allows_if(&self, identity: &str, site: &str, grants: impl Fn(&Entry) -> bool) -> bool {
        self.entries.iter().filter(|e| grants(e)).any(|e| {
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

    /// PERMISSION_DENIED unless the caller may act for `site` with `privilege`.
    pub fn authorize_privileged(
        &self,
        caller: Option<&Identity>,
        site: &str,
        privilege: Privilege,
    ) -> Result<(), NotesError> {
        self.authorize(caller, site)?;
        match caller {
            Some(c) if self.allows_privileged(&c.name, site, privilege) => Ok(()),
            Some(c) => Err(NotesError::PermissionDenied(format!(
                "caller {} may not {} clients of site {site}",
                c.name,
                match privilege {
                    Privilege::Erase => "erase",
                    Privilege::Hold => "place or lift legal holds on",
                }
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
                ..Default::default()
            },
            CallerSection {
                identity: "spiffe://dev.clinic/site/{site}/app".into(),
                sites: vec!["{site}".into()],
                ..Default::default()
            },
            CallerSection {
                identity: "spiffe://dev.clinic/client/ops".into(),
                sites: vec!["*".into()],
                may_hold: true,
                ..Default::default()
            },
            CallerSection {
                identity: "spiffe://dev.clinic/client/dpo".into(),
                sites: vec!["a".into()],
                may_erase: true,
                ..Default::default()
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
    fn privileges_are_per_entry_and_default_off() {
        let c = callers();
        let (erase, hold) = (Privilege::Erase, Privilege::Hold);
        assert!(!c.allows_privileged("spiffe://dev.clinic/client/app", "a", erase));
        assert!(!c.allows_privileged("spiffe://dev.clinic/client/app", "a", hold));
        assert!(c.allows_privileged("spiffe://dev.clinic/client/ops", "z", hold));
        assert!(!c.allows_privileged("spiffe://dev.clinic/client/ops", "z", erase));
        assert!(c.allows_privileged("spiffe://dev.clinic/client/dpo", "a", erase));
        assert!(!c.allows_privileged("spiffe://dev.clinic/client/dpo", "b", erase));
        assert!(!c.allows_privileged("spiffe://dev.clinic/client/dpo", "a", hold));
    }

    #[test]
    fn bad_entries_are_refused() {
        let bad = |identity: &str, sites: &[&str]| {
            Callers::new(&[CallerSection {
                identity: identity.into(),
                sites: sites.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }])
            .is_err()
        };
        assert!(bad("x", &[]));
        assert!(bad("x", &["{site}"]));
        assert!(bad("x/**/y", &["a"]));
    }
}
