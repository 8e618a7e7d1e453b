//! `ingest`: the pipeline's source. Doors call [`IngestHandle::send`]; it
//! checks the request against PROTOCOL.md and the directory (the receiver
//! exists, the sender is a member of the group), stamps `server_msg_id` and
//! `send_time`, and hands the message on. The returned [`PendingAck`] resolves
//! once the message is durable, or to the first message's ids for a resend.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use imflow_runtime::{
    Ack, AckStatus, BuildContext, BuildError, Envelope, Output, PortType, RoleId, StageKind,
    StageTask,
};
use serde::Deserialize;
use tokio::sync::oneshot;

use crate::model::{
    check_content, check_id, file_of, new_server_msg_id, FileRef, notification, now_ms, partition_key,
    valid_client_msg_id, AckInfo, Conversation, ErrorCode, ImError, Notice, SendRequest, Stamped,
    Target,
};
use crate::store::redis::{Redis, ResendClaim};
use crate::store::{Directory, Files};
use crate::roles::{DIRECTORY, FILES, INGEST_DOOR, RESENDS};
use crate::store::Role;
use crate::Resends;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Options {}

pub struct Ingest;

impl StageKind for Ingest {
    fn kind(&self) -> &'static str {
        "ingest"
    }
    fn input(&self) -> Option<PortType> {
        None
    }
    fn output(&self) -> Option<PortType> {
        super::stamped()
    }
    fn check_options(
        &self,
        options: &serde_yaml::Value,
    ) -> Vec<imflow_runtime::registry::OptionError> {
        super::check::<Options>(options)
    }
    fn needs(&self) -> Vec<RoleId> {
        vec![DIRECTORY.id(), RESENDS.id(), FILES.id()]
    }
    fn provides(&self) -> Vec<RoleId> {
        vec![INGEST_DOOR.id()]
    }
    fn build(&self, cx: &mut BuildContext<'_>) -> Result<Vec<StageTask>, BuildError> {
        let handle = IngestHandle::new(
            cx.resource(&DIRECTORY)?,
            cx.resource(&RESENDS)?,
            cx.resource(&FILES)?,
        );
        handle.open(cx.output::<Stamped>()?);
        cx.provide(&INGEST_DOOR, handle.clone())?;
        let shutdown = cx.shutdown.clone();
        Ok(vec![Box::pin(async move {
            shutdown.cancelled().await;
            // Dropping the output lets everything downstream drain and stop.
            handle.close();
            Ok(())
        })])
    }
}

/// Where doors send: the running pipeline's [`IngestHandle`], kept across
/// live reloads. While a reload swaps the pipeline, sends wait here (in
/// arrival order) instead of failing, so a reload loses and refuses nothing.
/// Cheap to clone.
#[derive(Clone, Default)]
pub struct Door(Arc<tokio::sync::RwLock<Option<IngestHandle>>>);

/// A door closed for a swap: sends wait until [`Swap::open`].
pub struct Swap(tokio::sync::OwnedRwLockWriteGuard<Option<IngestHandle>>);

impl Swap {
    /// Let the waiting sends through to `handle` (none: the new pipeline
    /// takes no sends).
    pub fn open(mut self, handle: Option<IngestHandle>) {
        *self.0 = handle;
    }
}

impl Door {
    pub fn new(handle: Option<IngestHandle>) -> Self {
        Door(Arc::new(tokio::sync::RwLock::new(handle)))
    }

    /// Hold new sends back, once those already handing their message to
    /// the pipeline have done so.
    pub async fn close(&self) -> Swap {
        Swap(self.0.clone().write_owned().await)
    }

    /// Whether a pipeline takes sends here.
    pub async fn serves(&self) -> bool {
        self.0.read().await.is_some()
    }

    pub async fn send(&self, sender: &Arc<str>, req: SendRequest) -> Result<PendingAck, ImError> {
        match &*self.0.read().await {
            Some(h) => h.send(sender, req).await,
            None => Err(no_pipeline()),
        }
    }

    pub async fn notify(&self, sender: &Arc<str>, notice: Notice) -> Result<PendingAck, ImError> {
        match &*self.0.read().await {
            Some(h) => h.notify(sender, notice).await,
            None => Err(no_pipeline()),
        }
    }
}

