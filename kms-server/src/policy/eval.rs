//! The decision: given the caller, the permission, the key and the encryption context, allow
//! (with the role that allows it), deny (naming what is missing), or hide the key.
//!
//! Order: a caller none of whose allow rules covers the key learns nothing about it
//! (`Hidden`, answered exactly like a missing key); then deny rules (deny wins); then the
//! role's fixed permission set (key-admin never uses keys, whatever the rules say); then, for
//! the use of a key, the rule's encryption-context conditions.

use std::collections::BTreeMap;

use super::model::{AllowRule, Permission, Policy, Role};
use super::pattern::{Captures, Pattern};

/// The key a request is about, by both of its names.
#[derive(Debug, Clone, Copy)]
pub struct KeyName<'a> {
    pub id: &'a str,
    pub alias: Option<&'a str>,
}

impl KeyName<'_> {
    fn display(&self) -> &str {
        self.alias.unwrap_or(self.id)
    }

    fn matched_by(&self, pattern: &Pattern, caps: &Captures) -> Option<Captures> {
        self.alias
            .and_then(|a| pattern.matches(a, caps))
            .or_else(|| pattern.matches(self.id, caps))
    }
}

/// One authorization question.
#[derive(Debug, Clone, Copy)]
pub struct Question<'a> {
    pub identity: &'a str,
    pub permission: Permission,
    pub key: Option<KeyName<'a>>,
    pub context: &'a BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow {
        role: Role,
    },
    /// PERMISSION_DENIED with this message.
    Deny(String),
    /// The caller has no right on the key: answer as if it did not exist.
    Hidden,
}

impl Policy {
    /// The allow rules binding `identity`, with what their identity pattern captured.
    fn bindings<'p>(&'p self, identity: &str) -> Vec<(&'p AllowRule, Captures)> {
        self.allow
            .iter()
            .filter_map(|r| {
                r.identity
                    .matches(identity, &Captures::new())
                    .map(|c| (r, c))
            })
            .collect()
    }

    /// The roles `identity` holds (on some keys at least).
    pub fn roles(&self, identity: &str) -> Vec<Role> {
        let mut roles: Vec<Role> = self
            .bindings(identity)
            .into_iter()
            .map(|(r, _)| r.role)
            .collect();
        roles.sort();
        roles.dedup();
        roles
    }

    /// What `identity` may do, one line per rule, for `WhoAmI`-style reports.
    pub fn effective_permissions(&self, identity: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (rule, caps) in self.bindings(identity) {
            let keys: Vec<String> = rule
                .keys
                .iter()
                .map(|k| substitute(k.as_str(), &caps))
                .collect();
            let context: Vec<String> = rule
                .context
                .iter()
                .map(|(k, v)| match v.resolve(&caps) {
                    Some(v) => format!("{k}={v}"),
                    None => format!("{k}=*"),
                })
                .collect();
            for p in rule.role.permissions() {
                let mut line = p.name().to_string();
                if p.is_key_scoped() {
                    line.push_str(&format!(" on {}", keys.join(",")));
                }
                if p.is_cryptographic() && !context.is_empty() {
                    line.push_str(&format!(" if context {}", context.join(",")));
                }
                out.push(line);
            }
        }
        for d in &self.deny {
            if d.identity.matches(identity, &Captures::new()).is_some() {
                let perms = d.permissions.as_ref().map_or("all".to_string(), |ps| {
                    ps.iter().map(|p| p.name()).collect::<Vec<_>>().join(",")
                });
                let keys = d.keys.as_ref().map_or("all keys".to_string(), |ks| {
                    ks.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(",")
                });
                out.push(format!("DENY {perms} on {keys}"));
            }
        }
        out.sort();
        out.dedup();
        out
    }

    pub fn evaluate(&self, q: &Question<'_>) -> Decision {
        let p = q.permission;
        let bindings = self.bindings(q.identity);
        let Some(key) = q.key.filter(|_| p.is_key_scoped()) else {
            if self.denied(q, None) {
                return Decision::Deny(format!("{p} denied by policy"));
            }
            return match bindings
                .iter()
                .find(|(r, _)| r.role.permissions().contains(&p))
            {
                Some((r, _)) => Decision::Allow { role: r.role },
                None => Decision::Deny(format!("missing permission {p}")),
            };
        };
        // The rules that cover this key at all, with their captures.
        let covering: Vec<(&AllowRule, Captures)> = bindings
            .iter()
            .filter_map(|(r, caps)| {
                r.keys
                    .iter()
                    .find_map(|k| key.matched_by(k, caps))
                    .map(|c| (*r, c))
            })
            .collect();
        if covering.is_empty() {
            return Decision::Hidden;
        }
        let name = key.display();
        if self.denied(q, Some(key)) {
            return Decision::Deny(format!("{p} on key {name} denied by policy"));
        }
        let mut first_failure = None;
        for (rule, caps) in covering
            .iter()
            .filter(|(r, _)| r.role.permissions().contains(&p))
        {
            // Context conditions bind the use of a key, not its metadata.
            let failure = if p.is_cryptographic() {
                context_failure(rule, caps, q.context)
            } else {
                None
            };
            match failure {
                None => return Decision::Allow { role: rule.role },
                Some(msg) => {
                    first_failure.get_or_insert(msg);
                }
            }
        }
        match first_failure {
            Some(msg) => Decision::Deny(msg),
            None if p.is_cryptographic() && covering.iter().any(|(r, _)| r.role == Role::KeyAdmin) => {
                Decision::Deny(format!(
                    "missing permission {p} on key {name} (key-admin never uses keys: separation of duties)"
                ))
            }
            None => Decision::Deny(format!("missing permission {p} on key {name}")),
        }
    }

    fn denied(&self, q: &Question<'_>, key: Option<KeyName<'_>>) -> bool {
        self.deny.iter().any(|d| {
            let Some(caps) = d.identity.matches(q.identity, &Captures::new()) else {
                return false;
            };
            let perm_ok = d
                .permissions
                .as_ref()
                .is_none_or(|ps| ps.contains(&q.permission));
            let key_ok = match (&d.keys, key) {
                (None, _) => true,
                (Some(ks), Some(key)) => ks.iter().any(|k| key.matched_by(k, &caps).is_some()),
                (Some(_), None) => false,
            };
            perm_ok && key_ok
        })
    }
}

