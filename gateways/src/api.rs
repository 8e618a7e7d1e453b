//! The operations of PROTOCOL.md, shared by the WebSocket gateway and the
//! REST API, so both doors apply exactly the same rules.

use std::sync::Arc;

use imflow_stages::model::{
    check_id, valid_platform, Conversation, ErrorCode, ImError, SendRequest, MAX_PULL_SPAN,
};
use imflow_stages::store::{self, ConversationState, GroupState, Role};
use imflow_stages::{PendingAck, Services};

use crate::auth::Auth;
use crate::cluster::{DoorLink, RemoteIngest};
use crate::connections::{Connections, Outbound};

/// Everything a door needs.
pub struct Api {
    pub services: Services,
    pub auth: Auth,
    pub conns: Arc<Connections>,
    /// Set when this door is its own process in a cluster: sends go to the
    /// ingest processes, kicks and per-user frames to the other doors.
    pub cluster: Option<ClusterDoor>,
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
            None => self.services.ingest.send(user, req).await,
        }
    }

    pub async fn sync(&self, user: &str) -> Result<Vec<ConversationState>, ImError> {
        let rows = self.services.directory.conversations_of(user).await?;
        let ids: Vec<Arc<str>> = rows.iter().map(|(c, _)| Arc::from(c.as_str())).collect();
        let max =
            store::visible_max_seqs(&*self.services.hot, &*self.services.history, &ids).await?;
        Ok(rows
            .into_iter()
            .zip(ids)
            .map(|((conversation_id, read_seq), id)| ConversationState {
                conversation_id,
                max_seq: max.get(&id).copied().unwrap_or(0),
                read_seq,
            })
            .collect())
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
        self.participant(user, conversation_id).await?;
        let from = from.max(1);
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
        let frame = frame.to_string();
        self.conns
            .send_to_user(user, from_conn, &Outbound::Frame(frame.as_str().into()));
        if let Some(c) = &self.cluster {
            c.link.frame(user, &frame).await;
        }
        Ok(read_seq)
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
        for m in &members {
            check_id("members", m)?;
        }
        if name.chars().count() > 256 {
            return Err(ImError::bad_request("name may be at most 256 characters"));
        }
        self.services
            .directory
            .create_group(&group_id, &name, owner, &members)
            .await?;
        Ok(group_id)
    }

    pub async fn add_members(
        &self,
        caller: &str,
        group_id: &str,
        users: Vec<String>,
    ) -> Result<u64, ImError> {
        let g = self.group(group_id).await?;
        match g.role_of(caller) {
            Some(Role::Owner | Role::Admin) => {}
            _ => {
                return Err(ImError::forbidden(
                    "only the owner or an admin of the group may add members",
                ))
            }
        }
        for u in &users {
            check_id("user_ids", u)?;
        }
        Ok(self
            .services
            .directory
            .add_members(group_id, &users)
            .await?)
    }

    pub async fn remove_member(
        &self,
        caller: &str,
        group_id: &str,
        user: &str,
    ) -> Result<(), ImError> {
        let g = self.group(group_id).await?;
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
        Ok(())
    }

    pub async fn set_role(
        &self,
        caller: &str,
        group_id: &str,
        user: &str,
        role: &str,
    ) -> Result<(), ImError> {
        let g = self.group(group_id).await?;
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
            Some(_) => Ok(self
                .services
                .directory
                .set_role(group_id, user, role)
                .await?),
        }
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
    }
}