fn no_pipeline() -> ImError {
    ImError::unavailable("this server's pipeline takes no sends")
}

/// How a door submits messages. Cheap to clone.
#[derive(Clone)]
pub struct IngestHandle {
    inner: Arc<Inner>,
}

struct Inner {
    output: RwLock<Option<Output<Stamped>>>,
    directory: Arc<dyn Directory>,
    resends: Resends,
    files: Arc<dyn Files>,
}

/// The answer to a send, once there is one.
pub enum PendingAck {
    Ready(Result<AckInfo, ImError>),
    Waiting(oneshot::Receiver<Result<AckInfo, ImError>>),
    /// Answered by another process (a door's send to an `ingest` process).
    Remote(futures::future::BoxFuture<'static, Result<AckInfo, ImError>>),
}

impl PendingAck {
    pub async fn wait(self) -> Result<AckInfo, ImError> {
        match self {
            PendingAck::Ready(r) => r,
            PendingAck::Waiting(rx) => rx.await.unwrap_or_else(|_| {
                Err(ImError::unavailable(
                    "the message was not stored; send it again",
                ))
            }),
            PendingAck::Remote(f) => f.await,
        }
    }
}

fn answer(info: AckInfo, status: AckStatus) -> Result<AckInfo, ImError> {
    match status {
        AckStatus::Delivered => Ok(info),
        AckStatus::Duplicate(first) => Ok(serde_json::from_str(&first).unwrap_or(info)),
        AckStatus::Refused(why) => Err(ImError::forbidden(why.to_string())),
        AckStatus::Failed(why) => {
            tracing::warn!(reason = %why, server_msg_id = %info.server_msg_id, "message not stored");
            Err(ImError::unavailable(
                "the message was not stored; send it again",
            ))
        }
    }
}

impl IngestHandle {
    pub fn new(directory: Arc<dyn Directory>, resends: Resends, files: Arc<dyn Files>) -> Self {
        IngestHandle {
            inner: Arc::new(Inner {
                output: RwLock::new(None),
                directory,
                resends,
                files,
            }),
        }
    }

    fn open(&self, out: Output<Stamped>) {
        if let Ok(mut o) = self.inner.output.write() {
            *o = Some(out);
        }
    }

    /// Stop taking messages; later sends get `unavailable`.
    pub fn close(&self) {
        if let Ok(mut o) = self.inner.output.write() {
            o.take();
        }
    }

    fn output(&self) -> Result<Output<Stamped>, ImError> {
        match self.inner.output.read() {
            Ok(o) => o.clone(),
            Err(_) => None,
        }
        .ok_or_else(|| ImError::unavailable("the server is shutting down"))
    }

    /// Write a server notification (content type 1000 and up) into a
    /// conversation, caused by `sender`: it takes the next seq and is stored
    /// and pushed like any message. The operation that caused it answers
    /// once it is durable.
    pub async fn notify(&self, sender: &Arc<str>, notice: Notice) -> Result<PendingAck, ImError> {
        if !notification::is(notice.content_type) {
            return Err(ImError::bad_request("not a notification type"));
        }
        let conversation = match &notice.target {
            Target::User(peer) => Conversation::single(sender, peer),
            Target::Group(g) => Conversation::Group(g.clone()),
        };
        let server_msg_id = new_server_msg_id();
        let msg = Stamped {
            conversation_id: conversation.id().into(),
            client_msg_id: format!("n-{server_msg_id}").into(),
            server_msg_id: server_msg_id.into(),
            sender: sender.clone(),
            target: notice.target,
            content_type: notice.content_type,
            content: notice.content.to_string().into(),
            send_time: now_ms(),
        };
        let output = self.output()?;
        let (tx, rx) = oneshot::channel();
        let info = msg.ack_info();
        let ack = Ack::until_durable(move |status| {
            let _ = tx.send(answer(info, status));
        });
        let key = partition_key(&msg.conversation_id);
        output
            .send(Envelope::new(key, msg, ack))
            .await
            .map_err(|_| ImError::unavailable("the pipeline is not running"))?;
        Ok(PendingAck::Waiting(rx))
    }