/// Why `context` does not satisfy the rule's conditions, if it does not.
fn context_failure(
    rule: &AllowRule,
    caps: &Captures,
    context: &BTreeMap<String, String>,
) -> Option<String> {
    for (k, t) in &rule.context {
        match (context.get(k), t.resolve(caps)) {
            (None, Some(want)) => {
                return Some(format!("context {k} must be {want} (it is missing)"))
            }
            (None, None) => return Some(format!("context {k} is required")),
            (Some(have), Some(want)) if *have != want => {
                return Some(format!("context {k} must be {want}"))
            }
            _ => {}
        }
    }
    None
}

/// `pattern` with `{name}` replaced by the captured values (for reports).
fn substitute(pattern: &str, caps: &Captures) -> String {
    let mut out = pattern.to_string();
    for (k, v) in caps {
        out = out.replace(&format!("{{{k}}}"), v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
[[allow]]
identity = "spiffe://dev.clinic/client/admin"
role = "key-admin"

[[allow]]
identity = "spiffe://dev.clinic/client/auditor"
role = "auditor"

[[allow]]
identity = "spiffe://dev.clinic/site/{site}/notes-store"
role = "service"
keys = ["notes/{site}", "notes/{site}/*"]
context = { site = "{site}" }

[[allow]]
identity = "spiffe://dev.clinic/client/app"
role = "service"

[[deny]]
identity = "spiffe://dev.clinic/client/app"
permissions = ["kms:Decrypt"]
keys = ["secret/**"]
"#;

    fn policy() -> Policy {
        Policy::parse(POLICY).unwrap()
    }

    fn ask(id: &str, p: Permission, alias: Option<&str>, ctx: &[(&str, &str)]) -> Decision {
        let context: BTreeMap<String, String> = ctx
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let key = alias.map(|a| KeyName {
            id: "3f1e0000-0000-4000-8000-000000000001",
            alias: Some(a),
        });
        policy().evaluate(&Question {
            identity: id,
            permission: p,
            key,
            context: &context,
        })
    }

    const SITE_A: &str = "spiffe://dev.clinic/site/a/notes-store";
    const ADMIN: &str = "spiffe://dev.clinic/client/admin";
    const APP: &str = "spiffe://dev.clinic/client/app";

    #[test]
    fn captures_bind_keys_and_context() {
        let allow = Decision::Allow {
            role: Role::Service,
        };
        assert_eq!(
            ask(
                SITE_A,
                Permission::Decrypt,
                Some("notes/a"),
                &[("site", "a")]
            ),
            allow
        );
        assert_eq!(
            ask(
                SITE_A,
                Permission::Encrypt,
                Some("notes/a/x"),
                &[("site", "a")]
            ),
            allow
        );
        assert_eq!(
            ask(
                SITE_A,
                Permission::Decrypt,
                Some("notes/a"),
                &[("site", "b")]
            ),
            Decision::Deny("context site must be a".into())
        );
        assert!(
            matches!(ask(SITE_A, Permission::Decrypt, Some("notes/a"), &[]), Decision::Deny(m) if m.contains("context site must be a"))
        );
        // Another site's key does not exist for this caller.
        assert_eq!(
            ask(
                SITE_A,
                Permission::Decrypt,
                Some("notes/b"),
                &[("site", "a")]
            ),
            Decision::Hidden
        );
        assert_eq!(
            ask(
                SITE_A,
                Permission::Decrypt,
                Some("notes/a/x/y"),
                &[("site", "a")]
            ),
            Decision::Hidden
        );
        // A service may describe, but not administer, the keys it uses.
        assert_eq!(
            ask(SITE_A, Permission::DescribeKey, Some("notes/a"), &[]),
            allow
        );
        assert_eq!(
            ask(SITE_A, Permission::DisableKey, Some("notes/a"), &[]),
            Decision::Deny("missing permission kms:DisableKey on key notes/a".into())
        );
        assert_eq!(
            ask(SITE_A, Permission::CreateKey, None, &[]),
            Decision::Deny("missing permission kms:CreateKey".into())
        );
    }

    #[test]
    fn key_id_matches_too() {
        let p = Policy::parse(
            "[[allow]]\nidentity = \"svc\"\nrole = \"service\"\nkeys = [\"3f1e0000-0000-4000-8000-000000000001\"]\n",
        )
        .unwrap();
        let ctx = BTreeMap::new();
        let q = |alias| Question {
            identity: "svc",
            permission: Permission::Encrypt,
            key: Some(KeyName {
                id: "3f1e0000-0000-4000-8000-000000000001",
                alias,
            }),
            context: &ctx,
        };
        assert_eq!(
            p.evaluate(&q(Some("x"))),
            Decision::Allow {
                role: Role::Service
            }
        );
        assert_eq!(
            p.evaluate(&q(None)),
            Decision::Allow {
                role: Role::Service
            }
        );
    }

    #[test]
    fn separation_of_duties() {
        for p in Permission::ALL.into_iter().filter(|p| p.is_cryptographic()) {
            assert!(
                matches!(ask(ADMIN, p, Some("notes/a"), &[("site", "a")]), Decision::Deny(m) if m.contains("separation of duties")),
                "{p}"
            );
        }
        for p in [
            Permission::DescribeKey,
            Permission::EnableKey,
            Permission::DisableKey,
        ] {
            assert_eq!(
                ask(ADMIN, p, Some("notes/a"), &[]),
                Decision::Allow {
                    role: Role::KeyAdmin
                }
            );
        }
        assert_eq!(
            ask(ADMIN, Permission::CreateKey, None, &[]),
            Decision::Allow {
                role: Role::KeyAdmin
            }
        );
        assert!(matches!(
            ask(ADMIN, Permission::ReadAuditLog, None, &[]),
            Decision::Deny(_)
        ));
        // An allow rule cannot widen a role: there is no way to list permissions in it.
        assert!(Policy::parse(
            "[[allow]]\nidentity = \"x\"\nrole = \"key-admin\"\npermissions = [\"kms:Decrypt\"]\n"
        )
        .is_err());
    }

    #[test]
    fn deny_wins() {
        let allow = Decision::Allow {
            role: Role::Service,
        };
        assert_eq!(ask(APP, Permission::Decrypt, Some("notes/a"), &[]), allow);
        assert_eq!(ask(APP, Permission::Encrypt, Some("secret/x"), &[]), allow);
        assert!(
            matches!(ask(APP, Permission::Decrypt, Some("secret/x"), &[]), Decision::Deny(m) if m.contains("denied by policy"))
        );
    }

    #[test]
    fn auditor_and_strangers() {
        let auditor = "spiffe://dev.clinic/client/auditor";
        assert_eq!(
            ask(auditor, Permission::ReadAuditLog, None, &[]),
            Decision::Allow {
                role: Role::Auditor
            }
        );
        assert_eq!(
            ask(auditor, Permission::DescribeKey, Some("notes/a"), &[]),
            Decision::Allow {
                role: Role::Auditor
            }
        );
        assert!(matches!(
            ask(auditor, Permission::Decrypt, Some("notes/a"), &[]),
            Decision::Deny(_)
        ));
        let nobody = "spiffe://dev.clinic/client/nobody";
        assert_eq!(
            ask(nobody, Permission::DescribeKey, Some("notes/a"), &[]),
            Decision::Hidden
        );
        assert!(matches!(
            ask(nobody, Permission::ListKeys, None, &[]),
            Decision::Deny(_)
        ));
        assert!(policy().roles(nobody).is_empty());
        assert_eq!(policy().roles(SITE_A), vec![Role::Service]);
        let perms = policy().effective_permissions(SITE_A);
        assert!(
            perms.contains(&"kms:Decrypt on notes/a,notes/a/* if context site=a".to_string()),
            "{perms:?}"
        );
    }

    #[test]
    fn invalid_policies_are_refused() {
        for bad in [
            "[[allow]]\nidentity = \"x\"\nrole = \"root\"\n",
            "[[allow]]\nidentity = \"x\"\nrole = \"service\"\nkeys = [\"notes/{site}\"]\n",
            "[[allow]]\nidentity = \"x/{s}\"\nrole = \"service\"\ncontext = { site = \"{t}\" }\n",
            "[[allow]]\nidentity = \"x\"\nrole = \"key-admin\"\ncontext = { site = \"a\" }\n",
            "[[allow]]\nidentity = \"x\"\nrole = \"service\"\nkeys = []\n",
            "[[deny]]\nidentity = \"x\"\npermissions = [\"kms:Everything\"]\n",
            "[[allw]]\nidentity = \"x\"\n",
            "not toml",
        ] {
            assert!(Policy::parse(bad).is_err(), "{bad}");
        }
    }
}
