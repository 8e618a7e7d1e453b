//! Taps: every item of one partition key (a conversation) as it reaches a
//! stage and as a stage passes it on, for `imflow tap`. Free when nobody
//! taps: an input batch and an output send read one relaxed atomic. While
//! someone taps, each item takes a lock, and the items of a tapped key are
//! serialised; a tapper that reads too slowly loses events, never holds
//! up the pipeline.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::mpsc;

/// One sighting of a tapped item.
#[derive(Debug, Clone, Serialize)]
pub struct TapEvent {
    pub stage: Arc<str>,
    /// `in`: it reached the stage; `out`: the stage passed it on.
    pub event: &'static str,
    /// When (µs since the Unix epoch, this host's clock).
    pub at_us: i64,
    /// The item, as its edge's JSON.
    pub item: serde_json::Value,
}

struct Subscriber {
    id: u64,
    key: u64,
    tx: mpsc::Sender<TapEvent>,
}

static ACTIVE: AtomicUsize = AtomicUsize::new(0);
static NEXT_ID: AtomicU64 = AtomicU64::new(0);
static SUBSCRIBERS: Mutex<Vec<Subscriber>> = Mutex::new(Vec::new());

/// Events a tapper has not read yet, at most.
const BACKLOG: usize = 10_000;

/// A tap on one key; dropping it stops the tap.
pub struct Tap {
    id: u64,
    pub events: mpsc::Receiver<TapEvent>,
}

/// Tap the items whose partition key is `key`.
pub fn tap(key: u64) -> Tap {
    let (tx, events) = mpsc::channel(BACKLOG);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    subscribers().push(Subscriber { id, key, tx });
    ACTIVE.fetch_add(1, Ordering::Relaxed);
    Tap { id, events }
}

impl Drop for Tap {
    fn drop(&mut self) {
        subscribers().retain(|s| s.id != self.id);
        ACTIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

fn subscribers() -> std::sync::MutexGuard<'static, Vec<Subscriber>> {
    // A panic while holding the list leaves it consistent: take it anyway.
    SUBSCRIBERS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether anyone taps (checked before anything else is done).
#[inline]
pub(crate) fn active() -> bool {
    ACTIVE.load(Ordering::Relaxed) != 0
}

/// Report `item` (key `key`) at `stage` to the taps on that key.
pub(crate) fn observe<T: Serialize>(stage: &Arc<str>, event: &'static str, key: u64, item: &T) {
    let subs = subscribers();
    if !subs.iter().any(|s| s.key == key) {
        return;
    }
    let Ok(item) = serde_json::to_value(item) else {
        return;
    };
    let at_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    let ev = TapEvent {
        stage: stage.clone(),
        event,
        at_us,
        item,
    };
    for s in subs.iter().filter(|s| s.key == key) {
        let _ = s.tx.try_send(ev.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_tapped_key_is_seen_and_only_while_tapped() {
        let stage: Arc<str> = "s".into();
        observe(&stage, "in", 7, &1u32);
        let mut tap = tap(7);
        assert!(active());
        observe(&stage, "in", 8, &2u32);
        observe(&stage, "out", 7, &3u32);
        let ev = tap.events.try_recv().expect("the tapped key's item");
        assert_eq!((ev.event, ev.item.clone()), ("out", serde_json::json!(3)));
        assert!(
            tap.events.try_recv().is_err(),
            "nothing of key 8, nothing from before"
        );
        drop(tap);
        assert!(subscribers().iter().all(|s| s.key != 7));
    }
}
