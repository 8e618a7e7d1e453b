//! The stores behind the stages, as the roles they play rather than the
//! servers that play them:
//!
//! | role | standalone | cluster |
//! |---|---|---|
//! | [`Directory`]: users, groups, members, conversations, read seqs, token revocations, settings | SQLite | MySQL (master for writes, replica for reads) |
//! | [`History`]: every message, durable, by (conversation, seq) | SQLite | MongoDB |
//! | [`Hot`]: recent messages and the visible max seq per conversation | process memory | Redis |
//! | [`Sequencer`]: the next seq of a conversation | counters in the seq-assign task | Redis counters, rebuilt from the history |
//! | resend keys (`crate::Resends`) | process memory | Redis, with a TTL |
//!
//! Stages and doors hold `Arc<dyn Role>` only, so the same pipeline runs on
//! either set; [`Backends`] builds one set or the other.

pub mod mongo;
pub mod mysql;
pub mod redis;
pub mod sqlite;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::Result;
use crate::model::{AckInfo, Conversation, ImError, Sequenced};

pub use sqlite::SqliteStore;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Owner = 1,
    Admin = 2,
    Member = 3,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }
    pub(crate) fn from_i64(v: i64) -> Role {
        match v {
            1 => Role::Owner,
            2 => Role::Admin,
            _ => Role::Member,
        }
    }
}

/// A group as the hot path sees it: a snapshot replaced on every change, so
/// readers never lock.
#[derive(Debug)]
pub struct GroupState {
    pub group_id: Arc<str>,
    pub name: String,
    pub owner: Arc<str>,
    pub roles: HashMap<Arc<str>, Role>,
    /// Members in join order; shared by every delivery of a group message.
    pub members: Arc<[Arc<str>]>,
}

impl GroupState {
    pub fn role_of(&self, user: &str) -> Option<Role> {
        self.roles.get(user).copied()
    }

    pub(crate) fn from_rows(
        group_id: &str,
        name: String,
        owner: String,
        rows: impl IntoIterator<Item = (String, i64)>,
    ) -> GroupState {
        let mut roles = HashMap::new();
        let mut members = Vec::new();
        for (user, role) in rows {
            let u: Arc<str> = Arc::from(user);
            roles.insert(u.clone(), Role::from_i64(role));
            members.push(u);
        }
        GroupState {
            group_id: group_id.into(),
            name,
            owner: owner.into(),
            roles,
            members: members.into(),
        }
    }
}

/// How hard a commit is made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// fsync on every commit: an acknowledged message survives power loss.
    #[default]
    Full,
    /// fsync at checkpoints: survives a crash of the process, not of the machine.
    Normal,
}

/// One conversation a user takes part in, for `sync`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConversationState {
    pub conversation_id: String,
    pub max_seq: u64,
    pub read_seq: u64,
}

/// Users, groups and what users keep per conversation.
#[async_trait]
pub trait Directory: Send + Sync + 'static {
    /// Store `value` under `key` unless it has one; returns the value in force.
    async fn setting_or_insert(&self, key: &str, value: &str) -> Result<String>;

    async fn user_exists(&self, user: &str) -> Result<bool>;
    /// Register users; an existing user keeps everything but a new nickname.
    async fn register_users(&self, users: &[(String, Option<String>)]) -> Result<usize>;

    /// The generation tokens of `user` on `platform` must carry (logout
    /// bumps it, revoking every older token).
    async fn token_generation(&self, user: &str, platform: u8) -> Result<u64>;
    async fn bump_generation(&self, user: &str, platforms: &[u8]) -> Result<()>;

    async fn group(&self, group_id: &str) -> Result<Option<Arc<GroupState>>>;
    async fn create_group(
        &self,
        group_id: &str,
        name: &str,
        owner: &str,
        members: &[String],
    ) -> Result<()>;
    /// Add members; returns how many were not members before.
    async fn add_members(&self, group_id: &str, users: &[String]) -> Result<u64>;
    async fn remove_member(&self, group_id: &str, user: &str) -> Result<bool>;
    async fn set_role(&self, group_id: &str, user: &str, role: Role) -> Result<()>;

    /// Every conversation `user` takes part in (single chats that have a
    /// message, and the user's groups), with the user's read seq.
    async fn conversations_of(&self, user: &str) -> Result<Vec<(String, u64)>>;
    /// Single chats whose first message is stored: both users now see them.
    async fn open_single_chats(&self, conversations: &[Arc<str>]) -> Result<()>;
    /// Raise the read seq of `user` in `conversation` to `seq` (never
    /// lowers it). Returns the read seq in force.
    async fn set_read(&self, user: &str, conversation: &str, seq: u64) -> Result<u64>;

    async fn close(&self) {}
}

