//! Who is online on this gateway, and the outgoing queue of each connection.
//!
//! Each connection has a bounded queue. Delivering never waits: if a queue is
//! full the client is not reading, and the connection is closed rather than
//! allowed to hold more memory or slow the pipeline down.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use imflow_stages::{Presence, PushItem};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Something to write to a client.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A message for a `push` frame; consecutive ones are merged.
    Push(PushItem),
    /// A complete frame.
    Frame(Arc<str>),
    /// Tell the client why, then close.
    Kick(String),
}

pub struct ConnHandle {
    pub id: u64,
    pub platform: u8,
    tx: mpsc::Sender<Outbound>,
    /// Cancelled to make the connection close now (queue overflow, shutdown).
    pub close: CancellationToken,
    /// What was pushed on this connection per conversation. Between stages
    /// delivery is at-least-once (a crash replays what was not yet
    /// committed), so the same message can reach `push` twice: a repeat is
    /// dropped, so each connection gets each message once. Pushes come in
    /// seq order but for a message whose seq was given again after a fault
    /// (it arrives after later ones): that one is still delivered, late,
    /// rather than lost.
    pushed: std::sync::Mutex<HashMap<Arc<str>, Pushed>>,
    /// The users whose presence this connection follows.
    watching: std::sync::Mutex<Vec<Arc<str>>>,
    /// When it last sent `typing` per conversation (at most one a second is
    /// forwarded).
    typed: std::sync::Mutex<HashMap<String, std::time::Instant>>,
    /// Becomes true once the cluster's push processes can know of this
    /// connection (its presence is recorded and announced); at once alone.
    recorded: Arc<RecordedFlag>,
}

/// Whether a connection's presence is recorded, and who waits for it
/// (a flag and a `Notify`: a watch channel would cost every connection
/// about 400 bytes more).
#[derive(Default)]
struct RecordedFlag {
    done: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl ConnHandle {
    /// Wait (at most `limit`) until pushes can find this connection: its
    /// requests are answered only then, so a client that connects and
    /// syncs either finds a message by that sync or gets it by push
    /// (PROTOCOL guarantee 6). False when `limit` passed first.
    pub async fn recorded(&self, limit: std::time::Duration) -> bool {
        let flag = &self.recorded;
        let wait = async {
            loop {
                let notified = flag.notify.notified();
                tokio::pin!(notified);
                // Registered before the flag is read, so a `done` between
                // the two is not missed.
                notified.as_mut().enable();
                if flag.done.load(Ordering::Acquire) {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }
}

/// Tells a connection its presence is recorded (see [`ConnHandle::recorded`]).
#[derive(Clone)]
pub struct Recorded(Arc<RecordedFlag>);

impl Recorded {
    pub fn done(&self) {
        self.0.done.store(true, Ordering::Release);
        self.0.notify.notify_waiters();
    }
}

impl std::fmt::Debug for Recorded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Recorded")
    }
}

/// The seqs pushed of one conversation: the highest, and which of the 128
/// below it were pushed too.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Pushed {
    max: u64,
    /// Bit i: seq `max - i` was pushed.
    below: u128,
}

impl Pushed {
    /// Whether `seq` is new here (and remember it); `late` when it comes
    /// after a higher one.
    fn first(&mut self, seq: u64) -> Option<bool> {
        if seq > self.max {
            let shift = seq - self.max;
            self.below = if shift >= 128 { 0 } else { self.below << shift };
            self.below |= 1;
            self.max = seq;
            return Some(false);
        }
        let d = self.max - seq;
        if d >= 128 || self.below & (1 << d) != 0 {
            return None;
        }
        self.below |= 1 << d;
        Some(true)
    }
}

impl ConnHandle {
    /// Whether a `typing` in `conversation` may be forwarded now (and
    /// remember it).
    pub fn typing_allowed(&self, conversation: &str) -> bool {
        let now = std::time::Instant::now();
        let second = std::time::Duration::from_secs(1);
        let Ok(mut typed) = self.typed.lock() else {
            return false;
        };
        if typed.len() > 64 {
            typed.retain(|_, at| now.duration_since(*at) < second);
        }
        match typed.get(conversation) {
            Some(at) if now.duration_since(*at) < second => false,
            _ => {
                typed.insert(conversation.to_string(), now);
                true
            }
        }
    }

