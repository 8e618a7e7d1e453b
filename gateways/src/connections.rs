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
    /// The highest seq pushed on this connection per conversation. Between
    /// stages delivery is at-least-once (a crash replays what was not yet
    /// committed), so the same message can reach `push` twice; pushes of a
    /// conversation come in seq order, so anything at or below the last one
    /// pushed is a repeat and is dropped: each connection gets each message
    /// once.
    pushed: std::sync::Mutex<HashMap<Arc<str>, u64>>,
}

impl ConnHandle {
    /// Whether `item` is new on this connection (and remember it).
    fn first_push(&self, item: &PushItem) -> bool {
        let mut pushed = match self.pushed.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        match pushed.get_mut(&item.conversation_id) {
            Some(last) if *last >= item.seq => false,
            Some(last) => {
                *last = item.seq;
                true
            }
            None => {
                pushed.insert(item.conversation_id.clone(), item.seq);
                true
            }
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
    },
    /// The user's last connection on this gateway closed.
    LastClosed {
        user: Arc<str>,
    },
}

type Observer = Box<dyn Fn(ConnEvent) + Send + Sync>;

pub struct Connections {
    users: DashMap<Arc<str>, Vec<Arc<ConnHandle>>>,
    observer: std::sync::OnceLock<Observer>,
    next_id: AtomicU64,
    open: AtomicUsize,
    queue_capacity: usize,
    /// Parent of every connection's close token: cancel to close them all.
    all: CancellationToken,
}

impl Connections {
    pub fn new(queue_capacity: usize) -> Self {
        Connections {
            users: DashMap::new(),
            observer: std::sync::OnceLock::new(),
            next_id: AtomicU64::new(1),
            open: AtomicUsize::new(0),
            queue_capacity: queue_capacity.max(1),
            all: CancellationToken::new(),
        }
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
        let handle = Arc::new(ConnHandle {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            platform,
            tx,
            close: self.all.child_token(),
            pushed: std::sync::Mutex::new(HashMap::new()),
        });
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
        });
        (handle, rx)
    }

    pub fn unregister(&self, user: &str, id: u64) {
        if let Some(mut conns) = self.users.get_mut(user) {
            conns.retain(|c| c.id != id);
            if conns.is_empty() {
                drop(conns);
                if self.users.remove_if(user, |_, v| v.is_empty()).is_some() {
                    self.tell(ConnEvent::LastClosed { user: user.into() });
                }
            }
        }
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
