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

pub mod dead_letters;
pub mod files;
pub mod mongo;
pub mod mysql;
pub mod redis;
pub mod sqlite;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::Result;
use crate::model::{AckInfo, Conversation, ImError, Sequenced};

pub use dead_letters::{DeadLetter, DeadLetters};
pub use files::{Files, LocalFiles, S3Files, S3Settings};
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

/// A member's place in a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Membership {
    pub role: Role,
    /// The first seq this member may read: that of the notification that
    /// added them. `None` while that notification is not stored yet (the
    /// member sees nothing of the group until then).
    pub min_seq: Option<u64>,
    /// Muted (may not send) until this time (ms); 0: not muted.
    pub muted_until: i64,
}

/// What a group is, besides its members.
#[derive(Debug, Clone, Default)]
pub struct GroupInfo {
    pub name: String,
    pub owner: String,
    pub notice: String,
    pub avatar_url: String,
    /// Only the owner and admins may send.
    pub muted: bool,
    /// Dismissed: nobody sends or changes members; members still read.
    pub dismissed: bool,
}

/// A group as the hot path sees it: a snapshot replaced on every change, so
/// readers never lock.
#[derive(Debug)]
pub struct GroupState {
    pub group_id: Arc<str>,
    pub name: String,
    pub owner: Arc<str>,
    pub notice: String,
    pub avatar_url: String,
    pub muted: bool,
    pub dismissed: bool,
    pub membership: HashMap<Arc<str>, Membership>,
    /// Members in join order; shared by every delivery of a group message.
    pub members: Arc<[Arc<str>]>,
    /// From this seq on every member may read (none is still waiting for
    /// the notification that added them): deliveries need no filtering.
    pub readable_by_all_from: Option<u64>,
}

impl GroupState {
    pub fn role_of(&self, user: &str) -> Option<Role> {
        self.membership.get(user).map(|m| m.role)
    }

    pub fn member(&self, user: &str) -> Option<&Membership> {
        self.membership.get(user)
    }

    /// Whether a member's first readable seq is not known yet (a
    /// notification adding them is on its way).
    pub fn has_pending(&self) -> bool {
        self.membership.values().any(|m| m.min_seq.is_none())
    }

    /// The members who may read seq `seq`, in join order (shared when all
    /// of them may).
    pub fn readers(&self, seq: u64) -> Arc<[Arc<str>]> {
        match self.readable_by_all_from {
            Some(from) if seq >= from => self.members.clone(),
            _ => self
                .members
                .iter()
                .filter(|u| self.can_read(u, seq))
                .cloned()
                .collect(),
        }
    }

    /// The newest first readable seq among the members: whoever joins
    /// later gets a larger one.
    pub fn newest_member_seq(&self) -> u64 {
        self.membership
            .values()
            .filter_map(|m| m.min_seq)
            .max()
            .unwrap_or(0)
    }

    /// Whether `user` may read seq `seq` of the group.
    pub fn can_read(&self, user: &str, seq: u64) -> bool {
        self.member(user)
            .and_then(|m| m.min_seq)
            .is_some_and(|min| seq >= min)
    }

    /// Rows: (user, role, min_seq or null, muted_until), in join order.
    pub(crate) fn from_rows(
        group_id: &str,
        info: GroupInfo,
        rows: impl IntoIterator<Item = (String, i64, Option<i64>, i64)>,
    ) -> GroupState {
        let mut membership = HashMap::new();
        let mut members = Vec::new();
        for (user, role, min_seq, muted_until) in rows {
            let u: Arc<str> = Arc::from(user);
            membership.insert(
                u.clone(),
                Membership {
                    role: Role::from_i64(role),
                    min_seq: min_seq.map(|s| s.max(1) as u64),
                    muted_until,
                },
            );
            members.push(u);
        }
        let readable_by_all_from = membership
            .values()
            .map(|m| m.min_seq)
            .try_fold(1, |acc, m| m.map(|m| acc.max(m)));
        GroupState {
            readable_by_all_from,
            group_id: group_id.into(),
            name: info.name,
            owner: info.owner.into(),
            notice: info.notice,
            avatar_url: info.avatar_url,
            muted: info.muted,
            dismissed: info.dismissed,
            membership,
            members: members.into(),
        }
    }
}

