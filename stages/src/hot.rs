//! Hot state of standalone mode (the role Redis plays in a cluster): the most
//! recent messages of each conversation, so catching up after a short
//! disconnect does not touch the disk.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use async_trait::async_trait;
use dashmap::DashMap;

use crate::model::Sequenced;
use crate::store::Hot;

pub struct HotCache {
    keep: usize,
    recent: DashMap<Arc<str>, VecDeque<(u64, Arc<str>)>>,
}

impl HotCache {
    pub fn new(keep_per_conversation: usize) -> Self {
        HotCache {
            keep: keep_per_conversation,
            recent: DashMap::new(),
        }
    }

    /// Remember a committed message. Messages of one conversation arrive in
    /// seq order; anything that does not extend the run restarts it.
    pub fn insert(&self, conversation: &Arc<str>, seq: u64, body: &Arc<str>) {
        if self.keep == 0 {
            return;
        }
        let mut q = self.recent.entry(conversation.clone()).or_default();
        match q.back() {
            Some((last, _)) if *last >= seq => return,
            Some((last, _)) if *last + 1 != seq => q.clear(),
            _ => {}
        }
        q.push_back((seq, body.clone()));
        while q.len() > self.keep {
            q.pop_front();
        }
    }

    /// `from..=to` of a conversation, if the cache holds the whole range.
    pub fn range(&self, conversation: &str, from: u64, to: u64) -> Option<Vec<(u64, Arc<str>)>> {
        let q = self.recent.get(conversation)?;
        let (first, _) = q.front()?;
        let (last, _) = q.back()?;
        if from < *first || to > *last {
            return None;
        }
        let start = (from - first) as usize;
        let end = (to - first) as usize;
        Some(q.range(start..=end).cloned().collect())
    }

    pub fn conversations(&self) -> usize {
        self.recent.len()
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
            .filter_map(|c| {
                let q = self.recent.get(c)?;
                let (last, _) = q.back()?;
                Some((c.clone(), *last))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_only_whole_ranges() {
        let c = HotCache::new(3);
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
}
