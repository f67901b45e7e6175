//! Read cache of each customer's row and purchase facts, so that hot
//! entitlement reads skip the database. Entitlements are still computed per
//! request at the current instant: only the stored facts are cached.
//!
//! Writes in this process invalidate exactly: a write transaction remembers
//! every customer it locked or created and drops them after commit, and an
//! epoch per shard stops a read that started before the commit from filling
//! the cache with what it saw. The epoch is per shard, not global, so a
//! steady stream of writes (devices checking in, webhooks) does not keep
//! every other customer's reads from being cached. On PostgreSQL every
//! write transaction also announces what it wrote (NOTIFY, delivered only
//! once it commits), and each replica drops those entries when it hears it;
//! while a replica is not listening its cache is off, so it cannot serve
//! what it was not told about. Writes behind every server's back (SQL by
//! hand) are seen within the TTL.

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

const SHARDS: usize = 64;
/// Entries per shard before the shard is emptied (bounds memory, including
/// negative entries for ids that do not exist).
const SHARD_CAPACITY: usize = 2048;

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
    /// Whether entries may be served and kept: off while a replica cannot
    /// hear other replicas' writes.
    live: std::sync::atomic::AtomicBool,
    hasher: RandomState,
    shards: Vec<Shard<V>>,
}

struct Shard<V> {
    /// Bumped by every commit that wrote an id of this shard.
    epoch: AtomicU64,
    entries: Mutex<HashMap<String, (V, Instant)>>,
}

/// What a read saw of the shard before it went to the database; `fill`
/// keeps the result only if no write to that shard committed since.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Epoch {
    shard: usize,
    value: u64,
}

impl<V: Clone> ReadCache<V> {
    /// A zero TTL turns the cache off.
    pub fn new(ttl: Duration) -> Self {
        ReadCache {
            ttl,
            live: std::sync::atomic::AtomicBool::new(true),
            hasher: RandomState::new(),
            shards: (0..SHARDS)
                .map(|_| Shard {
                    epoch: AtomicU64::new(0),
                    entries: Mutex::new(HashMap::new()),
                })
                .collect(),
        }
    }

    fn shard_of(&self, id: &str) -> usize {
        self.hasher.hash_one(id) as usize % SHARDS
    }

