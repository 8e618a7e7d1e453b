//! How the processes of a cluster reach each other.
//!
//! - **send** (door → `ingest` process): `POST /rpc/send`. The answer is
//!   two JSON lines: `queued` once the message is in that process's
//!   pipeline, then the ack. The door waits for the first before it takes
//!   the client's next frame, so one client's messages enter the pipeline in
//!   the order sent; a conversation always goes to the same ingest process
//!   (hash of its id over the live list), so Kafka keeps that order.
//! - **push** (`push` process → gateways): `POST /rpc/push` with a batch of
//!   messages, each naming its recipients on that gateway. Which gateway
//!   holds whom comes from the presence registry: a Redis set per gateway,
//!   changes announced on a channel, each push process keeping the whole map
//!   in memory (a lookup per recipient would cost a round trip per member
//!   of a 10k group). Never a broadcast of every message to every gateway.
//! - **control** (kicks, read receipts to a user's other devices): a Redis
//!   channel every gateway listens to; they are rare.
//!
//! Every internal request carries the cluster secret; the RPC ports are
//! for the cluster's own hosts, like the seed's RPC ports.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use dashmap::DashMap;
use imflow_runtime::{Ack, Retrying};
use imflow_stages::model::{AckInfo, Conversation, ImError, Notice, SendRequest, Target};
use imflow_stages::roles::INGEST_DOOR;
use imflow_stages::store::redis::Redis;
use imflow_stages::store::Directory;
use imflow_stages::{Door, PendingAck, Presence, PushItem};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::connections::{ConnEvent, Connections, Outbound};
use crate::discovery::Member;
use crate::error::Causes;

pub const SECRET_HEADER: &str = "x-imflow-cluster-secret";
const PRESENCE_CHANNEL: &str = "presence";
const CONTROL_CHANNEL: &str = "control";
/// Per gateway, deliveries waiting to be sent; beyond it they are dropped
/// (counted): the messages are stored and the clients catch up by sync.
const PUSH_QUEUE: usize = 65_536;

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(60))
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
        .unwrap_or_default()
}

// ---------------------------------------------------------------- send

#[derive(Serialize, Deserialize)]
struct RpcSend {
    sender: String,
    /// A client's message, or
    #[serde(default)]
    req: Option<SendRequest>,
    /// a server notification (from a door, on the cluster's own secret).
    #[serde(default)]
    notice: Option<Notice>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum SendLine {
    Queued,
    Ok(AckInfo),
    Error(ImError),
}

/// A door's way to the `ingest` processes of the cluster.
#[derive(Clone)]
pub struct RemoteIngest {
    http: reqwest::Client,
    members: watch::Receiver<Vec<Member>>,
    secret: Arc<str>,
}

impl RemoteIngest {
    pub fn new(members: watch::Receiver<Vec<Member>>, secret: &str) -> Self {
        RemoteIngest {
            http: http_client(),
            members,
            secret: secret.into(),
        }
    }

    fn targets(&self) -> Vec<String> {
        self.members
            .borrow()
            .iter()
            .filter(|m| m.provides.iter().any(|r| r == INGEST_DOOR.name))
            .map(|m| m.addr.clone())
            .collect()
    }

    /// Hand the message to an ingest process; resolves once it is in that
    /// process's pipeline, with the ack to come.
    pub async fn send(&self, sender: &Arc<str>, req: SendRequest) -> Result<PendingAck, ImError> {
        let conversation = match (&req.recv_id, &req.group_id) {
            (Some(r), None) => Conversation::single(sender, r).id(),
            (None, Some(g)) => Conversation::Group(g.as_str().into()).id(),
            _ => sender.to_string(),
        };
        let body = RpcSend {
            sender: sender.to_string(),
            req: Some(req),
            notice: None,
        };
        self.submit(&conversation, body).await
    }

    /// Hand a server notification to the ingest process of its
    /// conversation (so it is ordered with the conversation's messages).
    pub async fn notify(&self, sender: &Arc<str>, notice: Notice) -> Result<PendingAck, ImError> {
        let conversation = match &notice.target {
            Target::User(peer) => Conversation::single(sender, peer),
            Target::Group(g) => Conversation::Group(g.clone()),
        }
        .id();
        let body = RpcSend {
            sender: sender.to_string(),
            req: None,
            notice: Some(notice),
        };
        self.submit(&conversation, body).await
    }