    /// Whether `item` is new on this connection (and remember it).
    fn first_push(&self, item: &PushItem) -> bool {
        let mut pushed = match self.pushed.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let window = match pushed.get_mut(&item.conversation_id) {
            Some(w) => w,
            None => pushed.entry(item.conversation_id.clone()).or_default(),
        };
        match window.first(item.seq) {
            Some(late) => {
                if late {
                    metrics::counter!("imflow_gateway_late_pushes_total").increment(1);
                }
                true
            }
            None => false,
        }
    }

    /// Queue `out`; a full queue closes the connection.
    pub fn offer(&self, out: Outbound) -> bool {
        match self.tx.try_send(out) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if !self.close.is_cancelled() {
                    metrics::counter!("imflow_gateway_slow_clients_closed_total").increment(1);
                    tracing::info!(
                        conn = self.id,
                        "client is not reading; closing its connection"
                    );
                }
                self.close.cancel();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// A change a cluster's presence registry must hear about.
#[derive(Debug, Clone)]
pub enum ConnEvent {
    Opened {
        user: Arc<str>,
        platform: u8,
        /// To call once the connection is in the registry and announced.
        recorded: Recorded,
    },
    /// A connection of the user on `platform` closed (and no other of that
    /// platform is left).
    Closed { user: Arc<str>, platform: u8 },
    /// The user's last connection on this gateway closed.
    LastClosed { user: Arc<str> },
}

type Observer = Box<dyn Fn(ConnEvent) + Send + Sync>;

pub struct Connections {
    /// Looked up once per recipient of every message (10k per message of
    /// a 10k group): foldhash, not SipHash, which showed in profiles.
    users: DashMap<Arc<str>, Vec<Arc<ConnHandle>>, foldhash::fast::RandomState>,
    observer: std::sync::OnceLock<Observer>,
    next_id: AtomicU64,
    open: AtomicUsize,
    queue_capacity: usize,
    /// Parent of every connection's close token: cancel to close them all.
    all: CancellationToken,
    /// user → the connections following their presence.
    watchers: DashMap<Arc<str>, Vec<Arc<ConnHandle>>>,
    /// Whether each followed user was last known online (so only a change
    /// is told).
    seen_online: DashMap<Arc<str>, bool>,
    /// In a cluster, presence changes are judged over every gateway (the
    /// door's link tells); alone, this gateway's connections are all.
    presence_elsewhere: std::sync::atomic::AtomicBool,
}

impl Connections {
    pub fn new(queue_capacity: usize) -> Self {
        Connections {
            users: DashMap::with_hasher(foldhash::fast::RandomState::default()),
            observer: std::sync::OnceLock::new(),
            next_id: AtomicU64::new(1),
            open: AtomicUsize::new(0),
            queue_capacity: queue_capacity.max(1),
            all: CancellationToken::new(),
            watchers: DashMap::new(),
            seen_online: DashMap::new(),
            presence_elsewhere: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Presence changes come from the cluster's registry, not from this
    /// gateway's own connections.
    pub fn presence_from_cluster(&self) {
        self.presence_elsewhere
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The platforms `user` is connected on here, ascending.
    pub fn platforms(&self, user: &str) -> Vec<u8> {
        let mut p: Vec<u8> = self
            .users
            .get(user)
            .map(|c| c.iter().map(|c| c.platform).collect())
            .unwrap_or_default();
        p.sort_unstable();
        p.dedup();
        p
    }

    /// Connection `conn` now follows the presence of `users`, each known
    /// online or not now (replacing what it followed before).
    pub fn watch(&self, conn: &Arc<ConnHandle>, users: Vec<(Arc<str>, bool)>) {
        self.unwatch(conn);
        for (u, online) in &users {
            self.watchers
                .entry(u.clone())
                .or_default()
                .push(conn.clone());
            self.seen_online.insert(u.clone(), *online);
        }
        if let Ok(mut w) = conn.watching.lock() {
            *w = users.into_iter().map(|(u, _)| u).collect();
        }
    }

    /// Where a followed user is online now (as the cluster's registry says):
    /// its followers hear if it came online or went fully offline.
    pub fn presence_seen(&self, user: &str, platforms: &[u8]) {
        let online = !platforms.is_empty();
        let before = self.seen_online.insert(Arc::from(user), online);
        if before != Some(online) {
            self.presence_changed(user, online, platforms);
        }
    }

    fn unwatch(&self, conn: &ConnHandle) {
        let before = match conn.watching.lock() {
            Ok(mut w) => std::mem::take(&mut *w),
            Err(_) => return,
        };
        for u in before {
            if let Some(mut list) = self.watchers.get_mut(&u) {
                list.retain(|c| c.id != conn.id);
            }
            if self.watchers.remove_if(&u, |_, v| v.is_empty()).is_some() {
                self.seen_online.remove(&u);
            }
        }
    }

    /// Tell the connections following `user` that it came online or went
    /// fully offline.
    pub fn presence_changed(&self, user: &str, online: bool, platforms: &[u8]) {
        let Some(list) = self.watchers.get(user) else {
            return;
        };
        let frame = serde_json::json!({"op": "presence", "user_id": user, "online": online, "platforms": platforms});
        let out = Outbound::Frame(frame.to_string().into());
        for c in list.iter() {
            c.offer(out.clone());
        }
    }

    /// Whether anyone here follows `user`'s presence.
    pub fn is_watched(&self, user: &str) -> bool {
        self.watchers.contains_key(user)
    }

    fn local_presence(&self) -> bool {
        !self
            .presence_elsewhere
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Call `f` for every connection opened and every user whose last
    /// connection closed (set once, by a cluster gateway).
    pub fn observe(&self, f: Observer) {
        let _ = self.observer.set(f);
    }

    fn tell(&self, e: ConnEvent) {
        if let Some(f) = self.observer.get() {
            f(e);
        }
    }

    pub fn open_count(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Reserve a slot under `cap`; false when the gateway is full.
    pub fn try_reserve(&self, cap: usize) -> bool {
        let mut cur = self.open.load(Ordering::Relaxed);
        loop {
            if cur >= cap {
                return false;
            }
            match self
                .open
                .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    pub fn release_slot(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("imflow_gateway_connections").set(self.open_count() as f64);
    }

    /// Register a connection of `user` on `platform`. An older connection on
    /// the same platform is kicked.
    pub fn register(
        &self,
        user: &Arc<str>,
        platform: u8,
    ) -> (Arc<ConnHandle>, mpsc::Receiver<Outbound>) {
        let (tx, rx) = mpsc::channel(self.queue_capacity);
        // Alone, this gateway's pushes find the connection at once.
        let recorded = Arc::new(RecordedFlag::default());
        recorded
            .done
            .store(self.observer.get().is_none(), Ordering::Relaxed);
        let handle = Arc::new(ConnHandle {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            platform,
            tx,
            close: self.all.child_token(),
            pushed: std::sync::Mutex::new(HashMap::new()),
            watching: std::sync::Mutex::new(Vec::new()),
            typed: std::sync::Mutex::new(HashMap::new()),
            recorded: recorded.clone(),
        });
        let first = !self.users.contains_key(&**user);
        let replaced = {
            let mut conns = self.users.entry(user.clone()).or_default();
            let old = conns
                .iter()
                .position(|c| c.platform == platform)
                .map(|i| conns.swap_remove(i));
            conns.push(handle.clone());
            old
        };
        if let Some(old) = replaced {
            if !old.offer(Outbound::Kick(
                "logged in on another device of the same platform".into(),
            )) {
                old.close.cancel();
            }
        }
        metrics::gauge!("imflow_gateway_connections").set(self.open_count() as f64);
        self.tell(ConnEvent::Opened {
            user: user.clone(),
            platform,
            recorded: Recorded(recorded),
        });
        if first && self.local_presence() && self.is_watched(user) {
            self.presence_seen(user, &self.platforms(user));
        }
        (handle, rx)
    }

    /// Forget connection `id` of `user`; whether it was the user's last here.
    pub fn unregister(&self, user: &str, id: u64) -> bool {
        let mut last = false;
        let mut platform = None;
        if let Some(mut conns) = self.users.get_mut(user) {
            if let Some(c) = conns.iter().find(|c| c.id == id) {
                self.unwatch(c);
                platform = Some(c.platform);
            }
            conns.retain(|c| c.id != id);
            let still = platform.is_some_and(|p| conns.iter().any(|c| c.platform == p));
            if conns.is_empty() {
                drop(conns);
                if self.users.remove_if(user, |_, v| v.is_empty()).is_some() {
                    last = true;
                }
            }
            if let (Some(p), false) = (platform, still) {
                self.tell(ConnEvent::Closed {
                    user: user.into(),
                    platform: p,
                });
            }
        }
        if last {
            self.tell(ConnEvent::LastClosed { user: user.into() });
            if self.local_presence() && self.is_watched(user) {
                self.presence_seen(user, &[]);
            }
        }
        last
    }

    /// Queue `out` on every connection of `user`, but `except` (a connection id).
    pub fn send_to_user(&self, user: &str, except: Option<u64>, out: &Outbound) {
        if let Some(conns) = self.users.get(user) {
            for c in conns.iter().filter(|c| Some(c.id) != except) {
                c.offer(out.clone());
            }
        }
    }

    /// Kick `user`'s connections (on `platform`, or all).
    pub fn kick(&self, user: &str, platform: Option<u8>, reason: &str) {
        if let Some(conns) = self.users.get(user) {
            for c in conns
                .iter()
                .filter(|c| platform.is_none_or(|p| p == c.platform))
            {
                if !c.offer(Outbound::Kick(reason.to_string())) {
                    c.close.cancel();
                }
            }
        }
    }

    /// Close every connection (shutdown).
    pub fn close_all(&self) {
        self.all.cancel();
    }
}

impl Presence for Connections {
    fn is_online(&self, user: &str) -> bool {
        self.users.get(user).is_some_and(|c| !c.is_empty())
    }

    fn deliver(&self, user: &str, item: &PushItem) {
        if let Some(conns) = self.users.get(user) {
            for c in conns.iter() {
                if c.first_push(item) {
                    c.offer(Outbound::Push(item.clone()));
                } else {
                    metrics::counter!("imflow_gateway_repeated_pushes_dropped_total").increment(1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(seq: u64) -> PushItem {
        PushItem {
            conversation_id: "si_a_b".into(),
            seq,
            body: "{}".into(),
        }
    }

    #[tokio::test]
    async fn a_full_queue_closes_the_connection_instead_of_growing() {
        let c = Connections::new(2);
        let user: Arc<str> = "a".into();
        let (h, mut rx) = c.register(&user, 1);
        for s in 0..5 {
            c.deliver("a", &item(s));
        }
        assert!(h.close.is_cancelled());
        let mut n = 0;
        while rx.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(n, 2, "nothing beyond the bound was kept");
    }

    #[tokio::test]
    async fn a_replayed_message_reaches_a_connection_once() {
        let c = Connections::new(16);
        let user: Arc<str> = "a".into();
        let (_h, mut rx) = c.register(&user, 1);
        // After a crash the pipeline replays what it had not committed:
        // 1, 2, 3 then 2, 3 again, then 4.
        for s in [1, 2, 3, 2, 3, 4] {
            c.deliver("a", &item(s));
        }
        let mut got = Vec::new();
        while let Ok(Outbound::Push(p)) = rx.try_recv() {
            got.push(p.seq);
        }
        assert_eq!(got, [1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn a_message_given_a_later_seq_after_a_fault_is_still_delivered_once() {
        let c = Connections::new(16);
        let user: Arc<str> = "a".into();
        let (_h, mut rx) = c.register(&user, 1);
        // 7 was reassigned after 8 and 9 went out; then replays of all.
        for s in [5, 6, 8, 9, 7, 7, 8, 9, 200, 7] {
            c.deliver("a", &item(s));
        }
        let mut got = Vec::new();
        while let Ok(Outbound::Push(p)) = rx.try_recv() {
            got.push(p.seq);
        }
        assert_eq!(got, [5, 6, 8, 9, 7, 200]);
    }

    #[tokio::test]
    async fn same_platform_login_kicks_the_older_connection() {
        let c = Connections::new(8);
        let user: Arc<str> = "a".into();
        let (_old, mut old_rx) = c.register(&user, 1);
        let (_other, mut other_rx) = c.register(&user, 2);
        let (_new, _new_rx) = c.register(&user, 1);
        assert!(matches!(old_rx.try_recv(), Ok(Outbound::Kick(_))));
        assert!(other_rx.try_recv().is_err(), "another platform stays");
        c.deliver("a", &item(1));
        assert!(
            old_rx.try_recv().is_err(),
            "the kicked connection gets no more pushes"
        );
        assert!(matches!(other_rx.try_recv(), Ok(Outbound::Push(_))));
    }
}
