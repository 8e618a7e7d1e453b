//! The operations of PROTOCOL.md, shared by the WebSocket gateway and the
//! REST API, so both doors apply exactly the same rules.

use std::collections::HashMap;
use std::sync::Arc;

use imflow_stages::model::{
    check_id, notification, now_ms, revoked_body, valid_platform, Conversation, ErrorCode, ImError,
    Notice, SendRequest, StoredHead, Target, MAX_PULL_SPAN,
};
use imflow_stages::store::{
    self, files, ConversationState, Device, FileRow, GroupChanges, GroupState, LocalFiles, Profile,
    Role,
};
use imflow_stages::{Door, PendingAck, Services};
use serde::Deserialize;
use serde_json::json;

use crate::auth::Auth;
use crate::cluster::{DoorLink, RemoteIngest};
use crate::connections::{Connections, Outbound};

/// Everything a door needs.
pub struct Api {
    pub services: Services,
    pub auth: Auth,
    pub conns: Arc<Connections>,
    /// The door of this process's own pipeline (standalone): what the
    /// running topology's source provided as `roles::INGEST_DOOR`, swapped
    /// by a live reload.
    pub ingest: Door,
    /// Set when this door is its own process in a cluster: sends go to the
    /// ingest processes, kicks and per-user frames to the other doors.
    pub cluster: Option<ClusterDoor>,
    pub rules: Rules,
}

/// A declared file and where to PUT its bytes.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct NewFile {
    pub file_id: String,
    /// Absolute, or a path on this API's origin.
    pub upload_url: String,
    /// When `upload_url` stops working (ms).
    pub expires_at: i64,
}

/// The configurable rules of PROTOCOL v2.
#[derive(Debug, Clone)]
pub struct Rules {
    /// How long a sender may revoke their own message.
    pub revoke_window_secs: u64,
    /// Most members a group may have.
    pub max_group_members: usize,
    /// Largest file `POST /files` accepts.
    pub max_file_bytes: u64,
    /// How long an upload or download URL works.
    pub file_url_ttl: std::time::Duration,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            revoke_window_secs: 120,
            max_group_members: 100_000,
            max_file_bytes: 100 * 1024 * 1024,
            file_url_ttl: std::time::Duration::from_secs(900),
        }
    }
}

/// Most user ids one group request names.
pub const MAX_USER_IDS: usize = 1000;
/// Longest nickname, group name and notice (characters).
const MAX_NICKNAME: usize = 64;
const MAX_GROUP_NAME: usize = 256;
const MAX_NOTICE: usize = 4096;
const MAX_URL: usize = 1024;

/// A `sync` request's options (PROTOCOL v2).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct SyncOptions {
    pub since: Option<i64>,
    pub limit: Option<u64>,
}

/// What `sync` answers.
pub struct SyncReply {
    pub conversations: Vec<ConversationState>,
    pub more: bool,
}

/// A group as its members see it (GET /groups/{group_id}).
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct GroupInfo {
    pub group_id: String,
    pub name: String,
    pub notice: String,
    pub avatar_url: String,
    pub owner: String,
    pub member_count: usize,
    pub muted: bool,
    pub dismissed: bool,
}

/// One group of the caller's (GET /users/me/groups).
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct MyGroup {
    pub group_id: String,
    pub name: String,
    /// `owner`, `admin` or `member`.
    pub role: &'static str,
}

/// A user's presence.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct PresenceState {
    pub online: bool,
    pub platforms: Vec<u8>,
    pub last_seen: i64,
}

fn too_long(what: &str, v: &str, max: usize) -> Result<(), ImError> {
    if v.chars().count() > max {
        Err(ImError::bad_request(format!(
            "{what} may be at most {max} characters"
        )))
    } else {
        Ok(())
    }
}

fn dismissed(group_id: &str) -> ImError {
    ImError::new(
        ErrorCode::Dismissed,
        format!("group {group_id} was dismissed"),
    )
}

pub struct ClusterDoor {
    pub ingest: RemoteIngest,
    pub link: Arc<DoorLink>,
}

/// Most users one register call takes.
pub const MAX_REGISTER: usize = 1000;

impl Api {
    pub async fn send(&self, user: &Arc<str>, req: SendRequest) -> Result<PendingAck, ImError> {
        match &self.cluster {
            Some(c) => c.ingest.send(user, req).await,
            None => self.ingest.send(user, req).await,
        }
    }

    /// Write a server notification into a conversation and wait until it
    /// is durable (the operation that caused it answers only then).
    pub async fn notify(
        &self,
        sender: &str,
        target: Target,
        content_type: i64,
        content: serde_json::Value,
    ) -> Result<(), ImError> {
        let sender: Arc<str> = Arc::from(sender);
        let notice = Notice {
            target,
            content_type,
            content,
        };
        let pending = match &self.cluster {
            Some(c) => c.ingest.notify(&sender, notice).await?,
            None => self.ingest.notify(&sender, notice).await?,
        };
        pending.wait().await.map(|_| ())
    }