    async fn submit(&self, conversation: &str, body: RpcSend) -> Result<PendingAck, ImError> {
        let targets = self.targets();
        if targets.is_empty() {
            return Err(ImError::unavailable("no ingest process is running"));
        }
        // A stable hash (the same in every process and release), so one
        // conversation always goes through the same ingest process.
        let start =
            (imflow_stages::model::partition_key(conversation) % targets.len() as u64) as usize;
        for i in 0..targets.len() {
            let addr = &targets[(start + i) % targets.len()];
            let sent = self
                .http
                .post(format!("http://{addr}/rpc/send"))
                .header(SECRET_HEADER, &*self.secret)
                .json(&body)
                .send()
                .await;
            let resp = match sent {
                // Never reached that process (it died, or is restarting):
                // the next one takes it.
                Err(e) if e.is_connect() => {
                    tracing::debug!(%addr, error = %Causes(&e), "ingest process unreachable; trying the next");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(%addr, error = %Causes(&e), "send to ingest process failed");
                    return Err(ImError::unavailable(
                        "the message may not be stored; send it again",
                    ));
                }
                Ok(r) if !r.status().is_success() => {
                    tracing::warn!(%addr, status = %r.status(), "ingest process refused a send");
                    return Err(ImError::unavailable("the server cannot take messages now"));
                }
                Ok(r) => r,
            };
            let mut lines = Lines {
                resp,
                buf: Vec::new(),
            };
            return match lines.next().await {
                Some(SendLine::Queued) => Ok(PendingAck::Remote(Box::pin(async move {
                    let last = lines.next().await;
                    lines.finish().await;
                    match last {
                        Some(SendLine::Ok(a)) => Ok(a),
                        Some(SendLine::Error(e)) => Err(e),
                        _ => Err(ImError::unavailable(
                            "the message may not be stored; send it again",
                        )),
                    }
                }))),
                Some(SendLine::Ok(a)) => {
                    lines.finish().await;
                    Ok(PendingAck::Ready(Ok(a)))
                }
                Some(SendLine::Error(e)) => {
                    lines.finish().await;
                    Err(e)
                }
                None => Err(ImError::unavailable(
                    "the message may not be stored; send it again",
                )),
            };
        }
        Err(ImError::unavailable("no ingest process answers"))
    }
}

/// JSON lines of a streamed response.
struct Lines {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl Lines {
    /// Read the body to its end: a response dropped half-read closes its
    /// connection, and the next send would pay a new TCP handshake.
    async fn finish(mut self) {
        while let Ok(Some(_)) = self.resp.chunk().await {}
    }

    async fn next(&mut self) -> Option<SendLine> {
        loop {
            if let Some(at) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=at).collect();
                return serde_json::from_slice(&line[..at]).ok();
            }
            match self.resp.chunk().await {
                Ok(Some(c)) => self.buf.extend_from_slice(&c),
                Ok(None) => return None,
                Err(e) => {
                    // A timeout or a reset mid-answer: the sender hears
                    // `unavailable` and sends again, which the resend
                    // check makes safe.
                    tracing::warn!(error = %Causes(&e), "the ingest process's answer was cut");
                    return None;
                }
            }
        }
    }
}

fn line(l: &SendLine) -> Result<Bytes, std::io::Error> {
    let mut v = serde_json::to_vec(l).map_err(std::io::Error::other)?;
    v.push(b'\n');
    Ok(Bytes::from(v))
}

async fn rpc_send(
    State(s): State<RpcState>,
    headers: HeaderMap,
    Json(body): Json<RpcSend>,
) -> Response {
    if let Err(r) = s.check(&headers) {
        return r;
    }
    let ingest = &s.ingest;
    if !ingest.serves().await {
        return (StatusCode::NOT_FOUND, "this process runs no ingest stage").into_response();
    }
    let sender: Arc<str> = body.sender.into();
    let submitted = match (body.req, body.notice) {
        (Some(req), None) => ingest.send(&sender, req).await,
        (None, Some(notice)) => ingest.notify(&sender, notice).await,
        _ => Err(ImError::bad_request("give exactly one of req and notice")),
    };
    let first = match submitted {
        Err(e) => SendLine::Error(e),
        Ok(PendingAck::Ready(Ok(a))) => SendLine::Ok(a),
        Ok(PendingAck::Ready(Err(e))) => SendLine::Error(e),
        Ok(pending) => {
            let rest = futures::stream::once(async move {
                line(&match pending.wait().await {
                    Ok(a) => SendLine::Ok(a),
                    Err(e) => SendLine::Error(e),
                })
            });
            let stream = futures::StreamExt::chain(
                futures::stream::once(async { line(&SendLine::Queued) }),
                rest,
            );
            return Body::from_stream(stream).into_response();
        }
    };
    Body::from_stream(futures::stream::once(async move { line(&first) })).into_response()
}

