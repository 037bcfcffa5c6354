//! The policy file (TOML) and its checked form: built-in roles with fixed permission sets,
//! allow rules that bind identities to a role (on keys, with encryption-context conditions)
//! and deny rules that take permissions away. Loading refuses anything it does not understand.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;

use super::pattern::{Pattern, ValueTemplate};

/// Everything a caller can be allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Permission {
    CreateKey,
    DescribeKey,
    ListKeys,
    EnableKey,
    DisableKey,
    GenerateDataKey,
    GenerateDataKeyWithoutPlaintext,
    Encrypt,
    Decrypt,
    ReEncrypt,
    ReadAuditLog,
    RotateKey,
    /// Rotation period and minimum decryption version.
    ConfigureKey,
    ScheduleKeyDeletion,
    CancelKeyDeletion,
    /// Immediate destruction of every version (crypto-shredding).
    EraseKey,
}

impl Permission {
    pub const ALL: [Permission; 16] = [
        Permission::CreateKey,
        Permission::DescribeKey,
        Permission::ListKeys,
        Permission::EnableKey,
        Permission::DisableKey,
        Permission::GenerateDataKey,
        Permission::GenerateDataKeyWithoutPlaintext,
        Permission::Encrypt,
        Permission::Decrypt,
        Permission::ReEncrypt,
        Permission::ReadAuditLog,
        Permission::RotateKey,
        Permission::ConfigureKey,
        Permission::ScheduleKeyDeletion,
        Permission::CancelKeyDeletion,
        Permission::EraseKey,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Permission::CreateKey => "kms:CreateKey",
            Permission::DescribeKey => "kms:DescribeKey",
            Permission::ListKeys => "kms:ListKeys",
            Permission::EnableKey => "kms:EnableKey",
            Permission::DisableKey => "kms:DisableKey",
            Permission::GenerateDataKey => "kms:GenerateDataKey",
            Permission::GenerateDataKeyWithoutPlaintext => "kms:GenerateDataKeyWithoutPlaintext",
            Permission::Encrypt => "kms:Encrypt",
            Permission::Decrypt => "kms:Decrypt",
            Permission::ReEncrypt => "kms:ReEncrypt",
            Permission::ReadAuditLog => "kms:ReadAuditLog",
            Permission::RotateKey => "kms:RotateKey",
            Permission::ConfigureKey => "kms:ConfigureKey",
            Permission::ScheduleKeyDeletion => "kms:ScheduleKeyDeletion",
            Permission::CancelKeyDeletion => "kms:CancelKeyDeletion",
            Permission::EraseKey => "kms:EraseKey",
        }
    }

    pub fn parse(s: &str) -> Option<Permission> {
        Permission::ALL
            .into_iter()
            .find(|p| p.name() == s || &p.name()[4..] == s)
    }

    /// Uses key material (the separation-of-duties boundary).
    pub fn is_cryptographic(self) -> bool {
        matches!(
            self,
            Permission::GenerateDataKey
                | Permission::GenerateDataKeyWithoutPlaintext
                | Permission::Encrypt
                | Permission::Decrypt
                | Permission::ReEncrypt
        )
    }

    /// About one key (as opposed to the key set or the audit log). `CreateKey` is about the
    /// key to be created: a rule's `keys` patterns bound the aliases it may create.
    pub fn is_key_scoped(self) -> bool {
        !matches!(self, Permission::ListKeys | Permission::ReadAuditLog)
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The built-in roles. Their permission sets are fixed here; a policy only says who holds
/// them, on which keys and under which context conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    KeyAdmin,
    Service,
    Auditor,
    Custodian,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::KeyAdmin => "key-admin",
            Role::Service => "service",
            Role::Auditor => "auditor",
            Role::Custodian => "custodian",
        }
    }

    /// What the role may ever do. key-admin never uses keys (separation of duties). A service
    /// may describe the keys it uses (notes-store's health check does). A custodian keeps one
    /// key per data subject (notes-store's per-client keys): it creates them (aliases bounded
    /// by its rule's `keys`), uses them, and erases them on a right-to-erasure request.
    pub fn permissions(self) -> &'static [Permission] {
        use Permission::*;
        match self {
            Role::KeyAdmin => &[
                CreateKey,
                DescribeKey,
                ListKeys,
                EnableKey,
                DisableKey,
                RotateKey,
                ConfigureKey,
                ScheduleKeyDeletion,
                CancelKeyDeletion,
            ],
            Role::Service => &[
                GenerateDataKey,
                GenerateDataKeyWithoutPlaintext,
                Encrypt,
                Decrypt,
                ReEncrypt,
                DescribeKey,
            ],
            Role::Auditor => &[ReadAuditLog, DescribeKey, ListKeys],
            Role::Custodian => &[
                CreateKey,
                DescribeKey,
                GenerateDataKey,
                GenerateDataKeyWithoutPlaintext,
                Encrypt,
                Decrypt,
                ReEncrypt,
                EraseKey,
            ],
        }
    }
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    allow: Vec<AllowFile>,
    #[serde(default)]
    deny: Vec<DenyFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowFile {
    identity: String,
    role: Role,
    keys: Option<Vec<String>>,
    #[serde(default)]
    context: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DenyFile {
    identity: String,
    permissions: Option<Vec<String>>,
    keys: Option<Vec<String>>,
}

/// An allow rule: identities matching `identity` hold `role` on keys matching `keys`
/// (alias or key id), for requests whose encryption context satisfies `context`.
#[derive(Debug, Clone)]
pub struct AllowRule {
    pub identity: Pattern,
    pub role: Role,
    pub keys: Vec<Pattern>,
    pub context: BTreeMap<String, ValueTemplate>,
}

/// A deny rule: takes `permissions` (all when absent) on `keys` (all when absent) away from
/// identities matching `identity`, whatever the allow rules say.
#[derive(Debug, Clone)]
pub struct DenyRule {
    pub identity: Pattern,
    pub permissions: Option<Vec<Permission>>,
    pub keys: Option<Vec<Pattern>>,
}

/// A checked policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub allow: Vec<AllowRule>,
    pub deny: Vec<DenyRule>,
}

