//! Recognising a resend: the same (sender, client_msg_id) twice.
//!
//! Two tables behind one lock, so a key can never slip between them:
//! - in flight: messages claimed by `seq-assign` and not yet committed. A
//!   resend of one of these waits for that commit and is then answered with
//!   the first message's ids (if the commit never happens, it is failed, not
//!   acked);
//! - remembered: the most recent `remember` stored messages, keyed by a
//!   128-bit hash of the key, with what an ack needs. Loaded from the
//!   history at start, so resends are recognised across restarts.
//!
//! The history itself has no index on the key: every message would pay a
//! random page write for it on the commit path. The cost is the bound: a
//! resend of a message older than the last `remember` messages is stored as
//! a new message.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use imflow_runtime::{Ack, AckStatus};

use crate::model::{AckInfo, Stamped};

/// 128-bit hash of (sender, client_msg_id): two independent 64-bit hashes,
/// so distinct keys collide with negligible probability (~n²/2¹²⁹).
pub fn key_hash(sender: &str, client_msg_id: &str) -> u128 {
    let bytes = sender
        .bytes()
        .chain(std::iter::once(0xff))
        .chain(client_msg_id.bytes());
    let mut fnv: u64 = 0xcbf2_9ce4_8422_2325;
    let mut mix: u64 = 0x243f_6a88_85a3_08d3;
    for b in bytes {
        fnv ^= b as u64;
        fnv = fnv.wrapping_mul(0x0100_0000_01b3);
        mix = (mix ^ b as u64)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
    }
    ((fnv as u128) << 64) | (mix ^ (mix >> 31)) as u128
}

/// What an ack for a remembered message needs, compactly: server_msg_ids
/// minted by imflow are 26 hex digits and fit in a u128.
struct Compact {
    server_msg_id: Result<u128, Arc<str>>,
    conversation_id: Arc<str>,
    send_time: i64,
}

impl Compact {
    fn new(info: &AckInfo, conversation_id: Arc<str>) -> Self {
        let id = &info.server_msg_id;
        let parsed = (id.len() == 26
            && id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| u128::from_str_radix(id, 16).ok())
        .flatten();
        Compact {
            server_msg_id: parsed.ok_or_else(|| Arc::from(id.as_str())),
            conversation_id,
            send_time: info.send_time,
        }
    }

    fn info(&self) -> AckInfo {
        AckInfo {
            server_msg_id: match &self.server_msg_id {
                Ok(n) => format!("{n:026x}"),
                Err(s) => s.to_string(),
            },
            conversation_id: self.conversation_id.to_string(),
            send_time: self.send_time,
        }
    }
}

struct InFlight {
    info: AckInfo,
    waiters: Vec<Ack>,
}

/// Shards of the remembered table. Each grows on its own from empty: one
/// table preallocated for a million entries (~170 MB) was faulted in by
/// the first seconds of traffic (a 200 ms p99 spike on a fresh server),
/// and one that grows would stop every send for a rehash of all of it.
const SHARDS: usize = 64;

/// One shard: the key is already a hash, foldhash only spreads it.
type Shard = HashMap<u128, Compact, foldhash::fast::RandomState>;

/// The remembered table, split by the key's low bits.
struct Remembered(Vec<Shard>);

impl Remembered {
    fn new() -> Self {
        Remembered((0..SHARDS).map(|_| Shard::default()).collect())
    }
    fn shard(&self, h: u128) -> &Shard {
        &self.0[h as usize % SHARDS]
    }
    fn shard_mut(&mut self, h: u128) -> &mut Shard {
        &mut self.0[h as usize % SHARDS]
    }
    fn get(&self, h: &u128) -> Option<&Compact> {
        self.shard(*h).get(h)
    }
    fn insert(&mut self, h: u128, c: Compact) -> Option<Compact> {
        self.shard_mut(h).insert(h, c)
    }
    fn remove(&mut self, h: &u128) -> Option<Compact> {
        self.shard_mut(*h).remove(h)
    }
    fn len(&self) -> usize {
        self.0.iter().map(HashMap::len).sum()
    }
}

struct Inner {
    in_flight: HashMap<u128, InFlight>,
    remembered: Remembered,
    order: VecDeque<u128>,
    cap: usize,
}

impl Inner {
    fn remember(&mut self, h: u128, c: Compact) {
        if self.cap == 0 {
            return;
        }
        if self.remembered.insert(h, c).is_none() {
            self.order.push_back(h);
        }
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.remembered.remove(&old);
            }
        }
    }
}

pub struct DedupIndex {
    inner: Mutex<Inner>,
}

/// The outcome of claiming a key.
pub enum Claim {
    /// First sight: the message may proceed.
    New,
    /// A repeat; its ack has been dealt with (answered, or parked until the
    /// first message's commit).
    Repeat,
}

fn duplicate_status(info: &AckInfo) -> AckStatus {
    AckStatus::Duplicate(serde_json::to_string(info).unwrap_or_default().into())
}