// ---------------------------------------------------------------- push

/// How long a gateway may be missing from the member list before `push`
/// forgets who is connected to it (see `RemotePresence::start`): several
/// etcd lease lifetimes.
const GATEWAY_GRACE: Duration = Duration::from_secs(30);

/// Gateways that left the member list, and since when. Their users are
/// forgotten only after `GATEWAY_GRACE`: a gateway whose etcd lease lapsed
/// (etcd starved of CPU: seen for 9 s on a saturated host) is still up and
/// holding its connections, and forgetting them at once skipped every push
/// to them as offline (7,535 acked messages of one run never reached users
/// who were connected all along). A gateway that is really gone costs its
/// pushes until then (counted as dropped), no more; its users count as
/// offline at once, for offline push. Shared: the follower of the member
/// list updates it, `is_online` reads it on the push path.
#[derive(Default)]
struct Departures {
    since: DashMap<Arc<str>, tokio::time::Instant>,
}

impl Departures {
    /// The member list went from `known` to `now_listed` (or time passed):
    /// the gateways whose users are to be forgotten now.
    fn update(
        &self,
        now: tokio::time::Instant,
        known: &[Arc<str>],
        now_listed: &[Arc<str>],
    ) -> Vec<Arc<str>> {
        for gone in known.iter().filter(|g| !now_listed.contains(g)) {
            self.since.entry(gone.clone()).or_insert(now);
        }
        let mut over = Vec::new();
        self.since.retain(|g, since| {
            let forget = now.duration_since(*since) >= GATEWAY_GRACE;
            if forget && !now_listed.contains(g) {
                over.push(g.clone());
            }
            !forget && !now_listed.contains(g)
        });
        over
    }

    fn contains(&self, gateway: &str) -> bool {
        self.since.contains_key(gateway)
    }

    /// The gateways in their grace.
    fn gateways(&self) -> Vec<Arc<str>> {
        self.since.iter().map(|e| e.key().clone()).collect()
    }

    /// When the next departed gateway's grace ends.
    fn next_forget(&self) -> Option<tokio::time::Instant> {
        self.since
            .iter()
            .map(|e| *e.value())
            .min()
            .map(|since| since + GATEWAY_GRACE)
    }
}

/// Sleep until `at`, or forever when there is nothing to wait for.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[derive(Serialize, Deserialize)]
struct PushEntry {
    conversation_id: Arc<str>,
    seq: u64,
    body: Arc<str>,
    users: Vec<Arc<str>>,
}

/// `push`'s way to the gateways holding the recipients' connections.
pub struct RemotePresence {
    /// user → the gateways (internal addresses) with a connection of theirs.
    online: DashMap<Arc<str>, Vec<Arc<str>>>,
    /// gateway → its delivery queue (each entry with its message's ack,
    /// released once the gateway took it).
    queues: DashMap<Arc<str>, mpsc::Sender<(PushEntry, Ack)>>,
    /// Gateways missing from the member list, in their grace: still pushed
    /// to, but their users do not count as online (so offline push reaches
    /// the users of a gateway that crashed).
    departed: Departures,
    http: reqwest::Client,
    secret: Arc<str>,
    redis: Arc<Redis>,
}

