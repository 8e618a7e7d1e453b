//! The ideal relay: the ceiling imflow is measured against (`--baseline`).
//!
//! It speaks what the load scenarios use of PROTOCOL.md, with the same
//! frames, and nothing more: `send` is answered by `ack` and pushed to
//! every connection of every participant (the sender's included, as
//! PROTOCOL.md says), the setup's REST calls are accepted. No auth (a
//! token is the user id), no storage, no dedup, no limits: seqs are
//! counters in memory. A push is rendered once however many connections
//! get it, and each connection's writer sends what is queued in one flush.
//! What imflow costs beyond this is the price of its promises.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use dashmap::DashMap;
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

type Outbox = mpsc::UnboundedSender<Utf8Bytes>;

#[derive(Default)]
struct Relay {
    /// user → (connection id, its writer's queue).
    conns: DashMap<Arc<str>, Vec<(u64, Outbox)>>,
    groups: DashMap<String, Arc<RwLock<Vec<Arc<str>>>>>,
    /// conversation → last seq. Its entry is held while a message is
    /// numbered and queued, so pushes leave in seq order.
    seqs: DashMap<String, u64>,
    next_id: AtomicU64,
}

/// Where the relay listens, once bound.
pub struct Bound {
    pub api: SocketAddr,
    pub ws: SocketAddr,
}

/// Bind both listeners and serve until the process ends.
pub async fn serve(
    api: SocketAddr,
    ws: SocketAddr,
    on_bound: impl FnOnce(&Bound),
) -> anyhow::Result<()> {
    let relay = Arc::new(Relay::default());
    let api_l = TcpListener::bind(api).await?;
    let ws_l = TcpListener::bind(ws).await?;
    on_bound(&Bound {
        api: api_l.local_addr()?,
        ws: ws_l.local_addr()?,
    });
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/auth/register", post(register))
        .route("/auth/token", post(token))
        .route("/groups", post(create_group))
        .route("/groups/{group_id}/members", post(add_members))
        .with_state(relay.clone());
    let rest = tokio::spawn(async move { axum::serve(api_l, app).await });
    loop {
        let (tcp, _) = ws_l.accept().await?;
        let relay = relay.clone();
        // A failed handshake or a dropped connection is the load
        // generator's business (it counts what was lost), not the relay's.
        tokio::spawn(async move { connection(relay, tcp).await });
        if rest.is_finished() {
            anyhow::bail!("the relay's REST listener stopped");
        }
    }
}

async fn register(Json(body): Json<Value>) -> Json<Value> {
    let n = body["users"].as_array().map_or(0, Vec::len);
    Json(json!({"registered": n}))
}

async fn token(Json(body): Json<Value>) -> Result<Json<Value>, StatusCode> {
    let user = body["user_id"].as_str().ok_or(StatusCode::BAD_REQUEST)?;
    Ok(Json(json!({"token": user, "expires_at": 0})))
}

fn bearer(headers: &HeaderMap) -> Option<Arc<str>> {
    headers
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(Arc::from)
}

#[derive(Deserialize)]
struct NewGroup {
    group_id: String,
    #[serde(default)]
    members: Vec<String>,
}

async fn create_group(
    State(relay): State<Arc<Relay>>,
    headers: HeaderMap,
    Json(g): Json<NewGroup>,
) -> Result<(StatusCode, Json<Value>), StatusCode> {
    let owner = bearer(&headers).ok_or(StatusCode::UNAUTHORIZED)?;
    let mut members = vec![owner];
    members.extend(g.members.iter().map(|m| Arc::from(m.as_str())));
    relay
        .groups
        .insert(g.group_id.clone(), Arc::new(RwLock::new(members)));
    Ok((StatusCode::CREATED, Json(json!({"group_id": g.group_id}))))
}

#[derive(Deserialize)]
struct NewMembers {
    user_ids: Vec<String>,
}

async fn add_members(
    State(relay): State<Arc<Relay>>,
    Path(group_id): Path<String>,
    Json(body): Json<NewMembers>,
) -> Result<Json<Value>, StatusCode> {
    let group = relay
        .groups
        .get(&group_id)
        .map(|g| g.clone())
        .ok_or(StatusCode::NOT_FOUND)?;
    let mut members = group
        .write()
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    members.extend(body.user_ids.iter().map(|m| Arc::from(m.as_str())));
    Ok(Json(json!({"added": body.user_ids.len()})))
}