/// Changes to a group's info (only those given).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GroupChanges {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub avatar_url: Option<String>,
}

/// A user's public profile.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Profile {
    pub user_id: String,
    pub nickname: String,
    pub avatar_url: String,
}

/// Where a user's offline notifications go, per platform.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Device {
    pub platform: u8,
    pub push_token: String,
    pub provider: String,
}

/// A file a user declared with `POST /files`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRow {
    pub file_id: String,
    pub owner: String,
    pub name: String,
    pub size: u64,
    pub content_type: String,
    pub created_at: i64,
    /// Its bytes arrived in full (seen by imflow, or checked in the object
    /// store when first sent).
    pub complete: bool,
}

/// A device an offline notification may go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushDevice {
    pub user_id: String,
    pub device: Device,
    /// The user muted the conversation asked about: no notification.
    pub muted: bool,
}

/// Users per query when asking for many users' devices.
pub(crate) const USERS_PER_QUERY: usize = 500;

/// `SELECT` of the devices of `n` users (bound after the conversation id),
/// each with its user's mute of that conversation; `platform` and `muted`
/// come as 64-bit integers in SQLite and MySQL alike.
pub(crate) fn push_devices_sql(n: usize) -> String {
    format!(
        "SELECT d.user_id, CAST(d.platform AS SIGNED), d.push_token, d.provider, \
         CAST(COALESCE(uc.muted, 0) AS SIGNED) FROM devices d \
         LEFT JOIN user_conversations uc ON uc.user_id = d.user_id AND uc.conversation_id = ? \
         WHERE d.user_id IN ({}) ORDER BY d.user_id, d.platform",
        vec!["?"; n].join(", ")
    )
}

/// What a user keeps per conversation, for the conversation list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationRow {
    pub conversation_id: String,
    pub read_seq: u64,
    /// The first seq the user may read (1 but for members added later).
    pub min_seq: u64,
    pub pinned: bool,
    pub muted: bool,
    /// When the user last read or changed its settings (ms; 0: never).
    pub changed_at: i64,
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

/// One conversation a user takes part in, for `sync` (PROTOCOL v1 fields
/// first, then v2's).
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ConversationState {
    pub conversation_id: String,
    pub max_seq: u64,
    pub read_seq: u64,
    pub min_seq: u64,
    pub unread: u64,
    /// The newest message the user may read; null when there is none.
    #[schema(value_type = Option<crate::model::Message>)]
    pub last_message: Option<Box<serde_json::value::RawValue>>,
    pub pinned: bool,
    pub muted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
}

