//! The roles stages take from, and give to, the process that runs them
//! (see `imflow_runtime::resources`). Each is declared once here; a kind
//! lists the ones it uses in `needs`/`provides`, and the binary fills a
//! process's `Resources` from [`crate::Services::resources`].

use std::sync::Arc;

use imflow_runtime::Role;

use crate::store::{DeadLetters, Directory, Files, History, Hot, Sequencer};
use crate::{IngestHandle, Presence, Resends};

/// Users, groups, conversations (SQLite or MySQL).
pub const DIRECTORY: Role<Arc<dyn Directory>> = Role::new("directory");
/// Every message by `(conversation, seq)` (SQLite or MongoDB).
pub const HISTORY: Role<Arc<dyn History>> = Role::new("history");
/// Recent messages and the visible max seq (memory or Redis).
pub const HOT: Role<Arc<dyn Hot>> = Role::new("hot");
/// The next seq of a conversation (memory or Redis).
pub const SEQUENCER: Role<Arc<dyn Sequencer>> = Role::new("sequencer");
/// Where resends are recognised.
pub const RESENDS: Role<Resends> = Role::new("resends");
/// The connections a push reaches: this host's, or the gateways'.
pub const PRESENCE: Role<Arc<dyn Presence>> = Role::new("presence");
/// Where the bytes of files are (a directory, or an S3 object store).
pub const FILES: Role<Arc<dyn Files>> = Role::new("files");
/// Where a sink puts what it gave up on (a table, or a Kafka topic).
pub const DEAD_LETTERS: Role<Arc<dyn DeadLetters>> = Role::new("dead-letters");
/// Provided by the source of sends: what the doors hand messages to. A
/// process that provides it serves `POST /rpc/send` and says so in etcd.
pub const INGEST_DOOR: Role<IngestHandle> = Role::new("ingest-door");
