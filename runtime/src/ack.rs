//! End-to-end acknowledgement of items travelling through the graph.
//!
//! Every [`Envelope`](crate::Envelope) carries an [`Ack`]. The party that
//! created the item (a gateway waiting to answer a client, a Kafka consumer
//! waiting to commit an offset) attaches a callback; the callback runs exactly
//! once, when the last clone of the ack is released. A stage that makes an item
//! durable releases the ack only after its write is committed; a stage that
//! merely transforms an item moves the ack along with it. The status reported
//! is the worst any holder set: a single failed branch fails the whole item.
//!
//! Two parties wait on items, at different points. A Kafka consumer may
//! commit an offset only once everything the item became downstream is
//! itself durable (so a crash between two stages loses nothing): its ack
//! fires when the last holder releases, at the end of the pipeline. A client
//! waiting for its "ack" must hear as soon as the message is durable, not
//! after its push: an ack made with [`Ack::until_durable`] also fires when a
//! stage calls [`Ack::durable`], and then not again. So a durable stage
//! marks the item durable and forwards the same ack, never a fresh one.

use std::fmt;
use std::sync::{Arc, Mutex};

/// What became of an item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckStatus {
    /// Every holder released it normally.
    Delivered,
    /// A stage recognised the item as a repeat of an earlier one and dropped
    /// it; the text describes the earlier item (its meaning is the stages').
    Duplicate(Arc<str>),
    /// A stage refused it on purpose (a policy said no) and dropped it: it
    /// is done, not to be tried again; the text is the reason, for whoever
    /// sent it.
    Refused(Arc<str>),
    /// A stage could not process it; the text says why.
    Failed(Arc<str>),
}

impl AckStatus {
    fn rank(&self) -> u8 {
        match self {
            AckStatus::Delivered => 0,
            AckStatus::Duplicate(_) => 1,
            AckStatus::Refused(_) => 2,
            AckStatus::Failed(_) => 3,
        }
    }
}

type Callback = Box<dyn FnOnce(AckStatus) + Send>;

struct Inner {
    state: Mutex<(AckStatus, Option<Callback>)>,
    /// The callback fires at the durable point too (see the module docs).
    at_durable: bool,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, (AckStatus, Option<Callback>)> {
        match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let state = match self.state.get_mut() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(cb) = state.1.take() {
            cb(std::mem::replace(&mut state.0, AckStatus::Delivered));
        }
    }
}

/// A shared acknowledgement handle. Cloning shares it; the callback runs when
/// the last clone is gone.
///
/// Every holder must [`release`](Ack::release) its share explicitly. A share
/// that is merely dropped (a stage that died, a queue torn down with items in
/// it) marks the item failed: losing track of an item must never look like
/// success to the client waiting for it.
#[derive(Default)]
pub struct Ack {
    inner: Option<Arc<Inner>>,
    released: bool,
}

impl Clone for Ack {
    fn clone(&self) -> Self {
        Ack {
            inner: self.inner.clone(),
            released: false,
        }
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        if !self.released {
            self.fail("dropped before it was acknowledged");
        }
    }
}

impl fmt::Debug for Ack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.inner.is_some() {
            "Ack(pending)"
        } else {
            "Ack(none)"
        })
    }
}

impl Ack {
    /// An ack nobody waits for.
    pub fn none() -> Self {
        Ack::default()
    }

    /// An ack whose callback runs when the last holder releases it (what a
    /// Kafka consumer's offset waits for).
    pub fn new(callback: impl FnOnce(AckStatus) + Send + 'static) -> Self {
        Self::make(callback, false)
    }

    /// An ack whose callback runs as soon as a stage marks the item
    /// [`durable`](Ack::durable) (what a client's "ack" waits for), or at the
    /// last release if that comes first.
    pub fn until_durable(callback: impl FnOnce(AckStatus) + Send + 'static) -> Self {
        Self::make(callback, true)
    }