/// Users, groups and what users keep per conversation.
#[async_trait]
pub trait Directory: Send + Sync + 'static {
    /// Store `value` under `key` unless it has one; returns the value in force.
    async fn setting_or_insert(&self, key: &str, value: &str) -> Result<String>;

    async fn user_exists(&self, user: &str) -> Result<bool>;
    /// Register users; an existing user keeps everything but a new nickname.
    async fn register_users(&self, users: &[(String, Option<String>)]) -> Result<usize>;
    async fn profile(&self, user: &str) -> Result<Option<Profile>>;
    async fn update_profile(
        &self,
        user: &str,
        nickname: Option<&str>,
        avatar_url: Option<&str>,
    ) -> Result<()>;

    /// The generation tokens of `user` on `platform` must carry (logout
    /// bumps it, revoking every older token).
    async fn token_generation(&self, user: &str, platform: u8) -> Result<u64>;
    async fn bump_generation(&self, user: &str, platforms: &[u8]) -> Result<()>;

    /// `user` blocks (or no longer blocks) `other`'s single-chat messages.
    async fn set_block(&self, user: &str, other: &str, blocked: bool) -> Result<()>;
    async fn blocks_of(&self, user: &str) -> Result<Vec<String>>;
    /// Whether `blocker` blocks `sender` (asked on every single-chat send).
    async fn is_blocked(&self, blocker: &str, sender: &str) -> Result<bool>;
    async fn set_device(&self, user: &str, device: &Device) -> Result<()>;
    async fn devices_of(&self, user: &str) -> Result<Vec<Device>>;
    /// The devices of those of `users` who registered one, each with
    /// whether its user muted `conversation_id` (offline notifications).
    async fn push_devices(
        &self,
        conversation_id: &str,
        users: &[Arc<str>],
    ) -> Result<Vec<PushDevice>>;
    async fn create_file(&self, file: &FileRow) -> Result<()>;
    async fn file(&self, file_id: &str) -> Result<Option<FileRow>>;
    async fn complete_file(&self, file_id: &str) -> Result<()>;
    /// `file_id` was sent in `conversation_id` (in a group, when its
    /// members' newest first readable seq was `members_to`): its readers
    /// may download it.
    async fn link_file(&self, file_id: &str, conversation_id: &str, members_to: u64) -> Result<()>;
    /// The conversations `file_id` was sent in, with their `members_to`.
    async fn file_conversations(&self, file_id: &str) -> Result<Vec<(String, u64)>>;
    /// The message that carried `file_id` in `conversation_id` was revoked.
    async fn unlink_file(&self, file_id: &str, conversation_id: &str) -> Result<()>;
    /// When `user` was last online (ms), 0 if never.
    async fn last_seen(&self, user: &str) -> Result<i64>;
    async fn set_last_seen(&self, users: &[(Arc<str>, i64)]) -> Result<()>;

    async fn group(&self, group_id: &str) -> Result<Option<Arc<GroupState>>>;
    /// The group as stored now, bypassing any cache (a snapshot with a
    /// member whose first readable seq is not known yet is re-read).
    async fn group_fresh(&self, group_id: &str) -> Result<Option<Arc<GroupState>>>;
    async fn create_group(
        &self,
        group_id: &str,
        name: &str,
        owner: &str,
        members: &[String],
    ) -> Result<()>;
    /// Add members (their first readable seq unknown until the
    /// notification is stored); returns the users the notification must
    /// name: those new to the group, and any earlier ones still waiting
    /// for theirs.
    async fn add_members(&self, group_id: &str, users: &[String]) -> Result<Vec<String>>;
    async fn remove_member(&self, group_id: &str, user: &str) -> Result<bool>;
    async fn set_role(&self, group_id: &str, user: &str, role: Role) -> Result<()>;
    async fn update_group(&self, group_id: &str, changes: &GroupChanges) -> Result<()>;
    async fn set_group_muted(&self, group_id: &str, muted: bool) -> Result<()>;
    async fn set_member_muted(&self, group_id: &str, user: &str, until: i64) -> Result<()>;
    /// `to` becomes the owner, `from` an admin.
    async fn transfer_group(&self, group_id: &str, from: &str, to: &str) -> Result<()>;
    async fn dismiss_group(&self, group_id: &str) -> Result<()>;
    /// The notification adding `users` is stored at `seq`: they read from
    /// there (only those still waiting; a later re-add changes nothing).
    async fn set_min_seq(&self, group_id: &str, users: &[String], seq: u64) -> Result<()>;
    /// The groups `user` is in: (group_id, name, role).
    async fn groups_of(&self, user: &str) -> Result<Vec<(String, String, Role)>>;

    /// Every conversation `user` takes part in (single chats that have a
    /// message, and the user's groups), with what the user keeps there.
    async fn conversations_of(&self, user: &str) -> Result<Vec<ConversationRow>>;
    /// Single chats whose first message is stored: both users now see them.
    async fn open_single_chats(&self, conversations: &[Arc<str>]) -> Result<()>;
    /// Raise the read seq of `user` in `conversation` to `seq` (never
    /// lowers it). Returns the read seq in force.
    async fn set_read(&self, user: &str, conversation: &str, seq: u64) -> Result<u64>;
    async fn set_conversation_settings(
        &self,
        user: &str,
        conversation: &str,
        pinned: Option<bool>,
        muted: Option<bool>,
    ) -> Result<()>;

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
    /// are strings: they are shared by every waiting batch. An error may
    /// come after part of the batch was stored; committing the same batch
    /// again finds those as replays.
    async fn commit(&self, messages: Vec<Sequenced>) -> std::result::Result<Taken, String>;
    /// Bodies of `from..=to` of `conversation`, ascending; absent seqs are
    /// left out.
    async fn range(&self, conversation: &str, from: u64, to: u64) -> Result<Vec<(u64, Arc<str>)>>;
    /// Highest stored seq of each conversation (0 when it has none).
    async fn max_seqs(&self, conversations: &[Arc<str>]) -> Result<HashMap<Arc<str>, u64>>;
    /// The last stored message of each conversation that has one: (seq,
    /// body). One query for all of them.
    async fn last_messages(
        &self,
        conversations: &[Arc<str>],
    ) -> Result<HashMap<Arc<str>, (u64, Arc<str>)>>;
    /// How many messages `sender` sent in each conversation after the
    /// given seq (for unread counts). One query for all of them.
    async fn sent_after(
        &self,
        sender: &str,
        after: &[(Arc<str>, u64)],
    ) -> Result<HashMap<Arc<str>, u64>>;
    /// Replace the stored body of a message if it is still `old` (a revoke
    /// deletes its content); whether it was replaced. Two revokes racing
    /// for one message: one wins.
    async fn replace_if(&self, conversation: &str, seq: u64, old: &str, new: &str) -> Result<bool>;
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
    /// The last message known here of each conversation it knows.
    async fn last(&self, conversations: &[Arc<str>]) -> HashMap<Arc<str>, (u64, Arc<str>)>;
    /// Replace a cached body (a revoke); nothing if it is not cached.
    async fn replace(&self, conversation: &str, seq: u64, body: &Arc<str>) -> Result<()>;
}