impl DedupIndex {
    pub fn new(remember: usize) -> Self {
        DedupIndex {
            inner: Mutex::new(Inner {
                in_flight: HashMap::new(),
                remembered: Remembered::new(),
                order: VecDeque::new(),
                cap: remember,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Remember stored messages (oldest first), e.g. from the history at start:
    /// (sender, client_msg_id, ack info).
    pub fn remember_stored(&self, rows: impl IntoIterator<Item = (String, String, AckInfo)>) {
        let mut g = self.lock();
        let mut convs: HashMap<String, Arc<str>> = HashMap::new();
        for (s, c, info) in rows {
            let conv = convs
                .entry(info.conversation_id.clone())
                .or_insert_with(|| Arc::from(info.conversation_id.as_str()))
                .clone();
            g.remember(key_hash(&s, &c), Compact::new(&info, conv));
        }
    }

    /// The first message's ack info, if that message is stored.
    pub fn durable(&self, sender: &str, client_msg_id: &str) -> Option<AckInfo> {
        self.lock()
            .remembered
            .get(&key_hash(sender, client_msg_id))
            .map(Compact::info)
    }

    /// Claim the key of `msg`, or settle `ack` as a repeat.
    pub fn claim(&self, msg: &Stamped, ack: &mut Ack) -> Claim {
        let h = key_hash(&msg.sender, &msg.client_msg_id);
        let mut g = self.lock();
        if let Some(c) = g.remembered.get(&h) {
            let info = c.info();
            drop(g);
            let ack = ack.take();
            ack.set(duplicate_status(&info));
            ack.release();
            return Claim::Repeat;
        }
        match g.in_flight.get_mut(&h) {
            Some(f) => {
                f.waiters.push(ack.take());
                Claim::Repeat
            }
            None => {
                g.in_flight.insert(
                    h,
                    InFlight {
                        info: msg.ack_info(),
                        waiters: Vec::new(),
                    },
                );
                Claim::New
            }
        }
    }

    /// `msg` is committed: remember it and answer the repeats that waited.
    pub fn mark_durable(&self, msg: &Stamped) {
        let h = key_hash(&msg.sender, &msg.client_msg_id);
        let waiting = {
            let mut g = self.lock();
            let f = g.in_flight.remove(&h);
            let info = f
                .as_ref()
                .map(|f| f.info.clone())
                .unwrap_or_else(|| msg.ack_info());
            g.remember(h, Compact::new(&info, msg.conversation_id.clone()));
            f.map(|f| (info, f.waiters))
        };
        if let Some((info, waiters)) = waiting {
            for w in waiters {
                w.set(duplicate_status(&info));
                w.release();
            }
        }
    }

    /// Forget a claim whose message will never be stored (its waiters fail).
    pub fn abandon(&self, msg: &Stamped) {
        let h = key_hash(&msg.sender, &msg.client_msg_id);
        let removed = self.lock().in_flight.remove(&h);
        drop(removed);
    }

    pub fn in_flight(&self) -> usize {
        self.lock().in_flight.len()
    }

    /// How many stored messages it remembers at most.
    pub fn capacity(&self) -> usize {
        self.lock().cap
    }

    pub fn remembered(&self) -> usize {
        self.lock().remembered.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Target;

    fn msg(cmid: &str, id: &str) -> Stamped {
        Stamped {
            conversation_id: "si_a_b".into(),
            server_msg_id: id.into(),
            client_msg_id: cmid.into(),
            sender: "a".into(),
            target: Target::User("b".into()),
            content_type: 101,
            content: "{}".into(),
            send_time: 7,
        }
    }

    fn watch() -> (Ack, std::sync::mpsc::Receiver<AckStatus>) {
        let (tx, rx) = std::sync::mpsc::channel();
        (Ack::new(move |s| tx.send(s).unwrap()), rx)
    }

    #[test]
    fn a_repeat_of_an_in_flight_message_waits_for_its_commit() {
        let idx = DedupIndex::new(100);
        let first = msg("c1", "0000000000000000000000000a");
        assert!(matches!(idx.claim(&first, &mut Ack::none()), Claim::New));
        let (mut second, rx) = watch();
        assert!(matches!(
            idx.claim(&msg("c1", "0000000000000000000000000b"), &mut second),
            Claim::Repeat
        ));
        assert!(
            rx.try_recv().is_err(),
            "not answered before the first is durable"
        );
        idx.mark_durable(&first);
        match rx.recv().unwrap() {
            AckStatus::Duplicate(text) => assert!(text.contains("0000000000000000000000000a")),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            idx.durable("a", "c1").unwrap().server_msg_id,
            "0000000000000000000000000a"
        );
        let (mut third, rx) = watch();
        assert!(matches!(
            idx.claim(&msg("c1", "x"), &mut third),
            Claim::Repeat
        ));
        assert!(
            matches!(rx.recv().unwrap(), AckStatus::Duplicate(_)),
            "answered at once"
        );
    }

    #[test]
    fn remembers_a_bounded_number_of_stored_messages() {
        let idx = DedupIndex::new(2);
        let info = |id: &str| AckInfo {
            server_msg_id: id.into(),
            conversation_id: "si_a_b".into(),
            send_time: 1,
        };
        idx.remember_stored([
            ("a".to_string(), "1".to_string(), info("old-style-id")),
            ("a".to_string(), "2".to_string(), info("x2")),
            ("a".to_string(), "3".to_string(), info("x3")),
        ]);
        assert!(idx.durable("a", "1").is_none(), "evicted");
        assert_eq!(idx.durable("a", "3").unwrap().server_msg_id, "x3");
        assert_eq!(idx.remembered(), 2);
    }

    #[test]
    fn abandoning_fails_the_waiters() {
        let idx = DedupIndex::new(10);
        let first = msg("c1", "s1");
        idx.claim(&first, &mut Ack::none());
        let (mut second, rx) = watch();
        idx.claim(&msg("c1", "s2"), &mut second);
        idx.abandon(&first);
        assert!(matches!(rx.recv().unwrap(), AckStatus::Failed(_)));
        assert_eq!(idx.in_flight(), 0);
    }

    #[test]
    fn hashes_differ_for_near_keys() {
        assert_ne!(key_hash("ab", "c"), key_hash("a", "bc"));
        assert_ne!(key_hash("a", "1"), key_hash("a", "2"));
    }
}
