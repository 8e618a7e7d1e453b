//! Hot state of standalone mode (the role Redis plays in a cluster): the most
//! recent messages of each conversation, so catching up after a short
//! disconnect does not touch the disk.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use lru::LruCache;

use crate::model::Sequenced;
use crate::store::Hot;

/// Bytes counted per cached message besides its body, and per conversation
/// besides its id: the deque slot, the Arcs, the LRU node.
const PER_MESSAGE: usize = 48;
const PER_CONVERSATION: usize = 128;

/// The most recent messages of the most recently active conversations,
/// within a memory budget: least recently used conversations are dropped
/// first (the history still has them). Sharded, so writers of different
/// conversations rarely wait for each other.
pub struct HotCache {
    keep: usize,
    shard_budget: usize,
    shards: Vec<Mutex<Shard>>,
}

struct Shard {
    recent: LruCache<Arc<str>, Recent>,
    bytes: usize,
}

#[derive(Default)]
struct Recent {
    messages: VecDeque<(u64, Arc<str>)>,
    bytes: usize,
}

const SHARDS: usize = 16;

/// Default memory budget of the hot cache.
pub const DEFAULT_HOT_BYTES: usize = 64 * 1024 * 1024;

impl HotCache {
    /// Keep the last `keep_per_conversation` messages of each conversation,
    /// in `budget_bytes` of memory at most.
    pub fn new(keep_per_conversation: usize, budget_bytes: usize) -> Self {
        HotCache {
            keep: keep_per_conversation,
            shard_budget: (budget_bytes / SHARDS).max(1),
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        recent: LruCache::unbounded(),
                        bytes: 0,
                    })
                })
                .collect(),
        }
    }

    fn shard(&self, conversation: &str) -> MutexGuard<'_, Shard> {
        let i = (crate::model::partition_key(conversation) % SHARDS as u64) as usize;
        match self.shards[i].lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Remember a committed message. Messages of one conversation arrive in
    /// seq order; anything that does not extend the run restarts it.
    pub fn insert(&self, conversation: &Arc<str>, seq: u64, body: &Arc<str>) {
        if self.keep == 0 {
            return;
        }
        let mut shard = self.shard(conversation);
        let sh = &mut *shard;
        if !sh.recent.contains(conversation) {
            sh.recent.put(conversation.clone(), Recent::default());
            sh.bytes += PER_CONVERSATION + conversation.len();
        }
        let Some(r) = sh.recent.get_mut(conversation) else {
            return;
        };
        let before = r.bytes;
        match r.messages.back() {
            Some((last, _)) if *last >= seq => return,
            Some((last, _)) if *last + 1 != seq => {
                r.messages.clear();
                r.bytes = 0;
            }
            _ => {}
        }
        r.messages.push_back((seq, body.clone()));
        r.bytes += PER_MESSAGE + body.len();
        while r.messages.len() > self.keep {
            if let Some((_, b)) = r.messages.pop_front() {
                r.bytes -= PER_MESSAGE + b.len();
            }
        }
        sh.bytes = sh.bytes + r.bytes - before;
        while sh.bytes > self.shard_budget {
            let Some((c, r)) = sh.recent.pop_lru() else {
                break;
            };
            sh.bytes -= PER_CONVERSATION + c.len() + r.bytes;
        }
    }

    /// `from..=to` of a conversation, if the cache holds the whole range.
    pub fn range(&self, conversation: &str, from: u64, to: u64) -> Option<Vec<(u64, Arc<str>)>> {
        let mut shard = self.shard(conversation);
        let q = &shard.recent.get(conversation)?.messages;
        let (first, _) = q.front()?;
        let (last, _) = q.back()?;
        if from < *first || to > *last {
            return None;
        }
        let start = (from - first) as usize;
        let end = (to - first) as usize;
        Some(q.range(start..=end).cloned().collect())
    }

    fn last_one(&self, conversation: &str) -> Option<(u64, Arc<str>)> {
        let shard = self.shard(conversation);
        shard.recent.peek(conversation)?.messages.back().cloned()
    }

    /// Replace the body of a cached message (a revoke).
    pub fn replace(&self, conversation: &str, seq: u64, body: &Arc<str>) {
        let mut shard = self.shard(conversation);
        let sh = &mut *shard;
        let Some(r) = sh.recent.peek_mut(conversation) else {
            return;
        };
        if let Some(slot) = r.messages.iter_mut().find(|(s, _)| *s == seq) {
            let old = std::mem::replace(&mut slot.1, body.clone());
            r.bytes = r.bytes + body.len() - old.len();
            sh.bytes = sh.bytes + body.len() - old.len();
        }
    }

    fn last_seq(&self, conversation: &str) -> Option<u64> {
        let shard = self.shard(conversation);
        shard
            .recent
            .peek(conversation)?
            .messages
            .back()
            .map(|(s, _)| *s)
    }

    pub fn conversations(&self) -> usize {
        (0..SHARDS)
            .map(|i| match self.shards[i].lock() {
                Ok(g) => g.recent.len(),
                Err(p) => p.into_inner().recent.len(),
            })
            .sum()
    }

    /// Memory the cache accounts for.
    pub fn bytes(&self) -> usize {
        (0..SHARDS)
            .map(|i| match self.shards[i].lock() {
                Ok(g) => g.bytes,
                Err(p) => p.into_inner().bytes,
            })
            .sum()
    }
}