/// What a seq-assign task remembers of the conversations it met: the last
/// seq it gave each. Bounded: a conversation it forgets is treated as new
/// (its floor read from the history again), which is always safe.
pub type SeqMemory = lru::LruCache<Arc<str>, u64>;

/// Conversations a seq-assign task remembers by default.
pub const SEQ_MEMORY: usize = 100_000;

pub fn seq_memory(entries: usize) -> SeqMemory {
    // Bounded but not preallocated (`LruCache::new` would be): a table
    // sized for the bound is faulted in by the first burst of new
    // conversations, a pause on a fresh server; this one grows as they come.
    let mut memory = lru::LruCache::new(std::num::NonZeroUsize::MIN);
    memory
        .resize(std::num::NonZeroUsize::new(entries.max(1)).unwrap_or(std::num::NonZeroUsize::MIN));
    memory
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
/// handed out and not yet stored (still in a Kafka topic, after a crash or
/// while a partition moves) are the exception: a sequencer that knows them
/// starts above them, so they are not handed out twice and nothing is
/// reordered. One it does not know is handed out again; the history refuses
/// the second (`Taken`) and [`reassign`](Sequencer::reassign) gives it a new
/// one (after the seqs in flight, so it is stored and pushed after them).
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
    /// taken (`taken`: server_msg_id and the seq it had): above
    /// `stored_max` (the history's max, read after the refusal) and above
    /// every seq handed out since; a replay of one of them then gets its
    /// new seq. A message another copy of which already got a new seq
    /// (replayed twice across a rebalance) gets that one again.
    async fn reassign(
        &self,
        conversation: &Arc<str>,
        taken: &[(Arc<str>, u64)],
        stored_max: u64,
    ) -> Result<Vec<u64>>;

    /// The history now holds each conversation's messages up to the given
    /// seq (the highest of a committed batch): seqs up to it are no longer
    /// in flight. Only bookkeeping: forgetting it is harmless, since a
    /// seq at or below the history's max never counts as in flight.
    async fn stored(&self, _up_to: &[(Arc<str>, u64)]) -> Result<()> {
        Ok(())
    }
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
        taken: &[(Arc<str>, u64)],
        stored_max: u64,
    ) -> Result<Vec<u64>> {
        // One process owns every copy here (its resend index drops a
        // repeat before it gets a seq), so each needs a fresh seq.
        let mut given = self.given();
        let n = given.get_or_insert_mut(conversation.clone(), || 0);
        *n = (*n).max(stored_max);
        Ok(taken
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

/// The (user, conversation) rows that record new single chats in a
/// user's list: two per single chat of `conversations`, none for groups.
pub(crate) fn single_chat_rows(conversations: &[Arc<str>]) -> Vec<(Arc<str>, &str)> {
    conversations
        .iter()
        .filter_map(|c| match crate::model::Conversation::parse(c) {
            Some(crate::model::Conversation::Single(a, b)) => Some([(a, &**c), (b, &**c)]),
            _ => None,
        })
        .flatten()
        .collect()
}

/// Max seqs for `sync`: the hot store first, the history for the rest.
pub async fn visible_max_seqs(
    hot: &dyn Hot,
    history: &dyn History,
    conversations: &[Arc<str>],
) -> Result<HashMap<Arc<str>, u64>> {
    let known = hot.max_seqs(conversations).await;
    hot_first(known, conversations, |missing| async move {
        history.max_seqs(&missing).await
    })
    .await
}

/// The last message of each conversation: the hot store first, the history
/// for the rest (one query).
pub async fn last_messages(
    hot: &dyn Hot,
    history: &dyn History,
    conversations: &[Arc<str>],
) -> Result<HashMap<Arc<str>, (u64, Arc<str>)>> {
    let known = hot.last(conversations).await;
    hot_first(known, conversations, |missing| async move {
        history.last_messages(&missing).await
    })
    .await
}

/// What the hot store `known`, completed by one history read (`rest`) for
/// the conversations it does not know.
async fn hot_first<V, F, Fut>(
    mut known: HashMap<Arc<str>, V>,
    conversations: &[Arc<str>],
    rest: F,
) -> Result<HashMap<Arc<str>, V>>
where
    F: FnOnce(Vec<Arc<str>>) -> Fut,
    Fut: std::future::Future<Output = Result<HashMap<Arc<str>, V>>>,
{
    let missing: Vec<Arc<str>> = conversations
        .iter()
        .filter(|c| !known.contains_key(*c))
        .cloned()
        .collect();
    if !missing.is_empty() {
        known.extend(rest(missing).await?);
    }
    Ok(known)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_single_chat_is_recorded_for_both_users_and_a_group_not_at_all() {
        let convs: Vec<Arc<str>> = vec![
            crate::model::Conversation::single("bob", "alice")
                .id()
                .into(),
            crate::model::Conversation::Group("g1".into()).id().into(),
        ];
        let rows = single_chat_rows(&convs);
        let users: Vec<&str> = rows.iter().map(|(u, _)| &**u).collect();
        assert_eq!(users, ["alice", "bob"]);
        assert!(rows.iter().all(|(_, c)| *c == &*convs[0]));
    }

    #[test]
    fn seq_memory_keeps_its_bound_while_growing_from_empty() {
        let mut memory = seq_memory(3);
        assert_eq!(memory.cap().get(), 3);
        for (i, c) in ["a", "b", "c", "d"].into_iter().enumerate() {
            memory.put(Arc::from(c), i as u64);
        }
        assert_eq!(memory.len(), 3);
        assert!(!memory.contains("a"), "the least recent is forgotten");
        assert_eq!(memory.get("d"), Some(&3));
    }
}