    fn make(callback: impl FnOnce(AckStatus) + Send + 'static, at_durable: bool) -> Self {
        Ack {
            inner: Some(Arc::new(Inner {
                state: Mutex::new((AckStatus::Delivered, Some(Box::new(callback)))),
                at_durable,
            })),
            released: false,
        }
    }

    /// Record a status; the worst one set by any holder is reported.
    pub fn set(&self, status: AckStatus) {
        if let Some(inner) = &self.inner {
            let mut state = inner.lock();
            if status.rank() > state.0.rank() {
                state.0 = status;
            }
        }
    }

    /// The item is durable: an ack made with [`until_durable`](Ack::until_durable)
    /// reports its status now; any other keeps waiting for its last release.
    /// The holder keeps its share and still releases it as usual.
    pub fn durable(&self) {
        let Some(inner) = &self.inner else { return };
        if !inner.at_durable {
            return;
        }
        let fire = {
            let mut state = inner.lock();
            state.1.take().map(|cb| (cb, state.0.clone()))
        };
        if let Some((cb, status)) = fire {
            cb(status);
        }
    }

    pub fn fail(&self, reason: impl Into<Arc<str>>) {
        self.set(AckStatus::Failed(reason.into()));
    }

    /// The item was refused on purpose, with `reason` for its sender; the
    /// holder still releases its share.
    pub fn refuse(&self, reason: impl Into<Arc<str>>) {
        self.set(AckStatus::Refused(reason.into()));
    }

    /// Release this holder's share: the item is durable (or delivered) as far
    /// as this holder is concerned.
    pub fn release(mut self) {
        self.released = true;
    }

    /// Take the ack out, leaving an empty one behind, e.g. when a durable stage
    /// keeps the ack until its commit and forwards the item without it.
    pub fn take(&mut self) -> Ack {
        std::mem::take(self)
    }

    pub fn is_none(&self) -> bool {
        self.inner.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn fires_once_when_last_clone_drops() {
        let (tx, rx) = mpsc::channel();
        let a = Ack::new(move |s| tx.send(s).unwrap());
        let b = a.clone();
        a.release();
        assert!(rx.try_recv().is_err(), "must wait for every clone");
        b.release();
        assert_eq!(rx.try_recv().unwrap(), AckStatus::Delivered);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn worst_status_wins() {
        let (tx, rx) = mpsc::channel();
        let a = Ack::new(move |s| tx.send(s).unwrap());
        let b = a.clone();
        b.fail("disk full");
        a.set(AckStatus::Duplicate("x".into()));
        a.release();
        b.release();
        assert_eq!(rx.recv().unwrap(), AckStatus::Failed("disk full".into()));
    }

    #[test]
    fn a_client_hears_at_the_durable_point_and_an_offset_at_the_end() {
        let (tx, rx) = mpsc::channel();
        let client = Ack::until_durable(move |s| tx.send(s).unwrap());
        client.durable();
        assert_eq!(rx.try_recv().unwrap(), AckStatus::Delivered);
        client.fail("a later stage failed");
        client.release();
        assert!(
            rx.try_recv().is_err(),
            "answered once, at the durable point"
        );

        let (tx, rx) = mpsc::channel();
        let offset = Ack::new(move |s| tx.send(s).unwrap());
        let downstream = offset.clone();
        offset.durable();
        offset.release();
        assert!(
            rx.try_recv().is_err(),
            "an offset waits for the whole chain"
        );
        downstream.release();
        assert_eq!(rx.try_recv().unwrap(), AckStatus::Delivered);
    }

    #[test]
    fn a_dropped_share_fails_the_item() {
        let (tx, rx) = mpsc::channel();
        let a = Ack::new(move |s| tx.send(s).unwrap());
        let b = a.clone();
        a.release();
        drop(b);
        assert!(matches!(rx.recv().unwrap(), AckStatus::Failed(_)));
    }
}