impl RemotePresence {
    /// Follow the gateways listed in `members` and the presence registry in
    /// Redis until `stop`.
    pub fn start(
        redis: Arc<Redis>,
        mut members: watch::Receiver<Vec<Member>>,
        secret: &str,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let me = Arc::new(RemotePresence {
            online: DashMap::new(),
            queues: DashMap::new(),
            departed: Departures::default(),
            http: http_client(),
            secret: secret.into(),
            redis: redis.clone(),
        });
        let (reload_tx, mut reload_rx) = mpsc::unbounded_channel::<()>();
        let events = me.clone();
        redis.watch_channel(PRESENCE_CHANNEL, move |payload| match payload {
            None => {
                let _ = reload_tx.send(());
            }
            Some(p) => events.apply(p),
        });
        let follower = me.clone();
        tokio::spawn(async move {
            let mut known: Vec<Arc<str>> = Vec::new();
            loop {
                let gateways: Vec<Arc<str>> = members
                    .borrow_and_update()
                    .iter()
                    .filter(|m| m.role == "gateway")
                    .map(|m| Arc::from(m.addr.as_str()))
                    .collect();
                let now = tokio::time::Instant::now();
                for g in follower.departed.update(now, &known, &gateways) {
                    tracing::info!(gateway = %g, "gateway gone; its users forgotten");
                    follower.forget_gateway(&g);
                }
                let fresh: Vec<Arc<str>> = gateways
                    .iter()
                    .filter(|g| !known.contains(g))
                    .cloned()
                    .collect();
                for g in &fresh {
                    follower.queue_for(g);
                }
                follower.load(&fresh).await;
                known = gateways;
                let next_forget = follower.departed.next_forget();
                tokio::select! {
                    _ = stop.cancelled() => return,
                    changed = members.changed() => if changed.is_err() { return },
                    // Departed gateways too: one back within its grace must
                    // not miss what changed while Redis was away.
                    Some(()) = reload_rx.recv() => {
                        let mut all = known.clone();
                        all.extend(follower.departed.gateways());
                        follower.load(&all).await
                    }
                    _ = sleep_until_some(next_forget) => {}
                }
            }
        });
        me
    }

    /// Add what the registry says about `gateways`. Only adds: an entry
    /// that is stale costs a push the gateway ignores, a missing one a lost
    /// push, so a reload racing a departure errs on the harmless side.
    async fn load(&self, gateways: &[Arc<str>]) {
        for g in gateways {
            match self.redis.presence_of(g).await {
                Ok(users) => {
                    for u in users {
                        self.add(Arc::from(u.as_str()), g.clone());
                    }
                }
                Err(e) => tracing::warn!(gateway = %g, error = %e, "cannot read presence"),
            }
        }
    }

    fn add(&self, user: Arc<str>, gateway: Arc<str>) {
        let mut e = self.online.entry(user).or_default();
        if !e.contains(&gateway) {
            e.push(gateway);
        }
    }

    fn remove(&self, user: &str, gateway: &str) {
        if let Some(mut e) = self.online.get_mut(user) {
            e.retain(|g| &**g != gateway);
        }
        self.online.remove_if(user, |_, v| v.is_empty());
    }

    fn forget_gateway(&self, gateway: &str) {
        self.online.retain(|_, gws| {
            gws.retain(|g| &**g != gateway);
            !gws.is_empty()
        });
        self.queues.remove(gateway);
    }

    /// Presence changes, one per line: `+ GW USER`, `- GW USER`, `reset GW`.
    fn apply(&self, payload: &str) {
        for line in payload.lines() {
            self.apply_one(line);
        }
    }

    fn apply_one(&self, payload: &str) {
        let mut parts = payload.splitn(3, ' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("+"), Some(gw), Some(user)) => self.add(user.into(), gw.into()),
            (Some("-"), Some(gw), Some(user)) => self.remove(user, gw),
            (Some("reset"), Some(gw), None) => {
                self.online.retain(|_, gws| {
                    gws.retain(|g| &**g != gw);
                    !gws.is_empty()
                });
            }
            _ => tracing::warn!(%payload, "unknown presence change"),
        }
    }

    fn queue_for(&self, gateway: &Arc<str>) -> mpsc::Sender<(PushEntry, Ack)> {
        self.queues
            .entry(gateway.clone())
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(PUSH_QUEUE);
                tokio::spawn(forward(
                    gateway.clone(),
                    rx,
                    self.http.clone(),
                    self.secret.clone(),
                ));
                tx
            })
            .clone()
    }
}

impl Presence for RemotePresence {
    fn deliver(&self, user: &str, item: &PushItem) {
        self.deliver_all(&[Arc::from(user)], item, Ack::none())
    }

