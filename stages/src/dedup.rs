//! Recognising a resend: the same (sender, client_msg_id) twice.
//!
//! The index holds the messages seen recently. A message is "durable" once
//! its commit is done; a resend of a durable message is answered at once with
//! the first message's id, and a resend of one still in flight waits for that
//! commit (if the commit never happens, the resend is failed, not acked).
//! Older messages are found in the store's history by the seq-assign stage.
//!
//! Asking the history about every new message would cost a query per batch
//! for nothing, so the index also remembers a compact hash of the most
//! recent `remember` stored keys (loaded from the history at start). Only a
//! key whose hash is remembered is looked up in the history; a resend of a
//! message older than the last `remember` messages is not recognised.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use imflow_runtime::{Ack, AckStatus};

use crate::model::AckInfo;

pub type DedupKey = (Arc<str>, Arc<str>);

struct EntryState {
    info: AckInfo,
    durable: bool,
    waiters: Vec<Ack>,
    since: Instant,
}

pub struct DedupIndex {
    map: DashMap<DedupKey, Arc<Mutex<EntryState>>>,
    window: Duration,
    remembered: Mutex<Remembered>,
}

/// Hashes of the most recent stored keys, bounded.
struct Remembered {
    set: HashSet<u64>,
    order: VecDeque<u64>,
    cap: usize,
}