#[async_trait]
impl Hot for HotCache {
    async fn insert(&self, messages: &[&Sequenced]) -> crate::error::Result<()> {
        for m in messages {
            HotCache::insert(self, &m.msg.conversation_id, m.seq, &m.body);
        }
        Ok(())
    }

    async fn range(&self, conversation: &str, from: u64, to: u64) -> Option<Vec<(u64, Arc<str>)>> {
        HotCache::range(self, conversation, from, to)
    }

    async fn max_seqs(&self, conversations: &[Arc<str>]) -> HashMap<Arc<str>, u64> {
        conversations
            .iter()
            .filter_map(|c| Some((c.clone(), self.last_seq(c)?)))
            .collect()
    }

    async fn last(&self, conversations: &[Arc<str>]) -> HashMap<Arc<str>, (u64, Arc<str>)> {
        conversations
            .iter()
            .filter_map(|c| Some((c.clone(), self.last_one(c)?)))
            .collect()
    }

    async fn replace(
        &self,
        conversation: &str,
        seq: u64,
        body: &Arc<str>,
    ) -> crate::error::Result<()> {
        HotCache::replace(self, conversation, seq, body);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_only_whole_ranges() {
        let c = HotCache::new(3, DEFAULT_HOT_BYTES);
        let conv: Arc<str> = "si_a_b".into();
        for s in 1..=5 {
            c.insert(&conv, s, &Arc::from(format!("m{s}")));
        }
        let got = c.range("si_a_b", 3, 5).unwrap();
        assert_eq!(got.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [3, 4, 5]);
        assert!(c.range("si_a_b", 2, 5).is_none(), "seq 2 was evicted");
        assert!(c.range("si_a_b", 4, 6).is_none(), "seq 6 is not known here");
        c.insert(&conv, 4, &"old".into());
        assert_eq!(
            &*c.range("si_a_b", 4, 4).unwrap()[0].1,
            "m4",
            "no going back"
        );
    }

    #[test]
    fn fifty_thousand_conversations_stay_within_the_budget() {
        let budget = 4 * 1024 * 1024;
        let c = HotCache::new(64, budget);
        let body: Arc<str> = "x".repeat(200).into();
        for i in 0..50_000 {
            let conv: Arc<str> = format!("si_user{i}_peer{i}").into();
            for s in 1..=3 {
                c.insert(&conv, s, &body);
            }
            assert!(c.bytes() <= budget, "over budget after {i}: {}", c.bytes());
        }
        // Only the most recent fit, and the newest is whole.
        assert!(c.conversations() < 50_000);
        assert!(c.conversations() > 1000, "{}", c.conversations());
        assert_eq!(
            c.range("si_user49999_peer49999", 1, 3).map(|r| r.len()),
            Some(3)
        );
        assert!(
            c.range("si_user0_peer0", 1, 3).is_none(),
            "the oldest went first"
        );
    }
}