    fn is_online(&self, user: &str) -> bool {
        self.online
            .get(user)
            .is_some_and(|gws| gws.iter().any(|g| !self.departed.contains(g)))
    }

    fn deliver_all(&self, users: &[Arc<str>], item: &PushItem, done: Ack) {
        let mut per: HashMap<Arc<str>, Vec<Arc<str>>> = HashMap::new();
        let mut offline = 0u64;
        for u in users {
            match self.online.get(u) {
                Some(gws) => {
                    for g in gws.iter() {
                        per.entry(g.clone()).or_default().push(u.clone());
                    }
                }
                None => offline += 1,
            }
        }
        // Recipients no gateway is known to hold: offline, or connected so
        // recently that the registry has not told this process yet (their
        // connection answers nothing until it has, so its sync finds what
        // is skipped here).
        metrics::counter!("imflow_push_skipped_offline_total").increment(offline);
        for (g, users) in per {
            let entry = PushEntry {
                conversation_id: item.conversation_id.clone(),
                seq: item.seq,
                body: item.body.clone(),
                users,
            };
            if let Err(e) = self.queue_for(&g).try_send((entry, done.clone())) {
                metrics::counter!("imflow_push_dropped_total", "gateway" => g.to_string())
                    .increment(1);
                let (_, ack) = e.into_inner();
                ack.release();
            }
        }
        done.release();
    }
}

/// Send one gateway's deliveries in order, batched while it is busy; each
/// entry's ack is released once the gateway answered (or is given up on:
/// its clients reconnect elsewhere and catch up by sync + pull).
async fn forward(
    gateway: Arc<str>,
    mut rx: mpsc::Receiver<(PushEntry, Ack)>,
    http: reqwest::Client,
    secret: Arc<str>,
) {
    let url = format!("http://{gateway}/rpc/push");
    let mut batch = Vec::with_capacity(512);
    while rx.recv_many(&mut batch, 512).await > 0 {
        let (entries, acks): (Vec<PushEntry>, Vec<Ack>) = batch.drain(..).unzip();
        let body = match serde_json::to_vec(&entries) {
            Ok(b) => Bytes::from(b),
            Err(_) => continue,
        };
        let n = entries.len();
        let mut sent = false;
        for attempt in 0..3u64 {
            let r = http
                .post(&url)
                .header(SECRET_HEADER, &*secret)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await;
            match r {
                Ok(resp) if resp.status().is_success() => {
                    sent = true;
                    break;
                }
                Ok(resp) => {
                    tracing::warn!(%gateway, status = %resp.status(), "gateway refused pushes")
                }
                Err(e) => tracing::debug!(%gateway, error = %Causes(&e), "push to gateway failed"),
            }
            tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await;
        }
        if !sent {
            metrics::counter!("imflow_push_dropped_total", "gateway" => gateway.to_string())
                .increment(n as u64);
            tracing::warn!(%gateway, messages = n, "gateway unreachable; pushes dropped");
        }
        for a in acks {
            a.release();
        }
    }
}

async fn rpc_push(
    State(s): State<RpcState>,
    headers: HeaderMap,
    Json(batch): Json<Vec<PushEntry>>,
) -> Response {
    if let Err(r) = s.check(&headers) {
        return r;
    }
    let Some(conns) = &s.conns else {
        return (StatusCode::NOT_FOUND, "this process holds no connections").into_response();
    };
    for e in batch {
        let item = PushItem {
            conversation_id: e.conversation_id,
            seq: e.seq,
            body: e.body,
        };
        for u in &e.users {
            conns.deliver(u, &item);
        }
    }
    StatusCode::NO_CONTENT.into_response()
}

// ---------------------------------------------------------------- control

#[derive(Serialize, Deserialize)]
struct Control {
    origin: String,
    user: String,
    /// More users the frame goes to (a typing event to a group).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    users: Vec<String>,
    #[serde(default)]
    platform: Option<u8>,
    #[serde(default)]
    kick: Option<String>,
    #[serde(default)]
    frame: Option<String>,
}

/// A door's link to the other doors: it keeps this gateway's entries of
/// the presence registry and carries kicks and per-user frames across.
pub struct DoorLink {
    redis: Arc<Redis>,
    me: String,
    /// The cluster's live processes (for where a user is online).
    members: watch::Receiver<Vec<Member>>,
}