/// Whether `user` may read `conversation`: one of the pair, or a member.
pub async fn is_participant(
    directory: &dyn Directory,
    user: &str,
    conversation: &Conversation,
) -> Result<bool> {
    Ok(match conversation {
        Conversation::Single(a, b) => &**a == user || &**b == user,
        Conversation::Group(g) => directory
            .group(g)
            .await?
            .is_some_and(|g| g.role_of(user).is_some()),
    })
}

/// Page of members with their roles, in join order, and the total.
pub async fn members_page(
    directory: &dyn Directory,
    group_id: &str,
    offset: usize,
    limit: usize,
) -> Result<(Vec<(Arc<str>, Role)>, usize)> {
    let Some(g) = directory.group(group_id).await? else {
        return Err(ImError::not_found(format!("no group {group_id}")).into());
    };
    let page = g
        .members
        .iter()
        .skip(offset)
        .take(limit)
        .map(|u| (u.clone(), g.role_of(u).unwrap_or(Role::Member)))
        .collect();
    Ok((page, g.members.len()))
}

/// What a commit found: the positions (in the committed batch) of messages
/// whose `(conversation, seq)` is already stored under another
/// `server_msg_id`. Such a message is not stored: its seq was handed out
/// twice (a counter behind the history) and it needs a new one.
pub type Taken = Vec<usize>;

/// The durable message history.
#[async_trait]
pub trait History: Send + Sync + 'static {
    /// Store a batch durably. Idempotent: a message already stored with the
    /// same (conversation, seq) and the same server_msg_id is left as it is,
    /// so a replay stores nothing twice; one stored under another
    /// server_msg_id is reported in [`Taken`], never taken as done. Errors
    /// are strings: they are shared by every waiting batch.
    async fn commit(&self, messages: Vec<Sequenced>) -> std::result::Result<Taken, String>;
    /// Bodies of `from..=to` of `conversation`, ascending; absent seqs are
    /// left out.
    async fn range(&self, conversation: &str, from: u64, to: u64) -> Result<Vec<(u64, Arc<str>)>>;
    /// Highest stored seq of each conversation (0 when it has none).
    async fn max_seqs(&self, conversations: &[Arc<str>]) -> Result<HashMap<Arc<str>, u64>>;
    /// The `limit` most recent stored messages, oldest first, as (sender,
    /// client_msg_id, ack info), for an in-memory resend index.
    async fn recent_sent(&self, _limit: usize) -> Result<Vec<(String, String, AckInfo)>> {
        Ok(Vec::new())
    }
    async fn close(&self) {}
}

/// Recent messages and the highest visible seq of each conversation: what
/// `pull` after a short absence and `sync` read first. Only ever holds
/// messages already in the history, so it never shows one that could be
/// lost; it may forget anything at any time (the history has it).
#[async_trait]
pub trait Hot: Send + Sync + 'static {
    /// Remember committed messages (each conversation's in seq order).
    async fn insert(&self, messages: &[&Sequenced]) -> Result<()>;
    /// `from..=to`, if the cache holds the whole range.
    async fn range(&self, conversation: &str, from: u64, to: u64) -> Option<Vec<(u64, Arc<str>)>>;
    /// The highest seq known here of each conversation it knows.
    async fn max_seqs(&self, conversations: &[Arc<str>]) -> HashMap<Arc<str>, u64>;
}

/// What a seq-assign task remembers of the conversations it met: the last
/// seq it gave each. Bounded: a conversation it forgets is treated as new
/// (its floor read from the history again), which is always safe.
pub type SeqMemory = lru::LruCache<Arc<str>, u64>;

/// Conversations a seq-assign task remembers by default.
pub const SEQ_MEMORY: usize = 100_000;

pub fn seq_memory(entries: usize) -> SeqMemory {
    lru::LruCache::new(std::num::NonZeroUsize::new(entries.max(1)).unwrap_or(std::num::NonZeroUsize::MIN))
}

