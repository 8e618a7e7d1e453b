//! imflow's stage kinds and the stores behind them.
//!
//! Each kind is one file under [`kinds`] and one line in its list.
//! A kind holds no resources: it names the [`roles`] it needs and provides,
//! and takes them while it is built from the process's resources, which
//! [`Services::resources`] fills: the store roles of [`store`] (embedded or
//! cluster, chosen by [`Backends`]), the resend keys, and the [`Presence`] a
//! gateway implements so `push` can reach connections without this crate
//! knowing about sockets.

pub mod dedup;
pub mod error;
pub mod hooks;
pub mod hot;
pub mod kinds;
pub mod model;
pub mod roles;
pub mod store;

use std::sync::Arc;

use imflow_runtime::{Ack, Registry, Resources};

pub use error::Error;
pub use kinds::ingest::{Door, IngestHandle, PendingAck, Swap};
use store::mongo::{MongoHistory, MongoSettings};
use store::mysql::{MysqlDirectory, MysqlSettings};
use store::redis::{Redis, RedisHot, RedisSequencer, RedisSettings};
use store::{
    Directory, Files, History, Hot, LocalFiles, LocalSequencer, S3Files, S3Settings, Sequencer,
    SqliteStore,
};

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

    /// Whether `user` has a connection on any platform, as far as this
    /// process knows (a connection made in the last moments may not be
    /// known yet: it then syncs what it missed).
    fn is_online(&self, user: &str) -> bool;

    /// Queue `item` for every one of `users` (one message's recipients); an
    /// implementation that forwards to other processes sends it once per
    /// process instead of once per user. `done` is released once the item
    /// is as far as this process can take it (queued on local connections,
    /// or accepted by every gateway it went to): with Kafka edges, the
    /// offset of the message commits only then.
    fn deliver_all(&self, users: &[Arc<str>], item: &PushItem, done: Ack) {
        for u in users {
            self.deliver(u, item);
        }
        done.release();
    }
}

/// Where resends are recognised.
#[derive(Clone)]
pub enum Resends {
    /// In this process (standalone): `seq-assign` claims each key and
    /// `persist-mongo` settles it after the commit.
    Local(Arc<dedup::DedupIndex>),
    /// In Redis (cluster): `ingest` claims each key before the message
    /// enters the pipeline, so with Kafka edges (where the client's ack comes
    /// before the seq) a resend in flight still gets the first's ids.
    Redis(Arc<Redis>),
}

/// One set of store roles: embedded or cluster.
#[derive(Clone)]
pub struct Backends {
    pub directory: Arc<dyn Directory>,
    pub history: Arc<dyn History>,
    pub hot: Arc<dyn Hot>,
    pub sequencer: Arc<dyn Sequencer>,
    pub resends: Resends,
    pub files: Arc<dyn Files>,
}

/// Where the cluster's servers are.
#[derive(Debug, Clone, Default)]
pub struct ClusterSettings {
    pub mysql: MysqlSettings,
    pub mongo: MongoSettings,
    pub redis: RedisSettings,
    /// Object storage for files; without it, files are refused.
    pub s3: Option<S3Settings>,
}

/// How many recently stored messages the resend index remembers by default.
pub const DEFAULT_DEDUP_REMEMBER: usize = 1_000_000;

impl Backends {
    /// Standalone: everything in one SQLite file and this process's memory.
    pub fn embedded(store: Arc<SqliteStore>, remember: usize) -> Backends {
        Self::embedded_with(store, remember, hot::DEFAULT_HOT_BYTES)
    }

    /// As `embedded`, with the hot cache in `hot_bytes` of memory.
    pub fn embedded_with(store: Arc<SqliteStore>, remember: usize, hot_bytes: usize) -> Backends {
        let history: Arc<dyn History> = store.clone();
        Backends {
            files: Arc::new(LocalFiles::new(
                store::files::local_dir(store.dir()),
                store.clone(),
            )),
            directory: store,
            sequencer: Arc::new(LocalSequencer::new(history.clone())),
            history,
            hot: Arc::new(hot::HotCache::new(64, hot_bytes)),
            resends: Resends::Local(Arc::new(dedup::DedupIndex::new(remember))),
        }
    }

    /// Cluster: MySQL, MongoDB and Redis. Fails within seconds, naming the
    /// setting, when a server does not answer or refuses the credentials.
    pub async fn cluster(settings: &ClusterSettings) -> Result<Backends, Error> {
        let redis = Redis::connect(settings.redis.clone()).await?;
        let history: Arc<dyn History> = MongoHistory::connect(&settings.mongo).await?;
        let directory = MysqlDirectory::connect(&settings.mysql, Some(redis.clone())).await?;
        let files: Arc<dyn Files> = match &settings.s3 {
            Some(s3) => Arc::new(S3Files::new(s3)?),
            None => Arc::new(store::files::NoFiles),
        };
        Ok(Backends {
            directory,
            files,
            sequencer: Arc::new(RedisSequencer::new(redis.clone(), history.clone())),
            history,
            hot: Arc::new(RedisHot::new(redis.clone())),
            resends: Resends::Redis(redis),
        })
    }

    pub async fn close(&self) {
        self.directory.close().await;
        self.history.close().await;
    }
}

/// What the stages share with each other and with the doors.
#[derive(Clone)]
pub struct Services {
    pub directory: Arc<dyn Directory>,
    pub history: Arc<dyn History>,
    pub hot: Arc<dyn Hot>,
    pub sequencer: Arc<dyn Sequencer>,
    pub resends: Resends,
    pub presence: Arc<dyn Presence>,
    pub files: Arc<dyn Files>,
}

impl Services {
    /// Services over `backends`; an in-process resend index starts with the
    /// keys of the most recent stored messages.
    pub async fn open(backends: Backends, presence: Arc<dyn Presence>) -> Result<Self, Error> {
        let s = Self::new(backends, presence);
        if let Resends::Local(index) = &s.resends {
            let rows = s.history.recent_sent(index.capacity()).await?;
            index.remember_stored(rows);
            tracing::info!(remembered = index.remembered(), "resend index loaded");
        }
        Ok(s)
    }

    /// Services with nothing loaded.
    pub fn new(backends: Backends, presence: Arc<dyn Presence>) -> Self {
        Services {
            directory: backends.directory,
            history: backends.history,
            hot: backends.hot,
            sequencer: backends.sequencer,
            resends: backends.resends,
            presence,
            files: backends.files,
        }
    }

    /// Every role a stage of this crate may need, for the process's
    /// topology (the ingest door is the one a stage provides).
    pub fn resources(&self) -> Resources {
        Resources::new()
            .with(&roles::DIRECTORY, self.directory.clone())
            .with(&roles::HISTORY, self.history.clone())
            .with(&roles::HOT, self.hot.clone())
            .with(&roles::SEQUENCER, self.sequencer.clone())
            .with(&roles::RESENDS, self.resends.clone())
            .with(&roles::PRESENCE, self.presence.clone())
            .with(&roles::FILES, self.files.clone())
    }
}

pub use kinds::{register_all, register_test_kinds};

/// A registry of every kind of this crate: enough to check a pipeline,
/// since kinds hold no resources.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    register_all(&mut r);
    r
}
