//! imflow's stage kinds and the stores behind them.
//!
//! Each kind is one file under [`kinds`] and one line in [`register_all`].
//! Stages reach the outside world only through [`Services`]: the store, the
//! hot cache, the dedup index, and the [`Presence`] a gateway implements so
//! `push` can reach connections without this crate knowing about sockets.

pub mod dedup;
pub mod error;
pub mod hot;
pub mod kinds;
pub mod model;
pub mod store;

use std::sync::Arc;

use imflow_runtime::Registry;

pub use error::Error;
pub use kinds::ingest::{IngestHandle, PendingAck};

/// A message on its way to one user's connections.
#[derive(Debug, Clone)]
pub struct PushItem {
    pub conversation_id: Arc<str>,
    pub seq: u64,
    /// The message JSON, rendered once and shared by every recipient.
    pub body: Arc<str>,
}

/// Where `push` hands messages: the connections of a user on this host.
pub trait Presence: Send + Sync + 'static {
    /// Queue `item` on every connection of `user`; never waits.
    fn deliver(&self, user: &str, item: &PushItem);
}

/// What the stages share with each other and with the doors.
#[derive(Clone)]
pub struct Services {
    pub store: Arc<store::Store>,
    pub hot: Arc<hot::HotCache>,
    pub dedup: Arc<dedup::DedupIndex>,
    pub presence: Arc<dyn Presence>,
    pub ingest: IngestHandle,
}

/// How many recently stored messages the resend index remembers by default.
pub const DEFAULT_DEDUP_REMEMBER: usize = 1_000_000;

impl Services {
    /// Services over `store`; the resend index starts with the keys of the
    /// `remember` most recent stored messages.
    pub async fn open(
        store: Arc<store::Store>,
        presence: Arc<dyn Presence>,
        remember: usize,
    ) -> Result<Self, Error> {
        let s = Self::new(store, presence, remember);
        let rows = s.store.recent_sent(remember).await?;
        s.dedup.remember_stored(rows);
        tracing::info!(remembered = s.dedup.remembered(), "resend index loaded");
        Ok(s)
    }

    /// Services with an empty resend index (for checking pipelines).
    pub fn new(store: Arc<store::Store>, presence: Arc<dyn Presence>, remember: usize) -> Self {
        let dedup = Arc::new(dedup::DedupIndex::new(remember));
        Services {
            ingest: IngestHandle::new(store.clone(), dedup.clone()),
            hot: Arc::new(hot::HotCache::new(64)),
            store,
            dedup,
            presence,
        }
    }
}

/// Register every stage kind this crate provides.
pub fn register_all(registry: &mut Registry, services: &Services) {
    registry
        .register(kinds::ingest::Ingest::new(services))
        .register(kinds::seq_assign::SeqAssign::new(services))
        .register(kinds::persist_mongo::PersistMongo::new(services))
        .register(kinds::persist_redis::PersistRedis::new(services))
        .register(kinds::fanout::Fanout::new(services))
        .register(kinds::push::Push::new(services));
}