/// Hands out seqs. Each seq-assign task owns the conversations of its
/// partition and passes its memory of the last seq it gave per conversation
/// (`last`), which the sequencer keeps current.
///
/// The history is the truth. A conversation the task meets for the first
/// time (after a start, a partition moving here, or being forgotten) starts
/// from the history's max, whatever a counter says: a counter behind it (a
/// Redis restored from an old snapshot, a failover to a lagging replica)
/// would hand out stored seqs, one ahead of it would leave a hole. Seqs
/// handed out but not yet stored when the task starts (still in a Kafka
/// topic) may then be handed out again; the history refuses the second
/// (`Taken`) and [`reassign`](Sequencer::reassign) gives it a new one.
#[async_trait]
pub trait Sequencer: Send + Sync + 'static {
    /// The seqs of `messages` (conversation, server_msg_id), in order. A
    /// message replayed with a server_msg_id that already has a seq gets
    /// that seq again.
    async fn assign(
        &self,
        last: &mut SeqMemory,
        messages: &[(Arc<str>, Arc<str>)],
    ) -> Result<Vec<u64>>;

    /// New seqs for messages of `conversation` whose seqs the history found
    /// taken: above `stored_max` (the history's max, read after the refusal)
    /// and above every seq handed out since; a replay of one of them then
    /// gets its new seq.
    async fn reassign(
        &self,
        conversation: &Arc<str>,
        server_msg_ids: &[Arc<str>],
        stored_max: u64,
    ) -> Result<Vec<u64>>;
}

/// Conversations of `messages` that `last` does not know, once each.
pub(crate) fn unknown_conversations(
    last: &SeqMemory,
    messages: &[(Arc<str>, Arc<str>)],
) -> Vec<Arc<str>> {
    let mut unknown: Vec<Arc<str>> = messages
        .iter()
        .map(|(c, _)| c.clone())
        .filter(|c| !last.contains(c))
        .collect();
    unknown.sort();
    unknown.dedup();
    unknown
}

/// Counters in this process (standalone), shared by every seq-assign task
/// and by `persist-mongo`'s reassignments. A conversation not met before
/// starts from the history's max.
pub struct LocalSequencer {
    history: Arc<dyn History>,
    /// Highest seq handed out per conversation, for reassignments (which
    /// come from another stage than the task that owns the conversation).
    given: std::sync::Mutex<SeqMemory>,
}

impl LocalSequencer {
    pub fn new(history: Arc<dyn History>) -> Self {
        LocalSequencer {
            history,
            given: std::sync::Mutex::new(seq_memory(SEQ_MEMORY)),
        }
    }

    fn given(&self) -> std::sync::MutexGuard<'_, SeqMemory> {
        match self.given.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

#[async_trait]
impl Sequencer for LocalSequencer {
    async fn assign(
        &self,
        last: &mut SeqMemory,
        messages: &[(Arc<str>, Arc<str>)],
    ) -> Result<Vec<u64>> {
        let unknown = unknown_conversations(last, messages);
        if !unknown.is_empty() {
            for (c, max) in self.history.max_seqs(&unknown).await? {
                last.put(c, max);
            }
        }
        let mut given = self.given();
        Ok(messages
            .iter()
            .map(|(c, _)| {
                // A reassignment may have gone past what this task gave.
                let floor = given.get(c).copied().unwrap_or(0);
                let n = last.get_or_insert_mut(c.clone(), || 0);
                *n = (*n).max(floor) + 1;
                given.put(c.clone(), *n);
                *n
            })
            .collect())
    }

    async fn reassign(
        &self,
        conversation: &Arc<str>,
        server_msg_ids: &[Arc<str>],
        stored_max: u64,
    ) -> Result<Vec<u64>> {
        let mut given = self.given();
        let n = given.get_or_insert_mut(conversation.clone(), || 0);
        *n = (*n).max(stored_max);
        Ok(server_msg_ids
            .iter()
            .map(|_| {
                *n += 1;
                *n
            })
            .collect())
    }
}

/// A user name or password made safe for the userinfo part of a server URL.
pub(crate) fn url_escape(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Max seqs for `sync`: the hot store first, the history for the rest.
pub async fn visible_max_seqs(
    hot: &dyn Hot,
    history: &dyn History,
    conversations: &[Arc<str>],
) -> Result<HashMap<Arc<str>, u64>> {
    let mut known = hot.max_seqs(conversations).await;
    let missing: Vec<Arc<str>> = conversations
        .iter()
        .filter(|c| !known.contains_key(*c))
        .cloned()
        .collect();
    if !missing.is_empty() {
        known.extend(history.max_seqs(&missing).await?);
    }
    Ok(known)
}
