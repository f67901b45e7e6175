//! Read cache of each customer's row and purchase facts, so that hot
//! entitlement reads skip the database. Entitlements are still computed per
//! request at the current instant: only the stored facts are cached.
//!
//! Writes in this process invalidate exactly: a write transaction remembers
//! every customer it locked or created and drops them after commit, and a
//! global epoch stops a read that started before the commit from filling the
//! cache with what it saw. Writes by other processes (replicas, the CLI) are
//! seen within the TTL.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use entities::{customers, devices};

use crate::domain::PurchaseFacts;

const SHARDS: usize = 16;
/// Entries per shard before the shard is emptied (bounds memory, including
/// negative entries for ids that do not exist).
const SHARD_CAPACITY: usize = 8192;

#[derive(Clone, Debug)]
pub struct CachedCustomer {
    /// `None`: no such customer.
    pub customer: Option<customers::Model>,
    pub facts: Arc<Vec<PurchaseFacts>>,
}

/// A device row by (platform, device id); see [`device_key`].
pub type CachedDevice = devices::Model;

/// Ids cannot hold control characters, so NUL separates the two parts.
pub fn device_key(platform: &str, device_id: &str) -> String {
    format!("{platform}\0{device_id}")
}

pub struct ReadCache<V> {
    ttl: Duration,
    epoch: AtomicU64,
    hasher: RandomState,
    shards: Vec<Mutex<HashMap<String, (V, Instant)>>>,
}

impl<V: Clone> ReadCache<V> {
    /// A zero TTL turns the cache off.
    pub fn new(ttl: Duration) -> Self {
        ReadCache {
            ttl,
            epoch: AtomicU64::new(0),
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, id: &str) -> &Mutex<HashMap<String, (V, Instant)>> {
        &self.shards[self.hasher.hash_one(id) as usize % SHARDS]
    }

    pub fn get(&self, id: &str) -> Option<V> {
        if self.ttl.is_zero() {
            return None;
        }
        let shard = self.shard(id).lock().expect("cache shard");
        shard
            .get(id)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(c, _)| c.clone())
    }

    /// Read before the database read whose result `fill` will offer.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Stores what a read saw, unless some write committed since `epoch`.
    pub fn fill(&self, id: &str, epoch: u64, value: V) {
        if self.ttl.is_zero() {
            return;
        }
        let mut shard = self.shard(id).lock().expect("cache shard");
        // Checked under the shard lock: `invalidate` bumps the epoch before
        // taking it, so a stale fill either fails here or is removed there.
        if self.epoch.load(Ordering::SeqCst) != epoch {
            return;
        }
        if shard.len() >= SHARD_CAPACITY {
            shard.clear();
        }
        shard.insert(id.to_string(), (value, Instant::now()));
    }

    /// Called after a write transaction commits.
    pub fn invalidate<'a>(&self, ids: impl IntoIterator<Item = &'a String>) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        for id in ids {
            self.shard(id).lock().expect("cache shard").remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> CachedCustomer {
        CachedCustomer {
            customer: None,
            facts: Arc::new(vec![]),
        }
    }

    #[test]
    fn a_fill_that_raced_a_write_is_dropped() {
        let c: ReadCache<CachedCustomer> = ReadCache::new(Duration::from_secs(60));
        let e = c.epoch();
        c.invalidate([&"a".to_string()]);
        c.fill("a", e, entry());
        assert!(
            c.get("a").is_none(),
            "read began before the write committed"
        );
        c.fill("a", c.epoch(), entry());
        assert!(c.get("a").is_some());
        c.invalidate([&"a".to_string()]);
        assert!(c.get("a").is_none());
    }

    #[test]
    fn entries_expire_and_zero_ttl_is_off() {
        let c: ReadCache<CachedCustomer> = ReadCache::new(Duration::from_millis(20));
        c.fill("a", c.epoch(), entry());
        assert!(c.get("a").is_some());
        std::thread::sleep(Duration::from_millis(30));
        assert!(c.get("a").is_none());
        let off: ReadCache<CachedCustomer> = ReadCache::new(Duration::ZERO);
        off.fill("a", off.epoch(), entry());
        assert!(off.get("a").is_none());
    }
}