    pub fn get(&self, id: &str) -> Option<V> {
        if self.ttl.is_zero() || !self.live.load(Ordering::SeqCst) {
            return None;
        }
        let shard = self.shards[self.shard_of(id)]
            .entries
            .lock()
            .expect("cache shard");
        shard
            .get(id)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(c, _)| c.clone())
    }

    /// Taken before the database read whose result `fill` will offer for `id`.
    pub fn epoch(&self, id: &str) -> Epoch {
        let shard = self.shard_of(id);
        Epoch {
            shard,
            value: self.shards[shard].epoch.load(Ordering::SeqCst),
        }
    }

    /// Every shard's epoch, for a read whose ids are known only once it is done.
    pub fn all_epochs(&self) -> Vec<u64> {
        self.shards
            .iter()
            .map(|s| s.epoch.load(Ordering::SeqCst))
            .collect()
    }

    /// `id`'s epoch out of [`all_epochs`](Self::all_epochs).
    pub fn epoch_from(&self, all: &[u64], id: &str) -> Epoch {
        let shard = self.shard_of(id);
        Epoch {
            shard,
            value: all[shard],
        }
    }

    /// Stores what a read saw, unless a write to `id`'s shard committed
    /// since `epoch` (taken for `id`: an epoch of another shard drops the fill).
    pub fn fill(&self, id: &str, epoch: Epoch, value: V) {
        if self.ttl.is_zero() || !self.live.load(Ordering::SeqCst) {
            return;
        }
        let index = self.shard_of(id);
        if index != epoch.shard {
            return;
        }
        let shard = &self.shards[index];
        let mut entries = shard.entries.lock().expect("cache shard");
        // Checked under the shard lock: `invalidate` bumps the epoch before
        // taking it, so a stale fill either fails here or is removed there.
        if shard.epoch.load(Ordering::SeqCst) != epoch.value {
            return;
        }
        if entries.len() >= SHARD_CAPACITY {
            entries.clear();
        }
        entries.insert(id.to_string(), (value, Instant::now()));
    }

    /// Called after a write transaction commits, with every id it wrote.
    pub fn invalidate<'a>(&self, ids: impl IntoIterator<Item = &'a String>) {
        for id in ids {
            let shard = &self.shards[self.shard_of(id)];
            shard.epoch.fetch_add(1, Ordering::SeqCst);
            shard.entries.lock().expect("cache shard").remove(id);
        }
    }

    /// Drops every entry and turns the cache on or off. Every epoch moves
    /// first, so a read that began before cannot fill what it saw.
    pub fn reset(&self, live: bool) {
        if !live {
            self.live.store(false, Ordering::SeqCst);
        }
        for shard in &self.shards {
            shard.epoch.fetch_add(1, Ordering::SeqCst);
            shard.entries.lock().expect("cache shard").clear();
        }
        if live {
            self.live.store(true, Ordering::SeqCst);
        }
    }

    /// Updates a cached entry in place (a change that no other entry and no
    /// racing read depends on), leaving absent entries absent.
    pub fn update(&self, id: &str, f: impl FnOnce(&mut V)) {
        let mut entries = self.shards[self.shard_of(id)]
            .entries
            .lock()
            .expect("cache shard");
        if let Some((v, _)) = entries.get_mut(id) {
            f(v);
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
        let e = c.epoch("a");
        c.invalidate([&"a".to_string()]);
        c.fill("a", e, entry());
        assert!(
            c.get("a").is_none(),
            "read began before the write committed"
        );
        c.fill("a", c.epoch("a"), entry());
        assert!(c.get("a").is_some());
        c.invalidate([&"a".to_string()]);
        assert!(c.get("a").is_none());
    }

    #[test]
    fn a_write_to_one_customer_does_not_drop_fills_of_others() {
        let c: ReadCache<CachedCustomer> = ReadCache::new(Duration::from_secs(60));
        // Two ids in different shards.
        let a = "a".to_string();
        let b = (0..)
            .map(|i| format!("b{i}"))
            .find(|b| c.shard_of(b) != c.shard_of(&a))
            .unwrap();
        let e = c.epoch(&b);
        c.invalidate([&a]);
        c.fill(&b, e, entry());
        assert!(c.get(&b).is_some());
        // An epoch taken for another shard never fills.
        c.fill(&a, e, entry());
        assert!(c.get(&a).is_none());
    }

    #[test]
    fn a_reset_drops_entries_and_racing_fills_and_can_turn_the_cache_off() {
        let c: ReadCache<CachedCustomer> = ReadCache::new(Duration::from_secs(60));
        c.fill("a", c.epoch("a"), entry());
        let before = c.epoch("b");
        c.reset(false);
        assert!(c.get("a").is_none());
        c.fill("a", c.epoch("a"), entry());
        assert!(c.get("a").is_none(), "off: nothing is kept");
        c.reset(true);
        c.fill("b", before, entry());
        assert!(c.get("b").is_none(), "a read from before the reset");
        c.fill("a", c.epoch("a"), entry());
        assert!(c.get("a").is_some());
    }

    #[test]
    fn entries_expire_and_zero_ttl_is_off() {
        let c: ReadCache<CachedCustomer> = ReadCache::new(Duration::from_millis(20));
        c.fill("a", c.epoch("a"), entry());
        assert!(c.get("a").is_some());
        std::thread::sleep(Duration::from_millis(30));
        assert!(c.get("a").is_none());
        let off: ReadCache<CachedCustomer> = ReadCache::new(Duration::ZERO);
        off.fill("a", off.epoch("a"), entry());
        assert!(off.get("a").is_none());
    }
}