impl DoorLink {
    /// For a gateway: start with an empty presence set, record every
    /// connection that opens or closes, and apply other doors' controls.
    pub async fn gateway(
        redis: Arc<Redis>,
        me: &str,
        conns: Arc<Connections>,
        members: watch::Receiver<Vec<Member>>,
        directory: Arc<dyn Directory>,
    ) -> Result<Arc<DoorLink>, imflow_stages::Error> {
        redis.presence_reset(me).await?;
        let _ = redis
            .publish(PRESENCE_CHANNEL, &format!("reset {me}"))
            .await;
        let link = Arc::new(DoorLink {
            redis: redis.clone(),
            me: me.to_string(),
            members,
        });
        conns.presence_from_cluster();
        // Presence changes anywhere reach the connections here that follow
        // them: on each event about a followed user, where is it online now?
        let (changed_tx, mut changed_rx) = mpsc::unbounded_channel::<String>();
        let follow = conns.clone();
        redis.watch_channel(PRESENCE_CHANNEL, move |payload| {
            for line in payload.unwrap_or_default().lines() {
                let mut parts = line.splitn(3, ' ');
                if let (Some("+" | "-"), Some(_), Some(user)) =
                    (parts.next(), parts.next(), parts.next())
                {
                    if follow.is_watched(user) {
                        let _ = changed_tx.send(user.to_string());
                    }
                }
            }
        });
        let (judge, judged) = (link.clone(), conns.clone());
        tokio::spawn(async move {
            while let Some(user) = changed_rx.recv().await {
                match judge.platforms(&user).await {
                    Ok(p) => judged.presence_seen(&user, &p),
                    Err(e) => tracing::warn!(error = %e, %user, "cannot read presence"),
                }
            }
        });
        let (tx, rx) = mpsc::unbounded_channel();
        conns.observe(Box::new(move |e| {
            let _ = tx.send(e);
        }));
        tokio::spawn(record_presence(link.clone(), rx, directory));
        let me_owned = me.to_string();
        let local = conns.clone();
        redis.watch_channel(CONTROL_CHANNEL, move |payload| {
            let Some(payload) = payload else { return };
            let controls = match serde_json::from_str::<Vec<Control>>(payload) {
                Ok(list) => list,
                Err(_) => match serde_json::from_str::<Control>(payload) {
                    Ok(c) => vec![c],
                    Err(e) => {
                        tracing::warn!(error = %e, "unreadable control message");
                        return;
                    }
                },
            };
            for c in controls {
                if c.origin == me_owned {
                    continue;
                }
                if let Some(reason) = &c.kick {
                    local.kick(&c.user, c.platform, reason);
                }
                if let Some(frame) = c.frame {
                    let out = Outbound::Frame(frame.into());
                    for u in std::iter::once(&c.user).chain(&c.users) {
                        local.send_to_user(u, None, &out);
                    }
                }
            }
        });
        Ok(link)
    }

    /// For the REST API process: it only publishes (and asks where users
    /// are online).
    pub fn api(
        redis: Arc<Redis>,
        me: &str,
        members: watch::Receiver<Vec<Member>>,
    ) -> Arc<DoorLink> {
        Arc::new(DoorLink {
            redis,
            me: me.to_string(),
            members,
        })
    }

    async fn control(&self, c: Control) {
        if let Ok(text) = serde_json::to_string(&c) {
            if let Err(e) = self.redis.publish(CONTROL_CHANNEL, &text).await {
                tracing::warn!(error = %e, user = %c.user, "cannot reach the other gateways");
            }
        }
    }

    /// Kick `user`'s connections on every other gateway.
    pub async fn kick(&self, user: &str, platform: Option<u8>, reason: &str) {
        self.control(Control {
            origin: self.me.clone(),
            user: user.into(),
            users: Vec::new(),
            platform,
            kick: Some(reason.into()),
            frame: None,
        })
        .await
    }

    /// Queue `frame` on the connections of `users` on every other gateway
    /// (one message on the channel, however many users).
    pub async fn frame_to(&self, users: &[&str], frame: &str) {
        let Some((first, rest)) = users.split_first() else {
            return;
        };
        self.control(Control {
            origin: self.me.clone(),
            user: first.to_string(),
            users: rest.iter().map(|u| u.to_string()).collect(),
            platform: None,
            kick: None,
            frame: Some(frame.into()),
        })
        .await
    }