    /// Check, stamp and submit a message from `sender`. Waits only while the
    /// pipeline is full (backpressure); the durable ack comes later.
    pub async fn send(&self, sender: &Arc<str>, req: SendRequest) -> Result<PendingAck, ImError> {
        let mut msg = self.stamp(sender, req).await?;
        let output = self.output()?;
        let (tx, rx) = oneshot::channel();
        let ack = match &self.inner.resends {
            Resends::Local(index) => {
                if let Some(first) = index.durable(sender, &msg.client_msg_id) {
                    return Ok(PendingAck::Ready(Ok(first)));
                }
                let info = msg.ack_info();
                Ack::until_durable(move |status| {
                    let _ = tx.send(answer(info, status));
                })
            }
            Resends::Redis(redis) => {
                let token = match claim(redis, &mut msg).await? {
                    Ok(token) => token,
                    Err(first) => return Ok(PendingAck::Ready(Ok(first))),
                };
                settle_in_redis(redis.clone(), &msg, token, tx)
            }
        };
        let key = partition_key(&msg.conversation_id);
        output
            .send(Envelope::new(key, msg, ack))
            .await
            .map_err(|_| ImError::unavailable("the pipeline is not running"))?;
        Ok(PendingAck::Waiting(rx))
    }

    /// A message of `sender` in `conversation` carries `file_id`: it must be
    /// the sender's and uploaded in full (asked of the object store the
    /// first time); the conversation's readers may then download it.
    async fn file_sent(
        &self,
        sender: &str,
        sent: &FileRef,
        conversation: &str,
        members_to: u64,
    ) -> Result<(), ImError> {
        let inner = &self.inner;
        let file_id = sent.file_id.as_str();
        let file = inner
            .directory
            .file(file_id)
            .await
            .map_err(|e| e.to_client())?
            .filter(|f| f.owner == sender)
            .ok_or_else(|| {
                ImError::bad_request(format!("file {file_id} was not uploaded by {sender}"))
            })?;
        if sent.size != file.size {
            return Err(ImError::bad_request(format!(
                "content.size is {}; file {file_id} has {} bytes",
                sent.size, file.size
            )));
        }
        if !file.complete {
            let stored = inner
                .files
                .stored_size(file_id)
                .await
                .map_err(|e| e.to_client())?;
            if stored != Some(file.size) {
                return Err(ImError::bad_request(format!(
                    "file {file_id} is not uploaded: {} of {} bytes arrived",
                    stored.unwrap_or(0),
                    file.size
                )));
            }
            inner
                .directory
                .complete_file(file_id)
                .await
                .map_err(|e| e.to_client())?;
        }
        inner
            .directory
            .link_file(file_id, conversation, members_to)
            .await
            .map_err(|e| e.to_client())
    }