    /// The conversation list (PROTOCOL v2 "Conversation list"): every
    /// conversation of `user` with its unread count and last message,
    /// pinned first, then by the last message's time. A handful of queries
    /// whatever the number of conversations.
    pub async fn sync(&self, user: &str, opts: SyncOptions) -> Result<SyncReply, ImError> {
        let limit = match opts.limit {
            None => 100,
            Some(n @ 1..=1000) => n as usize,
            Some(_) => return Err(ImError::bad_request("limit must be 1 to 1000")),
        };
        let rows = self.services.directory.conversations_of(user).await?;
        let ids: Vec<Arc<str>> = rows
            .iter()
            .map(|r| Arc::from(r.conversation_id.as_str()))
            .collect();
        let last = store::last_messages(&*self.services.hot, &*self.services.history, &ids).await?;
        // Unread: messages after the read seq (and the first readable one)
        // not sent by the user. Only conversations with any count it.
        let floors: Vec<(Arc<str>, u64)> = rows
            .iter()
            .zip(&ids)
            .filter_map(|(r, id)| {
                let floor = r.read_seq.max(r.min_seq - 1);
                let max = last.get(id).map(|(s, _)| *s).unwrap_or(0);
                (max > floor).then(|| (id.clone(), floor))
            })
            .collect();
        let own = self.services.history.sent_after(user, &floors).await?;
        let floor_of: HashMap<&Arc<str>, u64> = floors.iter().map(|(c, f)| (c, *f)).collect();
        struct Entry {
            state: ConversationState,
            time: Option<i64>,
            changed_at: i64,
        }
        let mut entries: Vec<Entry> = rows
            .into_iter()
            .zip(&ids)
            .map(|(r, id)| {
                let (max_seq, body) = match last.get(id) {
                    Some((s, b)) => (*s, Some(b.clone())),
                    None => (0, None),
                };
                let unread = floor_of
                    .get(id)
                    .map(|f| (max_seq - f).saturating_sub(own.get(id).copied().unwrap_or(0)))
                    .unwrap_or(0);
                let visible = body.filter(|_| max_seq >= r.min_seq);
                let time = visible
                    .as_ref()
                    .and_then(|b| StoredHead::of(b))
                    .map(|h| h.send_time);
                let last_message = visible
                    .and_then(|b| serde_json::value::RawValue::from_string(b.to_string()).ok());
                let (group_id, peer) = match Conversation::parse(&r.conversation_id) {
                    Some(Conversation::Group(g)) => (Some(g.to_string()), None),
                    Some(Conversation::Single(a, b)) => {
                        (None, Some(if &*a == user { b } else { a }.to_string()))
                    }
                    None => (None, None),
                };
                Entry {
                    time,
                    changed_at: r.changed_at,
                    state: ConversationState {
                        conversation_id: r.conversation_id,
                        max_seq,
                        read_seq: r.read_seq,
                        min_seq: r.min_seq,
                        unread,
                        last_message,
                        pinned: r.pinned,
                        muted: r.muted,
                        group_id,
                        peer,
                    },
                }
            })
            .collect();
        if let Some(since) = opts.since {
            entries.retain(|e| e.time.is_some_and(|t| t >= since) || e.changed_at >= since);
        }
        entries.sort_by(|a, b| {
            b.state
                .pinned
                .cmp(&a.state.pinned)
                .then_with(|| b.time.is_some().cmp(&a.time.is_some()))
                .then_with(|| b.time.cmp(&a.time))
                .then_with(|| a.state.conversation_id.cmp(&b.state.conversation_id))
        });
        let more = entries.len() > limit;
        entries.truncate(limit);
        Ok(SyncReply {
            conversations: entries.into_iter().map(|e| e.state).collect(),
            more,
        })
    }

    /// Authorise and parse a conversation id for `user`.
    async fn participant(
        &self,
        user: &str,
        conversation_id: &str,
    ) -> Result<Conversation, ImError> {
        let conv = Conversation::parse(conversation_id).ok_or_else(|| {
            ImError::bad_request(format!("`{conversation_id}` is not a conversation id"))
        })?;
        if let Conversation::Group(g) = &conv {
            if self.services.directory.group(g).await?.is_none() {
                return Err(ImError::not_found(format!("no group {g}")));
            }
        }
        if !store::is_participant(&*self.services.directory, user, &conv).await? {
            return Err(ImError::forbidden(format!(
                "{user} does not take part in {conversation_id}"
            )));
        }
        if let Conversation::Single(a, b) = &conv {
            // Nothing is kept for a chat with nobody: a read there would
            // otherwise put it in the caller's conversation list.
            let peer = if &**a == user { b } else { a };
            if !self.services.directory.user_exists(peer).await? {
                return Err(ImError::not_found(format!("no user {peer}")));
            }
        }
        Ok(conv)
    }