    /// The platforms `user` is connected on, on any live gateway.
    pub async fn platforms(&self, user: &str) -> Result<Vec<u8>, ImError> {
        let live: Vec<String> = self
            .members
            .borrow()
            .iter()
            .filter(|m| m.role == "gateway")
            .map(|m| m.addr.clone())
            .collect();
        let mut p: Vec<u8> = self
            .redis
            .online_of(user)
            .await
            .map_err(|e| e.to_client())?
            .into_iter()
            .filter(|(g, _)| live.contains(g))
            .map(|(_, p)| p)
            .collect();
        p.sort_unstable();
        p.dedup();
        Ok(p)
    }
}

/// Record connections in the registry, many per round trip: a gateway
/// coming up takes thousands of logins within seconds, and a push process
/// misses the pushes of a user until it has heard of them.
async fn record_presence(
    link: Arc<DoorLink>,
    mut rx: mpsc::UnboundedReceiver<ConnEvent>,
    directory: Arc<dyn Directory>,
) {
    let mut batch = Vec::with_capacity(1024);
    while rx.recv_many(&mut batch, 1024).await > 0 {
        // Net effect per user, in order: the last event wins.
        let mut last: HashMap<Arc<str>, bool> = HashMap::new();
        let mut platforms: Vec<(Arc<str>, u8, bool)> = Vec::new();
        let mut seen: Vec<(Arc<str>, i64)> = Vec::new();
        let mut kicks = Vec::new();
        let mut recorded = Vec::new();
        for e in batch.drain(..) {
            match e {
                ConnEvent::Opened {
                    user,
                    platform,
                    recorded: r,
                } => {
                    recorded.push(r);
                    kicks.push(Control {
                        origin: link.me.clone(),
                        user: user.to_string(),
                        users: Vec::new(),
                        platform: Some(platform),
                        kick: Some("logged in on another device of the same platform".into()),
                        frame: None,
                    });
                    platforms.push((user.clone(), platform, true));
                    last.insert(user, true);
                }
                ConnEvent::Closed { user, platform } => platforms.push((user, platform, false)),
                ConnEvent::LastClosed { user } => {
                    seen.push((user.clone(), imflow_stages::model::now_ms()));
                    last.insert(user, false);
                }
            }
        }
        if let Some(delay) = imflow_runtime::fault::presence_delay() {
            tokio::time::sleep(delay).await;
        }
        // Registry first, then the announcement: a process that reads it
        // after hearing finds the entries.
        let changes: Vec<(&str, u8, bool)> =
            platforms.iter().map(|(u, p, on)| (&**u, *p, *on)).collect();
        let mut retrying = Retrying::new("recording presence", Duration::from_secs(2));
        while let Err(err) = link.redis.online_update(&link.me, &changes).await {
            retrying.failed(err).await;
        }
        for online in [true, false] {
            let users: Vec<&str> = last
                .iter()
                .filter(|(_, o)| **o == online)
                .map(|(u, _)| &**u)
                .collect();
            if users.is_empty() {
                continue;
            }
            let mut retrying = Retrying::new("recording presence", Duration::from_secs(2));
            while let Err(err) = link.redis.presence_set(&link.me, &users, online).await {
                retrying.failed(err).await;
            }
            let sign = if online { "+" } else { "-" };
            let lines: Vec<String> = users
                .iter()
                .map(|u| format!("{sign} {} {u}", link.me))
                .collect();
            let text = lines.join("\n");
            let mut retrying = Retrying::new("announcing presence", Duration::from_secs(2));
            while let Err(err) = link.redis.publish(PRESENCE_CHANNEL, &text).await {
                retrying.failed(err).await;
            }
        }
        // The push processes have been told (or read the registry when
        // their subscription comes back): the connections may now answer.
        for r in recorded {
            r.done();
        }
        if !seen.is_empty() {
            // Off the loop: a slow MySQL must not hold up the next batch of
            // connections waiting to be recorded.
            let directory = directory.clone();
            tokio::spawn(async move {
                if let Err(e) = directory.set_last_seen(&seen).await {
                    tracing::warn!(error = %e, "last seen times not recorded");
                }
            });
        }
        if !kicks.is_empty() {
            if let Ok(text) = serde_json::to_string(&kicks) {
                if let Err(e) = link.redis.publish(CONTROL_CHANNEL, &text).await {
                    tracing::warn!(error = %e, "cannot reach the other gateways");
                }
            }
        }
    }
}