/// Why a policy file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("parsing the policy: {0}")]
    Parse(String),
    #[error("{rule}: {msg}")]
    Invalid { rule: String, msg: String },
}

fn patterns(rule: &str, list: &[String], known: &[&str]) -> Result<Vec<Pattern>, PolicyError> {
    let invalid = |msg: String| PolicyError::Invalid {
        rule: rule.to_string(),
        msg,
    };
    if list.is_empty() {
        return Err(invalid("`keys` is empty (omit it for all keys)".into()));
    }
    list.iter()
        .map(|k| {
            let p = Pattern::parse(k).map_err(invalid)?;
            if let Some(n) = p.capture_names().find(|n| !known.contains(n)) {
                return Err(invalid(format!(
                    "key pattern {k:?} uses {{{n}}}, which the identity pattern does not capture"
                )));
            }
            Ok(p)
        })
        .collect()
}

impl Policy {
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Policy::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Policy, PolicyError> {
        let file: PolicyFile =
            toml::from_str(text).map_err(|e| PolicyError::Parse(e.to_string()))?;
        let mut policy = Policy::default();
        for (i, a) in file.allow.into_iter().enumerate() {
            let rule = format!("allow rule {} ({})", i + 1, a.identity);
            let invalid = |msg: String| PolicyError::Invalid {
                rule: rule.clone(),
                msg,
            };
            let identity = Pattern::parse(&a.identity).map_err(invalid)?;
            let known: Vec<&str> = identity.capture_names().collect();
            let keys = match &a.keys {
                Some(list) => patterns(&rule, list, &known)?,
                None => vec![Pattern::parse("**").map_err(invalid)?],
            };
            if !matches!(a.role, Role::Service | Role::Custodian) && !a.context.is_empty() {
                return Err(invalid(
                    "context conditions apply to the service and custodian roles only".into(),
                ));
            }
            let mut context = BTreeMap::new();
            for (k, v) in &a.context {
                let t = ValueTemplate::parse(v).map_err(invalid)?;
                if let ValueTemplate::Capture(n) = &t {
                    if !known.contains(&n.as_str()) {
                        return Err(invalid(format!(
                            "context {k} uses {{{n}}}, which the identity pattern does not capture"
                        )));
                    }
                }
                context.insert(k.clone(), t);
            }
            policy.allow.push(AllowRule {
                identity,
                role: a.role,
                keys,
                context,
            });
        }
        for (i, d) in file.deny.into_iter().enumerate() {
            let rule = format!("deny rule {} ({})", i + 1, d.identity);
            let invalid = |msg: String| PolicyError::Invalid {
                rule: rule.clone(),
                msg,
            };
            let identity = Pattern::parse(&d.identity).map_err(invalid)?;
            let known: Vec<&str> = identity.capture_names().collect();
            let permissions = match &d.permissions {
                Some(list) => Some(
                    list.iter()
                        .map(|p| {
                            Permission::parse(p)
                                .ok_or_else(|| invalid(format!("unknown permission {p:?}")))
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
                None => None,
            };
            let keys = match &d.keys {
                Some(list) => Some(patterns(&rule, list, &known)?),
                None => None,
            };
            policy.deny.push(DenyRule {
                identity,
                permissions,
                keys,
            });
        }
        Ok(policy)
    }
}