/// One WebSocket client: `?token=USER` names it.
async fn connection(relay: Arc<Relay>, tcp: tokio::net::TcpStream) -> anyhow::Result<()> {
    tcp.set_nodelay(true)?;
    let mut user: Option<Arc<str>> = None;
    // Small read buffers, as a server holding many idle connections uses
    // (tungstenite's default, 128 KiB each, would make 10k idle connections
    // cost 1.3 GiB); writes are flushed per batch by the writer below.
    let config = WebSocketConfig::default()
        .read_buffer_size(2048)
        .write_buffer_size(16 * 1024);
    // The handshake callback's error type is fixed by tungstenite.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        user = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")))
            .map(Arc::from);
        Ok(resp)
    };
    let ws = tokio_tungstenite::accept_hdr_async_with_config(tcp, callback, Some(config)).await?;
    let user = user.ok_or_else(|| anyhow::anyhow!("no token"))?;
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Utf8Bytes>();
    let id = relay.next_id.fetch_add(1, Ordering::Relaxed);
    relay
        .conns
        .entry(user.clone())
        .or_default()
        .push((id, tx.clone()));
    let writer = tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            if sink.feed(Message::Text(first)).await.is_err() {
                return;
            }
            while let Ok(more) = rx.try_recv() {
                if sink.feed(Message::Text(more)).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    while let Some(Ok(msg)) = stream.next().await {
        if let Message::Text(text) = msg {
            let reply = relay.frame(&user, text.as_str());
            let _ = tx.send(reply.into());
        }
    }
    if let Some(mut mine) = relay.conns.get_mut(&user) {
        mine.retain(|(c, _)| *c != id);
    }
    writer.abort();
    Ok(())
}

#[derive(Deserialize)]
struct Frame<'a> {
    op: &'a str,
    #[serde(default)]
    rid: Option<&'a str>,
    #[serde(default)]
    client_msg_id: Option<&'a str>,
    #[serde(default)]
    recv_id: Option<&'a str>,
    #[serde(default)]
    group_id: Option<&'a str>,
    #[serde(default)]
    content_type: i64,
    #[serde(default, borrow)]
    content: Option<&'a RawValue>,
}

#[derive(Serialize)]
struct Push<'a> {
    op: &'static str,
    messages: [Pushed<'a>; 1],
}

#[derive(Serialize)]
struct Ack<'a> {
    op: &'static str,
    rid: Option<&'a str>,
    server_msg_id: &'a str,
    conversation_id: &'a str,
    send_time: i64,
}

#[derive(Serialize)]
struct Pushed<'a> {
    conversation_id: &'a str,
    seq: u64,
    server_msg_id: &'a str,
    client_msg_id: &'a str,
    sender: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    recv_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    group_id: Option<&'a str>,
    content_type: i64,
    content: Option<&'a RawValue>,
    send_time: i64,
}

impl Relay {
    /// The reply to one client frame (pushes are queued on the way).
    fn frame(&self, sender: &Arc<str>, text: &str) -> String {
        let f: Frame<'_> = match serde_json::from_str(text) {
            Ok(f) => f,
            Err(e) => return error(None, &e.to_string()),
        };
        match f.op {
            "ping" => json!({"op": "pong", "rid": f.rid}).to_string(),
            "send" => self.send(sender, &f),
            other => error(f.rid, &format!("the relay does not do `{other}`")),
        }
    }

    fn send(&self, sender: &Arc<str>, f: &Frame<'_>) -> String {
        let Some(client_msg_id) = f.client_msg_id else {
            return error(f.rid, "client_msg_id is missing");
        };
        let (conversation, members) = match (f.recv_id, f.group_id) {
            (Some(to), None) => {
                let (a, b) = if **sender <= *to {
                    (&**sender, to)
                } else {
                    (to, &**sender)
                };
                (
                    format!("si_{a}_{b}"),
                    vec![sender.clone(), Arc::<str>::from(to)],
                )
            }
            (None, Some(g)) => match self.groups.get(g) {
                Some(group) => {
                    let members = group.read().map(|m| m.clone()).unwrap_or_default();
                    (format!("sg_{g}"), members)
                }
                None => return error(f.rid, "no such group"),
            },
            _ => return error(f.rid, "recv_id or group_id, one of them"),
        };
        let outboxes: Vec<Outbox> = members
            .iter()
            .filter_map(|m| self.conns.get(m))
            .flat_map(|c| c.iter().map(|(_, tx)| tx.clone()).collect::<Vec<_>>())
            .collect();
        let server_msg_id = format!("{:016x}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let send_time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        {
            let mut seq = self.seqs.entry(conversation.clone()).or_insert(0);
            *seq += 1;
            let message = Pushed {
                conversation_id: &conversation,
                seq: *seq,
                server_msg_id: &server_msg_id,
                client_msg_id,
                sender,
                recv_id: f.recv_id,
                group_id: f.group_id,
                content_type: f.content_type,
                content: f.content,
                send_time,
            };
            let push: Utf8Bytes = serde_json::to_string(&Push {
                op: "push",
                messages: [message],
            })
            .unwrap_or_default()
            .into();
            for tx in &outboxes {
                let _ = tx.send(push.clone());
            }
        }
        serde_json::to_string(&Ack {
            op: "ack",
            rid: f.rid,
            server_msg_id: &server_msg_id,
            conversation_id: &conversation,
            send_time,
        })
        .unwrap_or_default()
    }
}

fn error(rid: Option<&str>, message: &str) -> String {
    json!({"op": "error", "rid": rid, "code": "bad_request", "message": message}).to_string()
}