impl Remembered {
    fn insert(&mut self, h: u64) {
        if self.cap == 0 || !self.set.insert(h) {
            return;
        }
        self.order.push_back(h);
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
}

/// Stable 64-bit hash of a key (FNV-1a), the same in every process.
pub fn key_hash(sender: &str, client_msg_id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sender
        .bytes()
        .chain(std::iter::once(0xff))
        .chain(client_msg_id.bytes())
    {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The outcome of claiming a key.
pub enum Claim {
    /// First sight: the message may proceed (after the history check).
    New,
    /// A repeat; its ack has been dealt with.
    Repeat,
}

fn lock(m: &Mutex<EntryState>) -> std::sync::MutexGuard<'_, EntryState> {
    lock_any(m)
}

fn lock_any<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn duplicate_status(info: &AckInfo) -> AckStatus {
    AckStatus::Duplicate(serde_json::to_string(info).unwrap_or_default().into())
}

impl DedupIndex {
    pub fn new(window: Duration, remember: usize) -> Self {
        DedupIndex {
            map: DashMap::new(),
            window,
            remembered: Mutex::new(Remembered {
                set: HashSet::with_capacity(remember.min(1 << 20)),
                order: VecDeque::new(),
                cap: remember,
            }),
        }
    }

    /// Remember stored keys (oldest first), e.g. from the history at start.
    pub fn remember<'a>(&self, keys: impl IntoIterator<Item = (&'a str, &'a str)>) {
        let mut r = lock_any(&self.remembered);
        for (s, c) in keys {
            r.insert(key_hash(s, c));
        }
    }

    /// Whether a stored message may have this key (so the history must be
    /// asked). False means it certainly was not stored recently.
    pub fn maybe_stored(&self, key: &DedupKey) -> bool {
        lock_any(&self.remembered)
            .set
            .contains(&key_hash(&key.0, &key.1))
    }

    /// The first message's ack info, if it is known and durable.
    pub fn durable(&self, sender: &str, client_msg_id: &str) -> Option<AckInfo> {
        let key: DedupKey = (sender.into(), client_msg_id.into());
        let e = self.map.get(&key)?;
        let st = lock(&e);
        st.durable.then(|| st.info.clone())
    }

    /// Claim `key` for a message with `info`, or settle `ack` as a repeat.
    pub fn claim(&self, key: DedupKey, info: AckInfo, ack: &mut Ack) -> Claim {
        match self.map.entry(key) {
            Entry::Vacant(v) => {
                v.insert(Arc::new(Mutex::new(EntryState {
                    info,
                    durable: false,
                    waiters: Vec::new(),
                    since: Instant::now(),
                })));
                Claim::New
            }
            Entry::Occupied(o) => {
                let mut st = lock(o.get());
                let ack = ack.take();
                if st.durable {
                    ack.set(duplicate_status(&st.info));
                    ack.release();
                } else {
                    st.waiters.push(ack);
                }
                Claim::Repeat
            }
        }
    }

    /// The message under `key` is durable (possibly an older one found in the
    /// history, whose info replaces the claimant's). Answers waiting repeats.
    pub fn mark_durable(&self, key: &DedupKey, info: Option<AckInfo>) {
        lock_any(&self.remembered).insert(key_hash(&key.0, &key.1));
        let Some(e) = self.map.get(key).map(|e| e.clone()) else {
            return;
        };
        let waiters = {
            let mut st = lock(&e);
            if let Some(i) = info {
                st.info = i;
            }
            st.durable = true;
            st.since = Instant::now();
            std::mem::take(&mut st.waiters)
        };
        let info = lock(&e).info.clone();
        for w in waiters {
            w.set(duplicate_status(&info));
            w.release();
        }
    }

    /// Forget a claim whose message will never be stored (its waiters fail).
    pub fn abandon(&self, key: &DedupKey) {
        self.map.remove(key);
    }

    /// Drop durable entries older than the window; the history still has them.
    pub fn sweep(&self) -> usize {
        let before = self.map.len();
        let window = self.window;
        self.map.retain(|_, e| {
            let st = lock(e);
            !(st.durable && st.since.elapsed() > window)
        });
        before - self.map.len()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str) -> AckInfo {
        AckInfo {
            server_msg_id: id.into(),
            conversation_id: "si_a_b".into(),
            send_time: 1,
        }
    }

    #[test]
    fn a_repeat_of_an_in_flight_message_waits_for_its_commit() {
        let idx = DedupIndex::new(Duration::from_secs(60), 100);
        let key: DedupKey = ("a".into(), "c1".into());
        let mut first = Ack::none();
        assert!(matches!(
            idx.claim(key.clone(), info("s1"), &mut first),
            Claim::New
        ));
        let (tx, rx) = std::sync::mpsc::channel();
        let mut second = Ack::new(move |s| tx.send(s).unwrap());
        assert!(matches!(
            idx.claim(key.clone(), info("s2"), &mut second),
            Claim::Repeat
        ));
        assert!(
            rx.try_recv().is_err(),
            "not answered before the first is durable"
        );
        idx.mark_durable(&key, None);
        match rx.recv().unwrap() {
            AckStatus::Duplicate(text) => assert!(text.contains("\"s1\"")),
            other => panic!("{other:?}"),
        }
        assert_eq!(idx.durable("a", "c1").unwrap().server_msg_id, "s1");
    }

    #[test]
    fn remembers_a_bounded_number_of_stored_keys() {
        let idx = DedupIndex::new(Duration::from_secs(60), 2);
        idx.remember([("a", "1"), ("a", "2"), ("a", "3")]);
        assert!(!idx.maybe_stored(&("a".into(), "1".into())), "evicted");
        assert!(idx.maybe_stored(&("a".into(), "3".into())));
        idx.mark_durable(&("b".into(), "9".into()), None);
        assert!(idx.maybe_stored(&("b".into(), "9".into())));
        assert!(!idx.maybe_stored(&("a".into(), "2".into())));
    }

    #[test]
    fn abandoning_fails_the_waiters() {
        let idx = DedupIndex::new(Duration::from_secs(60), 100);
        let key: DedupKey = ("a".into(), "c1".into());
        idx.claim(key.clone(), info("s1"), &mut Ack::none());
        let (tx, rx) = std::sync::mpsc::channel();
        let mut second = Ack::new(move |s| tx.send(s).unwrap());
        idx.claim(key.clone(), info("s2"), &mut second);
        idx.abandon(&key);
        assert!(matches!(rx.recv().unwrap(), AckStatus::Failed(_)));
    }
}
