//! A short-lived cache of key metadata so the hot path (GenerateDataKey, Decrypt) does not
//! read the database on every request. Entries expire after a TTL; changes made through this
//! server invalidate them at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::store::{KeyRecord, KeyVersionRecord};

pub struct KeyCache {
    ttl: Duration,
    keys: Mutex<HashMap<Uuid, (Instant, KeyRecord)>>,
    aliases: Mutex<HashMap<String, (Instant, Uuid)>>,
    versions: Mutex<HashMap<(Uuid, u32), (Instant, KeyVersionRecord)>>,
}

/// Bounded so a flood of lookups of distinct keys cannot grow memory without limit.
const MAX_ENTRIES: usize = 10_000;

impl KeyCache {
    pub fn new(ttl: Duration) -> Self {
        KeyCache {
            ttl,
            keys: Mutex::new(HashMap::new()),
            aliases: Mutex::new(HashMap::new()),
            versions: Mutex::new(HashMap::new()),
        }
    }

    fn fresh(&self, at: Instant) -> bool {
        at.elapsed() < self.ttl
    }

    pub fn key(&self, id: Uuid) -> Option<KeyRecord> {
        let map = self.keys.lock().ok()?;
        map.get(&id)
            .filter(|(at, _)| self.fresh(*at))
            .map(|(_, k)| k.clone())
    }

    pub fn alias(&self, alias: &str) -> Option<Uuid> {
        let map = self.aliases.lock().ok()?;
        map.get(alias)
            .filter(|(at, _)| self.fresh(*at))
            .map(|(_, id)| *id)
    }

    pub fn version(&self, id: Uuid, version: u32) -> Option<KeyVersionRecord> {
        let map = self.versions.lock().ok()?;
        map.get(&(id, version))
            .filter(|(at, _)| self.fresh(*at))
            .map(|(_, v)| v.clone())
    }

    pub fn put_key(&self, key: &KeyRecord) {
        if self.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        if let Ok(mut map) = self.keys.lock() {
            if map.len() >= MAX_ENTRIES {
                map.clear();
            }
            map.insert(key.key_id, (now, key.clone()));
        }
        if let (Some(alias), Ok(mut map)) = (&key.alias, self.aliases.lock()) {
            if map.len() >= MAX_ENTRIES {
                map.clear();
            }
            map.insert(alias.clone(), (now, key.key_id));
        }
    }

    pub fn put_version(&self, v: &KeyVersionRecord) {
        if self.ttl.is_zero() {
            return;
        }
        if let Ok(mut map) = self.versions.lock() {
            if map.len() >= MAX_ENTRIES {
                map.clear();
            }
            map.insert((v.key_id, v.version), (Instant::now(), v.clone()));
        }
    }

    /// Forgets everything about a key (after a state change or rotation).
    pub fn invalidate(&self, id: Uuid) {
        if let Ok(mut map) = self.keys.lock() {
            map.remove(&id);
        }
        if let Ok(mut map) = self.aliases.lock() {
            map.retain(|_, (_, v)| *v != id);
        }
        if let Ok(mut map) = self.versions.lock() {
            map.retain(|(k, _), _| *k != id);
        }
    }
}