// ---------------------------------------------------------------- server

/// What a process's internal port serves.
#[derive(Clone)]
pub struct RpcState {
    pub secret: Arc<str>,
    /// Serves in a process that runs an `ingest` stage.
    pub ingest: Door,
    /// Set in a gateway.
    pub conns: Option<Arc<Connections>>,
    pub metrics: Arc<dyn Fn() -> String + Send + Sync>,
    pub draining: CancellationToken,
    /// `/reload`: this process re-reads its config and pipeline.
    pub reload: Option<crate::reload::Reloader>,
}

impl RpcState {
    #[allow(clippy::result_large_err)]
    fn check(&self, headers: &HeaderMap) -> Result<(), Response> {
        use subtle::ConstantTimeEq;
        // Compared in constant time: the answer's timing must not tell how
        // much of a guess was right.
        match headers.get(SECRET_HEADER) {
            Some(v) if bool::from(v.as_bytes().ct_eq(self.secret.as_bytes())) => Ok(()),
            _ => {
                metrics::counter!("imflow_rpc_refused_total").increment(1);
                Err((StatusCode::FORBIDDEN, "wrong or missing cluster secret").into_response())
            }
        }
    }
}

/// The internal port of a cluster process: `/rpc/send` (ingest processes),
/// `/rpc/push` (gateways), `/healthz` and `/metrics` (every process).
pub fn rpc_router(state: RpcState) -> Router {
    Router::new()
        .route("/rpc/send", post(rpc_send))
        .route("/rpc/push", post(rpc_push))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .route("/tap", get(rpc_tap))
        .route("/reload", post(rpc_reload))
        .with_state(state)
}

async fn healthz(State(s): State<RpcState>) -> Response {
    if s.draining.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else {
        "ok".into_response()
    }
}

async fn rpc_reload(State(s): State<RpcState>, headers: HeaderMap) -> Response {
    if let Err(r) = s.check(&headers) {
        return r;
    }
    crate::reload::answer(s.reload.as_ref()).await
}

async fn rpc_tap(
    State(s): State<RpcState>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<crate::tap::TapQuery>,
) -> Response {
    if let Err(r) = s.check(&headers) {
        return r;
    }
    crate::tap::follow(q.conversation)
}

async fn metrics_text(State(s): State<RpcState>) -> String {
    (s.metrics)()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gateway_missing_from_the_members_is_forgotten_only_after_its_grace() {
        let t0 = tokio::time::Instant::now();
        let s = Duration::from_secs;
        let (a, b): (Arc<str>, Arc<str>) = ("10.0.0.1:10140".into(), "10.0.0.2:10140".into());
        let both = [a.clone(), b.clone()];
        let only_b = [b];
        let d = Departures::default();
        assert!(d.update(t0, &[], &both).is_empty());
        assert_eq!(d.next_forget(), None);
        // `a`'s lease lapses: nothing forgotten yet, a deadline set.
        assert!(d.update(t0 + s(1), &both, &only_b).is_empty());
        assert_eq!(d.next_forget(), Some(t0 + s(1) + GATEWAY_GRACE));
        assert!(d.contains(&a) && !d.contains(&only_b[0]));
        assert_eq!(d.gateways(), vec![a.clone()]);
        // It announces itself again within the grace: it never left.
        assert!(d.update(t0 + s(10), &only_b, &both).is_empty());
        assert_eq!(d.next_forget(), None);
        assert!(d.update(t0 + s(100), &both, &both).is_empty());
        // Gone for good: forgotten once, when its grace is over.
        assert!(d.update(t0 + s(101), &both, &only_b).is_empty());
        assert!(d
            .update(t0 + s(101) + GATEWAY_GRACE - s(1), &only_b, &only_b)
            .is_empty());
        assert_eq!(
            d.update(t0 + s(101) + GATEWAY_GRACE, &only_b, &only_b),
            vec![a.clone()]
        );
        assert_eq!(d.next_forget(), None);
        assert!(d.update(t0 + s(500), &only_b, &only_b).is_empty());
    }
}