    /// Message bodies of `from..=to`, ascending; absent seqs are left out.
    pub async fn pull(
        &self,
        user: &str,
        conversation_id: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<Arc<str>>, ImError> {
        if from > to {
            return Err(ImError::bad_request(
                "from_seq must not be greater than to_seq",
            ));
        }
        if to - from > MAX_PULL_SPAN {
            return Err(ImError::bad_request(format!(
                "from_seq and to_seq may be at most {MAX_PULL_SPAN} apart"
            )));
        }
        let conv = self.participant(user, conversation_id).await?;
        let mut from = from.max(1);
        if let Conversation::Group(g) = &conv {
            // A member reads from the notification that added them.
            let first = self
                .services
                .directory
                .group(g)
                .await?
                .and_then(|s| s.member(user).map(|m| m.min_seq));
            match first.flatten() {
                Some(min) => from = from.max(min),
                None => return Ok(Vec::new()),
            }
        }
        if from > to {
            return Ok(Vec::new());
        }
        if let Some(hit) = self.services.hot.range(conversation_id, from, to).await {
            return Ok(hit.into_iter().map(|(_, b)| b).collect());
        }
        Ok(self
            .services
            .history
            .range(conversation_id, from, to)
            .await?
            .into_iter()
            .map(|(_, b)| b)
            .collect())
    }

    /// Mark read and tell the user's other connections.
    pub async fn read(
        &self,
        user: &str,
        conversation_id: &str,
        seq: u64,
        from_conn: Option<u64>,
    ) -> Result<u64, ImError> {
        self.participant(user, conversation_id).await?;
        // Never past the last message.
        let id: Arc<str> = Arc::from(conversation_id);
        let max = store::visible_max_seqs(
            &*self.services.hot,
            &*self.services.history,
            std::slice::from_ref(&id),
        )
        .await?;
        let seq = seq.min(max.get(&id).copied().unwrap_or(0));
        let read_seq = self
            .services
            .directory
            .set_read(user, conversation_id, seq)
            .await?;
        let frame =
            serde_json::json!({"op": "read", "conversation_id": conversation_id, "seq": read_seq});
        self.frame_to(&[user], &frame.to_string(), from_conn).await;
        // A single chat's peer learns how far it was read (PROTOCOL v2).
        if let Some(Conversation::Single(a, b)) = Conversation::parse(conversation_id) {
            let peer = if &*a == user { b } else { a };
            if &*peer != user {
                let receipt = json!({"op": "receipt", "conversation_id": conversation_id, "user_id": user, "seq": read_seq});
                self.frame_to(&[&peer], &receipt.to_string(), None).await;
            }
        }
        Ok(read_seq)
    }

    /// Queue `frame` on every connection of `users` (but `except`, a
    /// connection of this door), on every gateway.
    pub async fn frame_to(&self, users: &[&str], frame: &str, except: Option<u64>) {
        let out = Outbound::Frame(frame.into());
        for u in users {
            self.conns.send_to_user(u, except, &out);
        }
        if let Some(c) = &self.cluster {
            c.link.frame_to(users, frame).await;
        }
    }

    /// PUT /conversations/{id}/settings.
    pub async fn conversation_settings(
        &self,
        user: &str,
        conversation_id: &str,
        pinned: Option<bool>,
        muted: Option<bool>,
    ) -> Result<(), ImError> {
        self.participant(user, conversation_id).await?;
        Ok(self
            .services
            .directory
            .set_conversation_settings(user, conversation_id, pinned, muted)
            .await?)
    }

    /// Revoke the message at `seq` (PROTOCOL v2 "Revoke"): its content is
    /// deleted from the history and the hot cache before a 1100
    /// notification is written; the caller hears once that is durable.
    pub async fn revoke(&self, user: &str, conversation_id: &str, seq: u64) -> Result<(), ImError> {
        let conv = self.participant(user, conversation_id).await?;
        let history = &self.services.history;
        let Some((_, body)) = history
            .range(conversation_id, seq, seq)
            .await?
            .into_iter()
            .next()
        else {
            return Err(ImError::not_found(format!(
                "no message {seq} in {conversation_id}"
            )));
        };
        let head = StoredHead::of(&body)
            .ok_or_else(|| ImError::unavailable("a stored message could not be read"))?;
        let (target, admin) = match &conv {
            Conversation::Group(g) => {
                let state = self.group(g).await?;
                if !state.can_read(user, seq) {
                    return Err(ImError::not_found(format!(
                        "no message {seq} in {conversation_id}"
                    )));
                }
                let admin = matches!(state.role_of(user), Some(Role::Owner | Role::Admin));
                (Target::Group(g.clone()), admin)
            }
            Conversation::Single(a, b) => {
                let peer = if &**a == user { b.clone() } else { a.clone() };
                (Target::User(peer), false)
            }
        };
        // Who may, first: a stranger learns nothing of the message's state.
        if !admin && head.sender != user {
            return Err(ImError::forbidden(
                "only the sender, or a group's owner or admins, may revoke a message",
            ));
        }
        if notification::is(head.content_type) {
            return Err(ImError::conflict("a notification cannot be revoked"));
        }
        if head.revoked {
            return Err(ImError::conflict("the message is already revoked"));
        }
        if !admin {
            let window = self.rules.revoke_window_secs as i64 * 1000;
            if now_ms() - head.send_time >= window {
                return Err(ImError::new(
                    ErrorCode::TooLate,
                    format!(
                        "a message may be revoked within {} s of its sending",
                        self.rules.revoke_window_secs
                    ),
                ));
            }
        }
        let revoked = revoked_body(&body)
            .ok_or_else(|| ImError::unavailable("a stored message could not be read"))?;
        if !history
            .replace_if(conversation_id, seq, &body, &revoked)
            .await?
        {
            return Err(ImError::conflict("the message is already revoked"));
        }
        let revoked: Arc<str> = revoked.into();
        self.services
            .hot
            .replace(conversation_id, seq, &revoked)
            .await?;
        // Its file goes with its content: unreadable through this
        // conversation, and its bytes deleted once no conversation has it.
        if let Some(file) = imflow_stages::model::file_in_body(head.content_type, &body) {
            let directory = &self.services.directory;
            directory
                .unlink_file(&file.file_id, conversation_id)
                .await?;
            if directory
                .file_conversations(&file.file_id)
                .await?
                .is_empty()
            {
                self.services.files.delete(&file.file_id).await?;
            }
        }
        self.notify(
            user,
            target,
            notification::MESSAGE_REVOKED,
            json!({"seq": seq, "server_msg_id": head.server_msg_id}),
        )
        .await
    }

    /// Forward `typing` to the other participants' connections (not the
    /// typist's own): ephemeral, never stored.
    pub async fn typing(&self, user: &str, conversation_id: &str) -> Result<(), ImError> {
        let conv = self.participant(user, conversation_id).await?;
        let others: Vec<Arc<str>> = match &conv {
            Conversation::Single(a, b) => [a, b]
                .into_iter()
                .filter(|u| &***u != user)
                .cloned()
                .collect(),
            Conversation::Group(g) => {
                let state = self.group(g).await?;
                state
                    .members
                    .iter()
                    .filter(|u| {
                        &***u != user && state.member(u).is_some_and(|m| m.min_seq.is_some())
                    })
                    .cloned()
                    .collect()
            }
        };
        let frame = json!({"op": "typing", "conversation_id": conversation_id, "user_id": user});
        let users: Vec<&str> = others.iter().map(|u| &**u).collect();
        self.frame_to(&users, &frame.to_string(), None).await;
        Ok(())
    }

    /// Whether `user` is online, on which platforms, and when last seen.
    pub async fn presence(&self, user: &str) -> Result<PresenceState, ImError> {
        let platforms = match &self.cluster {
            Some(c) => c.link.platforms(user).await?,
            None => self.conns.platforms(user),
        };
        let online = !platforms.is_empty();
        let last_seen = if online {
            now_ms()
        } else {
            self.services.directory.last_seen(user).await?
        };
        Ok(PresenceState {
            online,
            platforms,
            last_seen,
        })
    }

    /// `subscribe_presence`: the current state of each of `user_ids`; the
    /// connection then hears when one comes online or goes fully offline.
    pub async fn subscribe_presence(
        &self,
        conn: &Arc<crate::connections::ConnHandle>,
        user_ids: Vec<String>,
    ) -> Result<Vec<serde_json::Value>, ImError> {
        if user_ids.len() > MAX_USER_IDS {
            return Err(ImError::bad_request(format!(
                "at most {MAX_USER_IDS} user_ids"
            )));
        }
        for u in &user_ids {
            check_id("user_ids", u)?;
        }
        let mut ids = user_ids;
        ids.dedup();
        let states = futures::future::join_all(ids.iter().map(|u| self.presence(u))).await;
        let mut out = Vec::with_capacity(ids.len());
        let mut watched = Vec::with_capacity(ids.len());
        for (u, st) in ids.iter().zip(states) {
            let st = st?;
            watched.push((Arc::from(u.as_str()), st.online));
            out.push(json!({"user_id": u, "online": st.online, "platforms": st.platforms}));
        }
        self.conns.watch(conn, watched);
        Ok(out)
    }

    /// GET /users/{user_id}/presence: the user must exist.
    pub async fn user_presence(&self, user: &str) -> Result<PresenceState, ImError> {
        check_id("user_id", user)?;
        if !self.services.directory.user_exists(user).await? {
            return Err(ImError::not_found(format!("no user {user}")));
        }
        self.presence(user).await
    }

    // ---- users ----

    pub async fn profile(&self, user: &str) -> Result<Profile, ImError> {
        check_id("user_id", user)?;
        self.services
            .directory
            .profile(user)
            .await?
            .ok_or_else(|| ImError::not_found(format!("no user {user}")))
    }

    pub async fn update_profile(
        &self,
        user: &str,
        nickname: Option<String>,
        avatar_url: Option<String>,
    ) -> Result<(), ImError> {
        if let Some(n) = &nickname {
            too_long("nickname", n, MAX_NICKNAME)?;
        }
        if let Some(a) = &avatar_url {
            too_long("avatar_url", a, MAX_URL)?;
        }
        Ok(self
            .services
            .directory
            .update_profile(user, nickname.as_deref(), avatar_url.as_deref())
            .await?)
    }

    pub async fn block(&self, user: &str, other: &str, blocked: bool) -> Result<(), ImError> {
        check_id("user_id", other)?;
        if other == user {
            return Err(ImError::bad_request("a user cannot block themselves"));
        }
        if !self.services.directory.user_exists(other).await? {
            return Err(ImError::not_found(format!("no user {other}")));
        }
        Ok(self
            .services
            .directory
            .set_block(user, other, blocked)
            .await?)
    }

    pub async fn blocks(&self, user: &str) -> Result<Vec<String>, ImError> {
        Ok(self.services.directory.blocks_of(user).await?)
    }

    pub async fn set_device(
        &self,
        user: &str,
        platform: i64,
        push_token: String,
        provider: String,
    ) -> Result<(), ImError> {
        if !valid_platform(platform) {
            return Err(ImError::bad_request("platform must be 1 to 9"));
        }
        if push_token.is_empty() || push_token.len() > 4096 {
            return Err(ImError::bad_request("push_token must be 1 to 4096 bytes"));
        }
        if !imflow_stages::model::valid_provider(&provider) {
            return Err(ImError::bad_request(
                "provider must be a name such as fcm, apns or webhook",
            ));
        }
        Ok(self
            .services
            .directory
            .set_device(
                user,
                &Device {
                    platform: platform as u8,
                    push_token,
                    provider,
                },
            )
            .await?)
    }

    // ---- files ----

    /// `POST /files`: declare a file; returns where to PUT its bytes.
    pub async fn create_file(
        &self,
        user: &str,
        name: String,
        size: u64,
        content_type: String,
    ) -> Result<NewFile, ImError> {
        if name.is_empty() || name.chars().count() > 255 || name.chars().any(char::is_control) {
            return Err(ImError::bad_request(
                "name must be 1 to 255 characters, none of them control characters",
            ));
        }
        if content_type.is_empty()
            || content_type.len() > 255
            || !content_type
                .bytes()
                .all(|b| b.is_ascii_graphic() || b == b' ')
        {
            return Err(ImError::bad_request(
                "content_type must be a MIME type such as image/png (1 to 255 printable ASCII characters)",
            ));
        }
        if size == 0 {
            return Err(ImError::bad_request("size must be at least 1 byte"));
        }
        if size > self.rules.max_file_bytes {
            return Err(ImError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "size {size} is over this server's max_file_bytes ({})",
                    self.rules.max_file_bytes
                ),
            ));
        }
        let file = FileRow {
            file_id: files::new_file_id(),
            owner: user.to_string(),
            name,
            size,
            content_type,
            created_at: now_ms(),
            complete: false,
        };
        let ttl = self.rules.file_url_ttl;
        let upload_url = self.services.files.upload_url(&file.file_id, ttl).await?;
        self.services.directory.create_file(&file).await?;
        Ok(NewFile {
            file_id: file.file_id,
            upload_url,
            expires_at: now_ms() + ttl.as_millis() as i64,
        })
    }

    /// `GET /files/{file_id}`: where `user` may download it, if they can
    /// read a conversation it was sent in.
    pub async fn file_location(&self, user: &str, file_id: &str) -> Result<String, ImError> {
        // One answer for a file that does not exist and one the caller
        // may not read: an id tells nothing. Sent means uploaded in full
        // (ingest checked it before linking).
        let refused = || {
            ImError::forbidden(format!(
                "{user} reads no conversation in which file {file_id} was sent"
            ))
        };
        let file = match files::valid_file_id(file_id) {
            true => self.services.directory.file(file_id).await?,
            false => None,
        };
        let Some(file) = file else {
            return Err(refused());
        };
        let directory = &*self.services.directory;
        for (conversation_id, members_to) in directory.file_conversations(file_id).await? {
            let reads = match Conversation::parse(&conversation_id) {
                Some(Conversation::Group(g)) => directory.group(&g).await?.is_some_and(|s| {
                    s.member(user)
                        .and_then(|m| m.min_seq)
                        .is_some_and(|min| min <= members_to)
                }),
                Some(conv) => store::is_participant(directory, user, &conv).await?,
                None => false,
            };
            if reads {
                return Ok(self
                    .services
                    .files
                    .download_url(&file, self.rules.file_url_ttl)
                    .await?);
            }
        }
        Err(refused())
    }

    /// A file the embedded store serves at a signed URL: `op` (`put` or
    /// `get`) must be signed for it and not expired. A refusal is
    /// `forbidden`, whatever the reason, so a URL reveals nothing.
    pub async fn signed_file(
        &self,
        op: &str,
        file_id: &str,
        expires: i64,
        sig: &str,
    ) -> Result<(FileRow, &LocalFiles), ImError> {
        let refused = || ImError::forbidden("the URL is wrong or expired; ask for a new one");
        let local = self.services.files.local().ok_or_else(refused)?;
        if !files::valid_file_id(file_id) || !local.verify(op, file_id, expires, sig).await? {
            return Err(refused());
        }
        let file = self
            .services
            .directory
            .file(file_id)
            .await?
            .ok_or_else(refused)?;
        Ok((file, local))
    }

    /// The embedded store took the whole of `file_id`.
    pub async fn file_uploaded(&self, file_id: &str) -> Result<(), ImError> {
        Ok(self.services.directory.complete_file(file_id).await?)
    }

    // ---- admin ----

    pub async fn register(&self, users: Vec<(String, Option<String>)>) -> Result<usize, ImError> {
        if users.len() > MAX_REGISTER {
            return Err(ImError::bad_request(format!(
                "at most {MAX_REGISTER} users per call"
            )));
        }
        for (id, _) in &users {
            check_id("user_id", id)?;
        }
        Ok(self.services.directory.register_users(&users).await?)
    }

    pub async fn token(&self, user_id: &str, platform: i64) -> Result<(String, i64), ImError> {
        check_id("user_id", user_id)?;
        if !valid_platform(platform) {
            return Err(ImError::bad_request("platform must be 1 to 9"));
        }
        if !self.services.directory.user_exists(user_id).await? {
            return Err(ImError::not_found(format!("no user {user_id}")));
        }
        self.auth.issue(user_id, platform as u8).await
    }

    pub async fn logout(&self, user_id: &str, platform: Option<i64>) -> Result<(), ImError> {
        check_id("user_id", user_id)?;
        let platforms: Vec<u8> = match platform {
            Some(p) if valid_platform(p) => vec![p as u8],
            Some(_) => return Err(ImError::bad_request("platform must be 1 to 9")),
            None => (1..=9).collect(),
        };
        if !self.services.directory.user_exists(user_id).await? {
            return Err(ImError::not_found(format!("no user {user_id}")));
        }
        self.services
            .directory
            .bump_generation(user_id, &platforms)
            .await?;
        for p in &platforms {
            self.conns.kick(user_id, Some(*p), "logged out");
        }
        if let Some(c) = &self.cluster {
            let platform = (platforms.len() == 1).then(|| platforms[0]);
            c.link.kick(user_id, platform, "logged out").await;
        }
        Ok(())
    }

    // ---- groups ----

    async fn group(&self, group_id: &str) -> Result<Arc<GroupState>, ImError> {
        check_id("group_id", group_id)?;
        self.services
            .directory
            .group(group_id)
            .await?
            .ok_or_else(|| ImError::not_found(format!("no group {group_id}")))
    }

    pub async fn create_group(
        &self,
        owner: &str,
        group_id: Option<String>,
        name: String,
        members: Vec<String>,
    ) -> Result<String, ImError> {
        let group_id = match group_id {
            Some(g) => {
                check_id("group_id", &g)?;
                g
            }
            None => format!("g{}", imflow_stages::model::new_server_msg_id()),
        };
        if members.len() > MAX_USER_IDS {
            return Err(ImError::bad_request(format!(
                "at most {MAX_USER_IDS} members per request"
            )));
        }
        for m in &members {
            check_id("members", m)?;
        }
        too_long("name", &name, MAX_GROUP_NAME)?;
        let mut all = vec![owner.to_string()];
        for m in members {
            if !all.contains(&m) {
                all.push(m);
            }
        }
        if all.len() > self.rules.max_group_members {
            return Err(ImError::conflict(format!(
                "a group has at most {} members",
                self.rules.max_group_members
            )));
        }
        self.services
            .directory
            .create_group(&group_id, &name, owner, &all[1..])
            .await?;
        self.notify(
            owner,
            Target::Group(group_id.as_str().into()),
            notification::GROUP_CREATED,
            json!({"group_id": group_id, "name": name, "members": all}),
        )
        .await?;
        self.until_readable(&group_id, &all).await;
        Ok(group_id)
    }

    /// Wait (a few seconds at most) until `users` may read the group: with
    /// Kafka edges a notification is acked once the broker has it, before
    /// it is stored and its seq recorded as their first; a caller who then
    /// reads at once should find the group as they left it.
    async fn until_readable(&self, group_id: &str, users: &[String]) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match self.services.directory.group_fresh(group_id).await {
                Ok(Some(g))
                    if users
                        .iter()
                        .all(|u| g.member(u).is_none_or(|m| m.min_seq.is_some())) =>
                {
                    return
                }
                Ok(_) | Err(_) if tokio::time::Instant::now() >= deadline => return,
                _ => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    }

    /// The group, refusing changes once it is dismissed.
    async fn live_group(&self, group_id: &str) -> Result<Arc<GroupState>, ImError> {
        let g = self.group(group_id).await?;
        if g.dismissed {
            return Err(dismissed(group_id));
        }
        Ok(g)
    }

    fn require_admin(g: &GroupState, caller: &str, what: &str) -> Result<Role, ImError> {
        match g.role_of(caller) {
            Some(r @ (Role::Owner | Role::Admin)) => Ok(r),
            Some(_) => Err(ImError::forbidden(format!(
                "only the owner or an admin of the group may {what}"
            ))),
            None => Err(ImError::forbidden(format!(
                "{caller} is not a member of group {}",
                g.group_id
            ))),
        }
    }

    pub async fn add_members(
        &self,
        caller: &str,
        group_id: &str,
        users: Vec<String>,
    ) -> Result<u64, ImError> {
        let g = self.live_group(group_id).await?;
        Self::require_admin(&g, caller, "add members")?;
        if users.len() > MAX_USER_IDS {
            return Err(ImError::bad_request(format!(
                "at most {MAX_USER_IDS} user_ids per request"
            )));
        }
        for u in &users {
            check_id("user_ids", u)?;
        }
        let mut fresh: Vec<&String> = users.iter().filter(|u| g.role_of(u).is_none()).collect();
        fresh.dedup();
        if g.members.len() + fresh.len() > self.rules.max_group_members {
            return Err(ImError::conflict(format!(
                "a group has at most {} members",
                self.rules.max_group_members
            )));
        }
        let added = fresh.len() as u64;
        let waiting = self
            .services
            .directory
            .add_members(group_id, &users)
            .await?;
        if !waiting.is_empty() {
            self.notify(
                caller,
                Target::Group(group_id.into()),
                notification::MEMBERS_ADDED,
                json!({"user_ids": waiting}),
            )
            .await?;
            self.until_readable(group_id, &waiting).await;
        }
        Ok(added)
    }

    pub async fn remove_member(
        &self,
        caller: &str,
        group_id: &str,
        user: &str,
    ) -> Result<(), ImError> {
        let g = self.live_group(group_id).await?;
        check_id("user_id", user)?;
        let caller_role = g.role_of(caller);
        let target_role = g.role_of(user);
        if caller_role.is_none() {
            return Err(ImError::forbidden(format!(
                "{caller} is not a member of group {group_id}"
            )));
        }
        let Some(target_role) = target_role else {
            return Err(ImError::not_found(format!(
                "{user} is not a member of group {group_id}"
            )));
        };
        if caller == user {
            if target_role == Role::Owner {
                return Err(ImError::conflict("the owner cannot leave the group"));
            }
        } else {
            match (caller_role, target_role) {
                (Some(Role::Owner), _) => {}
                (Some(Role::Admin), Role::Member) => {}
                (Some(Role::Admin), _) => {
                    return Err(ImError::forbidden(
                        "an admin cannot remove the owner or another admin",
                    ))
                }
                _ => {
                    return Err(ImError::forbidden(
                        "only the owner or an admin may remove other members",
                    ))
                }
            }
        }
        self.services
            .directory
            .remove_member(group_id, user)
            .await?;
        let (kind, content) = if caller == user {
            (notification::MEMBER_LEFT, json!({"user_id": user}))
        } else {
            (notification::MEMBERS_REMOVED, json!({"user_ids": [user]}))
        };
        self.notify(caller, Target::Group(group_id.into()), kind, content)
            .await
    }

    pub async fn set_role(
        &self,
        caller: &str,
        group_id: &str,
        user: &str,
        role: &str,
    ) -> Result<(), ImError> {
        let g = self.live_group(group_id).await?;
        check_id("user_id", user)?;
        let role = match role {
            "admin" => Role::Admin,
            "member" => Role::Member,
            other => {
                return Err(ImError::bad_request(format!(
                    "role must be `admin` or `member`, not `{other}`"
                )))
            }
        };
        if g.role_of(caller) != Some(Role::Owner) {
            return Err(ImError::forbidden("only the owner may change roles"));
        }
        match g.role_of(user) {
            None => Err(ImError::not_found(format!(
                "{user} is not a member of group {group_id}"
            ))),
            Some(Role::Owner) => Err(ImError::conflict("the owner's role cannot be changed")),
            Some(_) => {
                self.services
                    .directory
                    .set_role(group_id, user, role)
                    .await?;
                self.notify(
                    caller,
                    Target::Group(group_id.into()),
                    notification::ROLE_CHANGED,
                    json!({"user_id": user, "role": role.as_str()}),
                )
                .await
            }
        }
    }

    /// GET /groups/{group_id}: for members.
    pub async fn group_info(&self, caller: &str, group_id: &str) -> Result<GroupInfo, ImError> {
        let g = self.group(group_id).await?;
        if g.role_of(caller).is_none() {
            return Err(ImError::forbidden(format!(
                "{caller} is not a member of group {group_id}"
            )));
        }
        Ok(Self::info_of(&g))
    }

    /// A group as an operator sees it (the console): no membership needed.
    pub async fn group_info_for_admin(&self, group_id: &str) -> Result<GroupInfo, ImError> {
        check_id("group_id", group_id)?;
        let g = self.group(group_id).await?;
        Ok(Self::info_of(&g))
    }

    fn info_of(g: &GroupState) -> GroupInfo {
        GroupInfo {
            group_id: g.group_id.to_string(),
            name: g.name.clone(),
            notice: g.notice.clone(),
            avatar_url: g.avatar_url.clone(),
            owner: g.owner.to_string(),
            member_count: g.members.len(),
            muted: g.muted,
            dismissed: g.dismissed,
        }
    }

    pub async fn update_group(
        &self,
        caller: &str,
        group_id: &str,
        changes: GroupChanges,
    ) -> Result<(), ImError> {
        let g = self.live_group(group_id).await?;
        Self::require_admin(&g, caller, "edit it")?;
        if let Some(n) = &changes.name {
            too_long("name", n, MAX_GROUP_NAME)?;
        }
        if let Some(n) = &changes.notice {
            too_long("notice", n, MAX_NOTICE)?;
        }
        if let Some(a) = &changes.avatar_url {
            too_long("avatar_url", a, MAX_URL)?;
        }
        if changes.name.is_none() && changes.notice.is_none() && changes.avatar_url.is_none() {
            return Err(ImError::bad_request(
                "give at least one of name, notice and avatar_url",
            ));
        }
        self.services
            .directory
            .update_group(group_id, &changes)
            .await?;
        let content = serde_json::to_value(&changes)
            .map_err(|e| ImError::unavailable(format!("cannot describe the change: {e}")))?;
        self.notify(
            caller,
            Target::Group(group_id.into()),
            notification::GROUP_INFO_CHANGED,
            content,
        )
        .await
    }

    pub async fn mute_group(
        &self,
        caller: &str,
        group_id: &str,
        muted: bool,
    ) -> Result<(), ImError> {
        let g = self.live_group(group_id).await?;
        Self::require_admin(&g, caller, "mute it")?;
        self.services
            .directory
            .set_group_muted(group_id, muted)
            .await?;
        self.notify(
            caller,
            Target::Group(group_id.into()),
            notification::GROUP_MUTED,
            json!({"muted": muted}),
        )
        .await
    }

    pub async fn mute_member(
        &self,
        caller: &str,
        group_id: &str,
        user: &str,
        seconds: u64,
    ) -> Result<(), ImError> {
        let g = self.live_group(group_id).await?;
        let caller_role = Self::require_admin(&g, caller, "mute members")?;
        check_id("user_id", user)?;
        match (caller_role, g.role_of(user)) {
            (_, None) => {
                return Err(ImError::not_found(format!(
                    "{user} is not a member of group {group_id}"
                )))
            }
            (_, Some(Role::Owner)) => return Err(ImError::forbidden("the owner cannot be muted")),
            (Role::Admin, Some(Role::Admin)) => {
                return Err(ImError::forbidden("an admin cannot mute another admin"))
            }
            _ => {}
        }
        let until = if seconds == 0 {
            0
        } else {
            now_ms().saturating_add((seconds.min(i64::MAX as u64 / 1000) as i64) * 1000)
        };
        self.services
            .directory
            .set_member_muted(group_id, user, until)
            .await?;
        self.notify(
            caller,
            Target::Group(group_id.into()),
            notification::MEMBER_MUTED,
            json!({"user_id": user, "until": until}),
        )
        .await
    }

    pub async fn transfer_group(
        &self,
        caller: &str,
        group_id: &str,
        to: &str,
    ) -> Result<(), ImError> {
        let g = self.live_group(group_id).await?;
        check_id("user_id", to)?;
        if g.role_of(caller) != Some(Role::Owner) {
            return Err(ImError::forbidden("only the owner may hand the group over"));
        }
        match g.role_of(to) {
            None => Err(ImError::not_found(format!(
                "{to} is not a member of group {group_id}"
            ))),
            Some(Role::Owner) => Err(ImError::conflict("the group is already theirs")),
            Some(_) => {
                self.services
                    .directory
                    .transfer_group(group_id, caller, to)
                    .await?;
                self.notify(
                    caller,
                    Target::Group(group_id.into()),
                    notification::OWNER_TRANSFERRED,
                    json!({"from": caller, "to": to}),
                )
                .await
            }
        }
    }

    pub async fn dismiss_group(&self, caller: &str, group_id: &str) -> Result<(), ImError> {
        let g = self.live_group(group_id).await?;
        if g.role_of(caller) != Some(Role::Owner) {
            return Err(ImError::forbidden("only the owner may dismiss the group"));
        }
        self.services.directory.dismiss_group(group_id).await?;
        self.notify(
            caller,
            Target::Group(group_id.into()),
            notification::GROUP_DISMISSED,
            json!({}),
        )
        .await
    }

    pub async fn my_groups(&self, user: &str) -> Result<Vec<MyGroup>, ImError> {
        Ok(self
            .services
            .directory
            .groups_of(user)
            .await?
            .into_iter()
            .map(|(group_id, name, role)| MyGroup {
                group_id,
                name,
                role: role.as_str(),
            })
            .collect())
    }

    pub async fn members(
        &self,
        caller: &str,
        group_id: &str,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<(Arc<str>, Role)>, usize), ImError> {
        let g = self.group(group_id).await?;
        if g.role_of(caller).is_none() {
            return Err(ImError::forbidden(format!(
                "{caller} is not a member of group {group_id}"
            )));
        }
        self.members_for_admin(group_id, offset, limit).await
    }

    /// A page of a group's members with no membership check (the console).
    pub async fn members_for_admin(
        &self,
        group_id: &str,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<(Arc<str>, Role)>, usize), ImError> {
        Ok(store::members_page(
            &*self.services.directory,
            group_id,
            offset,
            limit.clamp(1, 1000),
        )
        .await?)
    }
}

/// HTTP status for an error code.
pub fn http_status(code: ErrorCode) -> u16 {
    match code {
        ErrorCode::BadRequest => 400,
        ErrorCode::Unauthorized => 401,
        ErrorCode::Forbidden => 403,
        ErrorCode::NotFound => 404,
        ErrorCode::Conflict => 409,
        ErrorCode::PayloadTooLarge => 413,
        ErrorCode::RateLimited => 429,
        ErrorCode::Unavailable => 503,
        ErrorCode::Blocked | ErrorCode::Muted | ErrorCode::TooLate => 403,
        ErrorCode::Dismissed => 410,
    }
}