    async fn stamp(&self, sender: &Arc<str>, req: SendRequest) -> Result<Stamped, ImError> {
        if !valid_client_msg_id(&req.client_msg_id) {
            return Err(ImError::bad_request(
                "client_msg_id must be 1 to 64 printable ASCII characters",
            ));
        }
        check_content(req.content_type, &req.content)?;
        // In a group: the newest first readable seq among the members, so
        // a file sent now is not readable by whoever joins later.
        let (target, conversation, members_to) = match (req.recv_id, req.group_id) {
            (Some(r), None) => {
                check_id("recv_id", &r)?;
                if !self
                    .inner
                    .directory
                    .user_exists(&r)
                    .await
                    .map_err(|e| e.to_client())?
                {
                    return Err(ImError::not_found(format!("no user {r}")));
                }
                if **sender != *r
                    && self
                        .inner
                        .directory
                        .is_blocked(&r, sender)
                        .await
                        .map_err(|e| e.to_client())?
                {
                    return Err(ImError::new(
                        ErrorCode::Blocked,
                        format!("{r} does not take messages from {sender}"),
                    ));
                }
                let conv = Conversation::single(sender, &r);
                (Target::User(r.into()), conv, 0)
            }
            (None, Some(g)) => {
                check_id("group_id", &g)?;
                let group = self
                    .inner
                    .directory
                    .group(&g)
                    .await
                    .map_err(|e| e.to_client())?
                    .ok_or_else(|| ImError::not_found(format!("no group {g}")))?;
                let Some(me) = group.member(sender) else {
                    return Err(ImError::forbidden(format!(
                        "{sender} is not a member of group {g}"
                    )));
                };
                if group.dismissed {
                    return Err(ImError::new(
                        ErrorCode::Dismissed,
                        format!("group {g} was dismissed"),
                    ));
                }
                let admin = matches!(me.role, Role::Owner | Role::Admin);
                if group.muted && !admin {
                    return Err(ImError::new(
                        ErrorCode::Muted,
                        format!("group {g} is muted: only its owner and admins send"),
                    ));
                }
                if me.muted_until > now_ms() {
                    return Err(ImError::new(
                        ErrorCode::Muted,
                        format!("{sender} is muted in group {g} until {}", me.muted_until),
                    ));
                }
                let members_to = match file_of(req.content_type, req.content.get()) {
                    Some(_) => group.newest_member_seq(),
                    None => 0,
                };
                (
                    Target::Group(g.clone().into()),
                    Conversation::Group(g.into()),
                    members_to,
                )
            }
            _ => {
                return Err(ImError::bad_request(
                    "give exactly one of recv_id and group_id",
                ))
            }
        };
        if let Some(file) = file_of(req.content_type, req.content.get()) {
            self.file_sent(sender, &file, &conversation.id(), members_to)
                .await?;
        }
        Ok(Stamped {
            conversation_id: conversation.id().into(),
            server_msg_id: new_server_msg_id().into(),
            client_msg_id: req.client_msg_id.into(),
            sender: sender.clone(),
            target,
            content_type: req.content_type,
            content: req.content.get().into(),
            send_time: now_ms(),
        })
    }
}

/// Claim the resend key of `msg` in Redis: `Ok(token)` to go on (with the
/// first's ids when taking over a dead sender's claim), `Err(first)` when
/// the first message is durable. While the first is on its way, asks again
/// until it is durable, or its claim is released or taken over.
async fn claim(redis: &Redis, msg: &mut Stamped) -> Result<Result<String, AckInfo>, ImError> {
    let started = Instant::now();
    let give_up = redis.settings().resend_takeover + Duration::from_secs(10);
    loop {
        match redis.claim_resend(msg).await.map_err(|e| e.to_client())? {
            ResendClaim::New { token } => return Ok(Ok(token)),
            ResendClaim::TakeOver { first, token } => {
                // The same ids: if the first did reach the pipeline,
                // seq-assign recognises this one as its replay.
                msg.server_msg_id = first.server_msg_id.into();
                msg.send_time = first.send_time;
                return Ok(Ok(token));
            }
            ResendClaim::Durable(first) => return Ok(Err(first)),
            ResendClaim::Pending if started.elapsed() < give_up => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            ResendClaim::Pending => {
                return Err(ImError::unavailable(
                    "the first copy of this message is still being stored; send it again",
                ))
            }
        }
    }
}

/// The ack of a message claimed in Redis: once durable, the claim says so
/// (later resends get the ids at once); if it fails, the claim says so and a
/// resend goes on at once with the same server_msg_id (a failed write may
/// still have reached the broker: the two copies then become one message).
fn settle_in_redis(
    redis: Arc<Redis>,
    msg: &Stamped,
    token: String,
    tx: oneshot::Sender<Result<AckInfo, ImError>>,
) -> Ack {
    let info = msg.ack_info();
    let sender = msg.sender.clone();
    let client_msg_id = msg.client_msg_id.clone();
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return Ack::until_durable(move |status| {
            let _ = tx.send(answer(info, status));
        });
    };
    Ack::until_durable(move |status| {
        rt.spawn(async move {
            let done = match &status {
                AckStatus::Delivered => redis.resend_durable(&sender, &client_msg_id, &info).await,
                // Refused: a resend is asked about again (the policy may
                // have changed), as after a failure.
                AckStatus::Failed(_) | AckStatus::Refused(_) => {
                    redis.resend_failed(&sender, &client_msg_id, &token).await
                }
                AckStatus::Duplicate(_) => Ok(()),
            };
            if let Err(e) = done {
                // Durable but not marked: a resend waits for the takeover and
                // is then recognised by seq-assign as a replay.
                tracing::warn!(error = %e, "resend key not updated");
            }
            let _ = tx.send(answer(info, status));
        });
    })
}
