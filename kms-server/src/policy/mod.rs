//! Who may do what: the caller's identity (from its certificate, `crate::auth`) → the
//! policy's allow and deny rules → a decision for one permission on one key. The model and the
//! file format live in `model`, pattern matching in `pattern`, the decision in `eval`. The
//! policy in force is swapped atomically on reload; a file that does not load changes nothing.

mod eval;
mod model;

use svc_common::pattern;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

pub use eval::{Decision, KeyName, Question};
pub use model::{Permission, Policy, PolicyError, Role};

/// The policy in force and the file it came from. Cheap to clone.
#[derive(Clone)]
pub struct PolicyStore {
    path: Option<PathBuf>,
    current: Arc<RwLock<Arc<Policy>>>,
}

impl PolicyStore {
    /// Loads `path` (refusing a file that does not load).
    pub fn load(path: &Path) -> Result<PolicyStore, PolicyError> {
        let policy = Policy::load(path)?;
        Ok(PolicyStore {
            path: Some(path.to_path_buf()),
            current: Arc::new(RwLock::new(Arc::new(policy))),
        })
    }

    /// A fixed policy (tests).
    pub fn fixed(policy: Policy) -> PolicyStore {
        PolicyStore {
            path: None,
            current: Arc::new(RwLock::new(Arc::new(policy))),
        }
    }

    pub fn current(&self) -> Arc<Policy> {
        match self.current.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Reads the file again; on error the policy in force stays. Returns a summary.
    pub fn reload(&self) -> Result<String, PolicyError> {
        let Some(path) = &self.path else {
            return Ok("fixed policy, nothing to reload".into());
        };
        let policy = Policy::load(path)?;
        let summary = format!(
            "{}: {} allow, {} deny rules",
            path.display(),
            policy.allow.len(),
            policy.deny.len()
        );
        match self.current.write() {
            Ok(mut p) => *p = Arc::new(policy),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(policy),
        }
        Ok(summary)
    }
}
