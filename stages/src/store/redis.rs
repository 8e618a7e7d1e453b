//! Redis in cluster mode: seq counters, the hot message cache, resend keys
//! and the token-revocation cache, on one server or a Redis Cluster.
//!
//! Keys are `PREFIX:kind:…`. Everything of one conversation carries the
//! conversation id as a hash tag (`{si_a_b}`), so a conversation's counter,
//! its replay marks and its cache live in one slot and one Lua script can
//! touch them atomically, on a Redis Cluster too.
//!
//! Nothing here is the only copy of anything: counters are rebuilt from the
//! history, the cache is refilled by new messages and falls back to the
//! history, resend keys bound how long a resend is recognised.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::join_all;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Script, Value};

use super::{unknown_conversations, History, Hot, SeqMemory, Sequencer};
use crate::error::{Error, Result};
use crate::model::{now_ms, AckInfo, Sequenced, Stamped};

/// Where Redis is and how long its keys live.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `host:port` of one server, or of Redis Cluster nodes.
    pub addrs: Vec<String>,
    pub cluster: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Namespace of every key, so several deployments can share a server.
    pub prefix: String,
    /// Messages kept per conversation in the hot cache.
    pub hot_keep: usize,
    /// A conversation's cache is dropped after this long without a message.
    pub hot_ttl: Duration,
    /// How long a (sender, client_msg_id) is recognised as a resend.
    pub resend_ttl: Duration,
    /// How long a replayed message is recognised by its server_msg_id. A
    /// replay comes from a consumer that died with offsets uncommitted, once
    /// its partitions are taken over (seconds) or it restarts; marks cost
    /// ~100 bytes per message for this long.
    pub replay_ttl: Duration,
    /// A resend claim still pending after this long is taken over (its
    /// first sender, or the ingest process it went through, died before the
    /// message was durable). Safe even if the first copy is only slow: the
    /// takeover reuses its server_msg_id, which seq-assign recognises, so
    /// both copies become one message; a shorter wait only risks that
    /// duplicate work.
    pub resend_takeover: Duration,
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            addrs: vec!["127.0.0.1:16379".into()],
            cluster: false,
            username: None,
            password: None,
            prefix: "imflow".into(),
            hot_keep: 64,
            hot_ttl: Duration::from_secs(3 * 24 * 3600),
            resend_ttl: Duration::from_secs(24 * 3600),
            replay_ttl: Duration::from_secs(600),
            resend_takeover: Duration::from_secs(10),
        }
    }
}

/// One connection to a server or a cluster; both multiplex, so clones share
/// the socket(s) and concurrent requests are pipelined.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }
    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }
    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

pub struct Redis {
    conn: Conn,
    /// Where subscriptions connect (any node: a Redis Cluster broadcasts
    /// PUBLISH to every node).
    subscribe_url: String,
    settings: RedisSettings,
    seq_script: Script,
    stored_script: Script,
    claim_script: Script,
    failed_script: Script,
    raise_script: Script,
    hot_script: Script,
    /// This process's name on its resend claims; it keeps a key alive
    /// (`PREFIX:alive:OWNER`) while it runs, so a claim whose owner died is
    /// taken over within [`ALIVE_TTL_SECS`] rather than after the takeover
    /// time.
    owner: String,
    heartbeat: std::sync::OnceLock<()>,
    /// The heartbeat task stops when this handle is dropped.
    running: Arc<()>,
}

/// How long a claim's owner counts as alive after its last heartbeat.
const ALIVE_TTL_SECS: u64 = 3;

const SEQ_LUA: &str = r#"
-- KEYS[1]: the conversation's counter; KEYS[2]: its seqs in flight (a sorted
-- set: handed out, not yet known stored, and the highest seq known stored,
-- see STORED_LUA); KEYS[3..]: one replay mark per
-- message. ARGV[1]: floor; ARGV[2]: mode; ARGV[3]: TTL (s) of marks and of
-- the in-flight set; ARGV[4]: most seqs kept in flight per conversation.
--   set:      the floor is the history's max: the counter becomes it, or
--             the highest seq still in flight above it (a counter behind
--             the history would hand out stored seqs; one ahead of it would
--             leave a hole, unless what is ahead is still on its way)
--   raise:    the counter is raised to the floor (the last seq the task
--             gave); a missing counter is refused ({-1}) so the caller
--             reads the history first
--   reassign: raise, and give every message a new seq (its seq was found
--             taken in the history): ARGV[5..] are the taken seqs, one per
--             message. A message whose mark already points at another seq
--             than the one taken (another copy of it, replayed after a
--             rebalance, was given one) keeps that: two copies of one
--             message must never become two messages.
local cur = redis.call('GET', KEYS[1])
local floor = tonumber(ARGV[1])
local mode = ARGV[2]
local function above_in_flight(n)
  local top = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
  if top[2] and tonumber(top[2]) > n then return tonumber(top[2]) end
  return n
end
if mode == 'set' then
  cur = above_in_flight(floor)
elseif not cur then
  if mode == 'raise' then return {-1} end
  cur = above_in_flight(floor)
else
  cur = math.max(tonumber(cur), floor)
end
local out = {}
local added = false
for i = 3, #KEYS do
  local had = redis.call('GET', KEYS[i])
  if had and mode == 'reassign' and tonumber(had) == tonumber(ARGV[i + 2]) then
    had = false
  end
  if had then
    out[#out + 1] = tonumber(had)
  else
    cur = cur + 1
    redis.call('SET', KEYS[i], cur, 'EX', ARGV[3])
    redis.call('ZADD', KEYS[2], cur, cur)
    added = true
    out[#out + 1] = cur
  end
end
if added then
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[4]) + 1))
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
redis.call('SET', KEYS[1], cur)
return out
"#;

const STORED_LUA: &str = r#"
-- KEYS[1]: a conversation's seqs in flight (see SEQ_LUA); ARGV[1]: the
-- highest seq of a batch the history has just stored; ARGV[2]: TTL (s).
-- Seqs up to it are no longer in flight; it stays as a lower bound, so a
-- task that read an older history max just before cannot start below it.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"#;

const HOT_LUA: &str = r#"
-- KEYS[1]: a conversation's hot cache (sorted set, score = seq).
-- ARGV[1]: messages kept; ARGV[2]: TTL (s); then seq, body pairs in seq
-- order. Only messages above the highest cached seq are added: a message
-- replayed from Kafka after a crash never brings back a body replaced
-- since (a revoke) nor a second body at one seq.
local top = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
local max = -1
if top[2] then max = tonumber(top[2]) end
for i = 3, #ARGV, 2 do
  local seq = tonumber(ARGV[i])
  if seq > max then
    redis.call('ZADD', KEYS[1], seq, ARGV[i + 1])
    max = seq
  end
end
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[1]) + 1))
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"#;

const CLAIM_LUA: &str = r#"
-- KEYS[1]: the resend key. ARGV[1]: pending value 'p:<ms>:<owner>:<json>';
-- ARGV[2]: TTL (s); ARGV[3]: now (ms); ARGV[4]: takeover after (ms);
-- ARGV[5]: this owner; ARGV[6]: an owner known dead ('' if none).
-- Values: 'p:' pending, 'd:' durable, 'f:' failed with an unknown outcome
-- (taken over at once, with the first's ids). A value written before
-- owners were recorded ('p:<ms>:<json>') has none.
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return {'new', ARGV[1]}
end
local function json_of(value)
  local rest = string.match(value, '^%a:%d+:(.*)$')
  if string.sub(rest, 1, 1) ~= '{' then
    rest = string.match(rest, '^[^:]*:(.*)$')
  end
  return rest
end
local function take()
  local nv = 'p:' .. ARGV[3] .. ':' .. ARGV[5] .. ':' .. json_of(v)
  redis.call('SET', KEYS[1], nv, 'EX', ARGV[2])
  return {'takeover', nv}
end
if string.sub(v, 1, 1) == 'f' then
  return take()
end
if string.sub(v, 1, 1) == 'p' then
  local at = tonumber(string.match(v, '^p:(%d+):'))
  if at and tonumber(ARGV[3]) - at > tonumber(ARGV[4]) then
    return take()
  end
  if ARGV[6] ~= '' and string.match(v, '^p:%d+:([^:{]*):') == ARGV[6] then
    return take()
  end
end
return {'held', v}
"#;

const RAISE_LUA: &str = r#"
-- KEYS[1]: a cached number; ARGV[1]: a value; ARGV[2]: TTL (s). Keeps the
-- larger of the two.
local cur = redis.call('GET', KEYS[1])
if (not cur) or tonumber(cur) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 1
end
return 0
"#;

const FAILED_LUA: &str = r#"
-- KEYS[1]: the resend key; ARGV[1]: the claim's token
-- ('p:<ms>:<owner>:<json>'); ARGV[2]: TTL (s); ARGV[3]: now (ms).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  local json = string.match(ARGV[1], '^p:%d+:[^:{]*:(.*)$')
  if not json then json = string.match(ARGV[1], '^p:%d+:(.*)$') end
  redis.call('SET', KEYS[1], 'f:' .. ARGV[3] .. ':' .. json, 'EX', ARGV[2])
  return 1
end
return 0
"#;

/// The JSON of a claim's value (`X:<ms>:[<owner>:]<json>`).
fn claim_json(v: &str) -> &str {
    let rest = v.splitn(3, ':').nth(2).unwrap_or_default();
    if rest.starts_with('{') {
        rest
    } else {
        rest.split_once(':').map(|(_, j)| j).unwrap_or_default()
    }
}

/// The owner of a pending claim, if it names one.
fn claim_owner(v: &str) -> Option<&str> {
    let rest = v.strip_prefix("p:")?.split_once(':')?.1;
    let (owner, _) = rest.split_once(':')?;
    (!owner.is_empty() && !owner.contains('{')).then_some(owner)
}

/// What a resend claim found.
pub enum ResendClaim {
    /// First sight: the message may go on; `token` releases the claim.
    New { token: String },
    /// A claim of a sender that gave up: go on with the first's ids.
    TakeOver { first: AckInfo, token: String },
    /// The first message is durable: answer with its ids.
    Durable(AckInfo),
    /// The first message is on its way: ask again shortly.
    Pending,
}

impl Redis {
    /// Connect and check the server answers, within 10 s; errors name the
    /// setting to fix.
    pub async fn connect(settings: RedisSettings) -> Result<Arc<Redis>> {
        let urls: Vec<String> = settings
            .addrs
            .iter()
            .map(|a| {
                let auth = match (&settings.username, &settings.password) {
                    (Some(u), Some(p)) => {
                        format!("{}:{}@", super::url_escape(u), super::url_escape(p))
                    }
                    (None, Some(p)) => format!(":{}@", super::url_escape(p)),
                    _ => String::new(),
                };
                format!("redis://{auth}{a}")
            })
            .collect();
        let what = settings.addrs.join(", ");
        let fail = |e: String| Error::Backend(format!("redis.dbAddress ({what}): {e}"));
        let timeout = Duration::from_secs(10);
        let conn = if settings.cluster {
            let client = redis::cluster::ClusterClient::builder(urls.clone())
                .connection_timeout(Duration::from_secs(5))
                .response_timeout(Duration::from_secs(5))
                .build()
                .map_err(|e| fail(e.to_string()))?;
            let c = tokio::time::timeout(timeout, client.get_async_connection())
                .await
                .map_err(|_| fail("no answer within 10 s".into()))?
                .map_err(|e| fail(e.to_string()))?;
            Conn::Cluster(c)
        } else {
            let url = urls
                .first()
                .ok_or_else(|| fail("no address given".into()))?;
            let client = redis::Client::open(url.as_str()).map_err(|e| fail(e.to_string()))?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(5)))
                .set_response_timeout(Some(Duration::from_secs(5)))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_secs(1));
            let c =
                tokio::time::timeout(timeout, ConnectionManager::new_with_config(client, config))
                    .await
                    .map_err(|_| fail("no answer within 10 s".into()))?
                    .map_err(|e| fail(e.to_string()))?;
            Conn::Single(c)
        };
        let mut probe = conn.clone();
        let pong: String =
            tokio::time::timeout(timeout, redis::cmd("PING").query_async(&mut probe))
                .await
                .map_err(|_| fail("no answer to PING within 10 s".into()))?
                .map_err(|e| fail(e.to_string()))?;
        tracing::info!(addrs = %what, cluster = settings.cluster, %pong, "redis connected");
        let subscribe_url = urls.first().cloned().unwrap_or_default();
        Ok(Arc::new(Redis {
            conn,
            subscribe_url,
            settings,
            seq_script: Script::new(SEQ_LUA),
            stored_script: Script::new(STORED_LUA),
            claim_script: Script::new(CLAIM_LUA),
            failed_script: Script::new(FAILED_LUA),
            raise_script: Script::new(RAISE_LUA),
            hot_script: Script::new(HOT_LUA),
            owner: crate::model::new_server_msg_id(),
            heartbeat: std::sync::OnceLock::new(),
            running: Arc::new(()),
        }))
    }

    pub fn settings(&self) -> &RedisSettings {
        &self.settings
    }

    fn conn(&self) -> Conn {
        self.conn.clone()
    }

    fn key(&self, kind: &str, conversation: &str) -> String {
        format!("{}:{kind}:{{{conversation}}}", self.settings.prefix)
    }

    fn resend_key(&self, sender: &str, client_msg_id: &str) -> String {
        format!("{}:resend:{sender}:{client_msg_id}", self.settings.prefix)
    }

    fn generation_key(&self, user: &str, platform: u8) -> String {
        format!("{}:tokgen:{user}:{platform}", self.settings.prefix)
    }

    fn alive_key(&self, owner: &str) -> String {
        format!("{}:alive:{owner}", self.settings.prefix)
    }

    /// Keep this process's owner key alive from its first claim on (only
    /// processes that claim need one), until this handle is dropped. The
    /// first claim waits for the key: a claim must never name an owner that
    /// looks dead.
    async fn beat(&self) -> Result<()> {
        if self.heartbeat.get().is_some() {
            return Ok(());
        }
        let _: () = redis::cmd("SET")
            .arg(self.alive_key(&self.owner))
            .arg(1)
            .arg("EX")
            .arg(ALIVE_TTL_SECS)
            .query_async(&mut self.conn())
            .await?;
        self.heartbeat.get_or_init(|| {
            let conn = self.conn();
            let key = self.alive_key(&self.owner);
            let running = Arc::downgrade(&self.running);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
                while running.upgrade().is_some() {
                    tick.tick().await;
                    // Well within the key's life: a slow beat must not
                    // hold back the next one. (A Redis stalled for longer
                    // than the key lives makes live owners look dead; their
                    // claims are then taken over, which costs duplicate work
                    // only: the takeover keeps the first's ids.)
                    let set = tokio::time::timeout(
                        std::time::Duration::from_secs(1),
                        redis::cmd("SET")
                            .arg(&key)
                            .arg(1)
                            .arg("EX")
                            .arg(ALIVE_TTL_SECS)
                            .query_async::<()>(&mut conn.clone()),
                    )
                    .await;
                    match set {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::warn!(error = %e, "resend owner heartbeat failed"),
                        Err(_) => tracing::warn!("resend owner heartbeat took over 1 s"),
                    }
                }
            });
        });
        Ok(())
    }

    /// Claim the resend key of `msg` before it enters the pipeline. A claim
    /// held by a process that is no longer alive is taken over at once.
    pub async fn claim_resend(&self, msg: &Stamped) -> Result<ResendClaim> {
        self.beat().await?;
        let key = self.resend_key(&msg.sender, &msg.client_msg_id);
        let info = msg.ack_info();
        let json = serde_json::to_string(&info).map_err(|e| Error::Backend(e.to_string()))?;
        let mut dead = String::new();
        loop {
            let now = now_ms();
            let pending = format!("p:{now}:{}:{json}", self.owner);
            let (state, value): (String, String) = self
                .claim_script
                .key(&key)
                .arg(&pending)
                .arg(self.settings.resend_ttl.as_secs().max(1))
                .arg(now)
                .arg(self.settings.resend_takeover.as_millis() as u64)
                .arg(&self.owner)
                .arg(&dead)
                .invoke_async(&mut self.conn())
                .await?;
            let parsed = |v: &str| -> Result<AckInfo> {
                serde_json::from_str(claim_json(v))
                    .map_err(|e| Error::Backend(format!("resend key: {e}")))
            };
            return Ok(match state.as_str() {
                "new" => ResendClaim::New { token: value },
                "takeover" => ResendClaim::TakeOver {
                    first: parsed(&value)?,
                    token: value,
                },
                _ if value.starts_with("d:") => ResendClaim::Durable(parsed(&value)?),
                _ => match claim_owner(&value) {
                    // Asked once per claim: the script checks the owner again.
                    Some(owner) if dead.is_empty() && owner != self.owner => {
                        let alive: bool = redis::cmd("EXISTS")
                            .arg(self.alive_key(owner))
                            .query_async(&mut self.conn())
                            .await?;
                        if alive {
                            ResendClaim::Pending
                        } else {
                            dead = owner.to_string();
                            continue;
                        }
                    }
                    _ => ResendClaim::Pending,
                },
            });
        }
    }

    /// The message of a claim is durable: resends now get its ids at once.
    pub async fn resend_durable(
        &self,
        sender: &str,
        client_msg_id: &str,
        info: &AckInfo,
    ) -> Result<()> {
        let json = serde_json::to_string(info).map_err(|e| Error::Backend(e.to_string()))?;
        let _: () = redis::cmd("SET")
            .arg(self.resend_key(sender, client_msg_id))
            .arg(format!("d:{}:{json}", now_ms()))
            .arg("EX")
            .arg(self.settings.resend_ttl.as_secs().max(1))
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// The message of a claim failed with an unknown outcome (a write that
    /// timed out may still have reached the broker): a resend goes on at
    /// once, but with the first's server_msg_id, so if the first was stored
    /// after all, the two are one message (seq-assign recognises the id).
    pub async fn resend_failed(
        &self,
        sender: &str,
        client_msg_id: &str,
        token: &str,
    ) -> Result<()> {
        let _: i64 = self
            .failed_script
            .key(self.resend_key(sender, client_msg_id))
            .arg(token)
            .arg(self.settings.resend_ttl.as_secs().max(1))
            .arg(now_ms())
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Tell every process that `group_id` changed (their cached snapshots
    /// are dropped).
    pub async fn publish_group_changed(&self, group_id: &str) -> Result<()> {
        self.publish("groups-changed", group_id).await
    }

    /// Call `changed(Some(group))` for every group another process changed,
    /// and `changed(None)` whenever the subscription was (re)established,
    /// when changes may have been missed. Runs until the process ends.
    pub fn watch_groups(self: &Arc<Self>, changed: impl Fn(Option<&str>) + Send + 'static) {
        self.watch_channel("groups-changed", changed)
    }

    fn channel(&self, name: &str) -> String {
        format!("{}:{name}", self.settings.prefix)
    }

    /// Publish `payload` on the cluster channel `name` (prefixed).
    pub async fn publish(&self, name: &str, payload: &str) -> Result<()> {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(self.channel(name))
            .arg(payload)
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Call `heard(Some(payload))` for every message on the cluster channel
    /// `name`, and `heard(None)` whenever the subscription was
    /// (re)established, when messages may have been missed. Runs until the
    /// process ends.
    pub fn watch_channel(
        self: &Arc<Self>,
        name: &str,
        heard: impl Fn(Option<&str>) + Send + 'static,
    ) {
        let me = self.clone();
        let channel = self.channel(name);
        tokio::spawn(async move {
            use futures::StreamExt;
            let mut backoff = Duration::from_millis(100);
            loop {
                let subscribed = async {
                    let client = redis::Client::open(me.subscribe_url.as_str())?;
                    let mut pubsub = client.get_async_pubsub().await?;
                    pubsub.subscribe(&channel).await?;
                    Ok::<_, redis::RedisError>(pubsub)
                }
                .await;
                match subscribed {
                    Ok(pubsub) => {
                        backoff = Duration::from_millis(100);
                        heard(None);
                        let mut messages = pubsub.into_on_message();
                        while let Some(m) = messages.next().await {
                            if let Ok(payload) = m.get_payload::<String>() {
                                heard(Some(&payload));
                            }
                        }
                        tracing::warn!(%channel, "subscription lost; resubscribing");
                    }
                    Err(e) => {
                        tracing::warn!(%channel, error = %e, "cannot subscribe; retrying");
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
    }

    fn presence_key(&self, gateway: &str) -> String {
        format!("{}:presence:{{{gateway}}}", self.settings.prefix)
    }

    /// Forget every user of `gateway` (it starts with no connections).
    pub async fn presence_reset(&self, gateway: &str) -> Result<()> {
        let users = self.presence_of(gateway).await?;
        let gone: Vec<(&str, u8, bool)> = users
            .iter()
            .flat_map(|u| (1..=9u8).map(move |p| (u.as_str(), p, false)))
            .collect();
        for chunk in gone.chunks(900) {
            self.online_update(gateway, chunk).await?;
        }
        let _: i64 = redis::cmd("DEL")
            .arg(self.presence_key(gateway))
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Record that `users` are (`online`) or are no longer on `gateway`.
    pub async fn presence_set(&self, gateway: &str, users: &[&str], online: bool) -> Result<()> {
        if users.is_empty() {
            return Ok(());
        }
        let _: i64 = redis::cmd(if online { "SADD" } else { "SREM" })
            .arg(self.presence_key(gateway))
            .arg(users)
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// The users with a connection on `gateway`.
    pub async fn presence_of(&self, gateway: &str) -> Result<Vec<String>> {
        Ok(redis::cmd("SMEMBERS")
            .arg(self.presence_key(gateway))
            .query_async(&mut self.conn())
            .await?)
    }

    fn online_key(&self, user: &str) -> String {
        format!("{}:online:{{{user}}}", self.settings.prefix)
    }

    /// Record that `user` is (`on`) or no longer is connected on `platform`
    /// through `gateway`: a hash per user, field `GATEWAY|PLATFORM`, so any
    /// door can say where a user is online.
    pub async fn online_update(&self, gateway: &str, changes: &[(&str, u8, bool)]) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut p = redis::pipe();
        for (user, platform, on) in changes {
            let field = format!("{gateway}|{platform}");
            if *on {
                p.cmd("HSET")
                    .arg(self.online_key(user))
                    .arg(field)
                    .arg(1)
                    .ignore();
            } else {
                p.cmd("HDEL").arg(self.online_key(user)).arg(field).ignore();
            }
        }
        let _: () = p.query_async(&mut self.conn()).await?;
        Ok(())
    }

    /// Where `user` is connected: (gateway, platform) pairs.
    pub async fn online_of(&self, user: &str) -> Result<Vec<(String, u8)>> {
        let fields: Vec<String> = redis::cmd("HKEYS")
            .arg(self.online_key(user))
            .query_async(&mut self.conn())
            .await?;
        Ok(fields
            .into_iter()
            .filter_map(|f| {
                let (g, p) = f.rsplit_once('|')?;
                Some((g.to_string(), p.parse().ok()?))
            })
            .collect())
    }

    /// Cached token generation, if any.
    pub async fn cached_generation(&self, user: &str, platform: u8) -> Result<Option<u64>> {
        Ok(redis::cmd("GET")
            .arg(self.generation_key(user, platform))
            .query_async(&mut self.conn())
            .await?)
    }

    /// Cache `generation` unless a newer one is cached: generations only
    /// grow, so a verify that read the old one from MySQL just before a
    /// logout can never put it back over the logout's.
    pub async fn cache_generation(&self, user: &str, platform: u8, generation: u64) -> Result<()> {
        let _: i64 = self
            .raise_script
            .key(self.generation_key(user, platform))
            .arg(generation)
            .arg(3600)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Run one seq script for a conversation (see `SEQ_LUA` for `mode`);
    /// `None` when its counter is missing and `mode` is `raise`.
    async fn assign_one(
        &self,
        conversation: &str,
        ids: &[&str],
        floor: u64,
        mode: SeqMode,
        taken: &[u64],
    ) -> Result<Option<Vec<u64>>> {
        let mut inv = self.seq_script.key(self.key("seq", conversation));
        inv.key(self.key("inflight", conversation));
        for id in ids {
            inv.key(format!("{}:{id}", self.key("seqof", conversation)));
        }
        inv.arg(floor)
            .arg(mode.as_str())
            .arg(self.settings.replay_ttl.as_secs().max(1))
            .arg(MAX_IN_FLIGHT);
        for t in taken {
            inv.arg(*t);
        }
        let out: Vec<i64> = inv.invoke_async(&mut self.conn()).await?;
        if out.first() == Some(&-1) {
            return Ok(None);
        }
        Ok(Some(out.into_iter().map(|s| s.max(0) as u64).collect()))
    }

    /// The counter of `conversation` as Redis holds it (for tests and
    /// operators), if any.
    pub async fn seq_counter(&self, conversation: &str) -> Result<Option<u64>> {
        Ok(redis::cmd("GET")
            .arg(self.key("seq", conversation))
            .query_async(&mut self.conn())
            .await?)
    }
}

/// Seqs of one conversation remembered as in flight at most: a backlog
/// deeper than this (the history away for long) is partly forgotten, and a
/// partition that moves meanwhile hands those seqs out again (they are then
/// reassigned, never lost).
const MAX_IN_FLIGHT: u64 = 16_384;

/// How the seq script treats its floor (see `SEQ_LUA`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SeqMode {
    Set,
    Raise,
    Reassign,
}

impl SeqMode {
    fn as_str(self) -> &'static str {
        match self {
            SeqMode::Set => "set",
            SeqMode::Raise => "raise",
            SeqMode::Reassign => "reassign",
        }
    }
}

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        Error::Backend(format!("redis: {e}"))
    }
}

/// Seq counters in Redis, one Lua script per conversation per batch: the
/// allocation is atomic in Redis, and a message replayed from Kafka (same
/// server_msg_id) gets the seq it got before. A conversation the task meets
/// for the first time starts from the history's max, or above the seqs
/// still in flight (a set per conversation, emptied as `persist-mongo`
/// stores them; see [`Sequencer`]); after that the floor is the last seq
/// the task gave, so a counter that Redis lost or restored from an older
/// snapshot meanwhile is raised back.
pub struct RedisSequencer {
    redis: Arc<Redis>,
    history: Arc<dyn History>,
}

impl RedisSequencer {
    pub fn new(redis: Arc<Redis>, history: Arc<dyn History>) -> Self {
        RedisSequencer { redis, history }
    }
}

#[async_trait]
impl Sequencer for RedisSequencer {
    async fn assign(
        &self,
        last: &mut SeqMemory,
        messages: &[(Arc<str>, Arc<str>)],
    ) -> Result<Vec<u64>> {
        // Group by conversation, keeping each one's order.
        let mut groups: Vec<(Arc<str>, Vec<usize>)> = Vec::new();
        let mut at: HashMap<&str, usize> = HashMap::new();
        for (i, (c, _)) in messages.iter().enumerate() {
            let g = *at.entry(c).or_insert_with(|| {
                groups.push((c.clone(), Vec::new()));
                groups.len() - 1
            });
            groups[g].1.push(i);
        }
        let unknown = unknown_conversations(last, messages);
        let stored = if unknown.is_empty() {
            HashMap::new()
        } else {
            self.history.max_seqs(&unknown).await?
        };
        let run = |floors: Vec<(usize, u64, SeqMode)>| {
            let groups = &groups;
            join_all(floors.into_iter().map(move |(g, floor, mode)| {
                let (conv, idx) = &groups[g];
                let ids: Vec<&str> = idx.iter().map(|&i| &*messages[i].1).collect();
                async move { (g, self.redis.assign_one(conv, &ids, floor, mode, &[]).await) }
            }))
        };
        let first = run(groups
            .iter()
            .enumerate()
            .map(|(g, (c, _))| match (last.peek(c), stored.get(c)) {
                (Some(&n), _) => (g, n, SeqMode::Raise),
                (None, max) => (g, max.copied().unwrap_or(0), SeqMode::Set),
            })
            .collect())
        .await;
        let mut seqs = vec![0u64; messages.len()];
        let mut rebuild = Vec::new();
        for (g, r) in first {
            match r? {
                Some(s) => put(&mut seqs, &groups[g].1, &s),
                None => rebuild.push(g),
            }
        }
        if !rebuild.is_empty() {
            // Counters Redis lost while the task knew them: the history's
            // max, raised to what the task itself gave last.
            let convs: Vec<Arc<str>> = rebuild.iter().map(|&g| groups[g].0.clone()).collect();
            let max = self.history.max_seqs(&convs).await?;
            tracing::info!(
                conversations = convs.len(),
                "seq counters missing in redis; rebuilt from the history"
            );
            let second = run(rebuild
                .iter()
                .map(|&g| {
                    let c = &groups[g].0;
                    let floor = max
                        .get(c)
                        .copied()
                        .unwrap_or(0)
                        .max(last.peek(c).copied().unwrap_or(0));
                    (g, floor, SeqMode::Set)
                })
                .collect())
            .await;
            for (g, r) in second {
                match r? {
                    Some(s) => put(&mut seqs, &groups[g].1, &s),
                    None => {
                        return Err(Error::Backend(
                            "redis: seq script refused an authoritative floor".into(),
                        ))
                    }
                }
            }
        }
        for (c, idx) in &groups {
            if let Some(top) = idx.iter().map(|&i| seqs[i]).max() {
                let e = last.get_or_insert_mut(c.clone(), || 0);
                *e = (*e).max(top);
            }
        }
        Ok(seqs)
    }

    async fn reassign(
        &self,
        conversation: &Arc<str>,
        taken: &[(Arc<str>, u64)],
        stored_max: u64,
    ) -> Result<Vec<u64>> {
        let ids: Vec<&str> = taken.iter().map(|(s, _)| &**s).collect();
        let seqs: Vec<u64> = taken.iter().map(|(_, s)| *s).collect();
        self.redis
            .assign_one(conversation, &ids, stored_max, SeqMode::Reassign, &seqs)
            .await?
            .ok_or_else(|| Error::Backend("redis: seq script refused a reassignment".into()))
    }

    async fn stored(&self, up_to: &[(Arc<str>, u64)]) -> Result<()> {
        let ttl = self.redis.settings.replay_ttl.as_secs().max(1);
        let results = join_all(up_to.iter().map(|(conv, seq)| {
            let mut conn = self.redis.conn();
            let mut inv = self
                .redis
                .stored_script
                .key(self.redis.key("inflight", conv));
            inv.arg(*seq).arg(ttl);
            async move { inv.invoke_async::<i64>(&mut conn).await }
        }))
        .await;
        for r in results {
            r?;
        }
        Ok(())
    }
}

fn put(seqs: &mut [u64], idx: &[usize], got: &[u64]) {
    for (&i, &s) in idx.iter().zip(got) {
        seqs[i] = s;
    }
}

/// The hot cache in Redis: a sorted set per conversation (score = seq),
/// trimmed to the newest `hot_keep`, expiring when the conversation is
/// quiet. Its highest score is the conversation's visible max seq.
pub struct RedisHot {
    redis: Arc<Redis>,
}

impl RedisHot {
    pub fn new(redis: Arc<Redis>) -> Self {
        RedisHot { redis }
    }
}

#[async_trait]
impl Hot for RedisHot {
    async fn insert(&self, messages: &[&Sequenced]) -> Result<()> {
        let mut by_conv: HashMap<&str, Vec<&Sequenced>> = HashMap::new();
        for m in messages {
            by_conv.entry(&m.msg.conversation_id).or_default().push(m);
        }
        let keep = self.redis.settings.hot_keep.max(1) as i64;
        let ttl = self.redis.settings.hot_ttl.as_secs().max(1);
        let results = join_all(by_conv.into_iter().map(|(conv, ms)| {
            let mut inv = self.redis.hot_script.key(self.redis.key("hot", conv));
            inv.arg(keep).arg(ttl);
            for m in ms {
                inv.arg(m.seq).arg(&*m.body);
            }
            let mut conn = self.redis.conn();
            async move { inv.invoke_async::<i64>(&mut conn).await }
        }))
        .await;
        for r in results {
            r?;
        }
        Ok(())
    }

    async fn last(&self, conversations: &[Arc<str>]) -> HashMap<Arc<str>, (u64, Arc<str>)> {
        let results = join_all(conversations.iter().map(|c| {
            let mut conn = self.redis.conn();
            let key = self.redis.key("hot", c);
            async move {
                let top: Result<Vec<(String, f64)>, _> = redis::cmd("ZRANGE")
                    .arg(key)
                    .arg(-1)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query_async(&mut conn)
                    .await;
                (c.clone(), top)
            }
        }))
        .await;
        let mut out = HashMap::new();
        for (c, r) in results {
            match r {
                Ok(top) => {
                    if let Some((body, s)) = top.into_iter().next() {
                        out.insert(c, (s as u64, Arc::from(body)));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "hot cache read failed; reading the history"),
            }
        }
        out
    }

    async fn replace(&self, conversation: &str, seq: u64, body: &Arc<str>) -> Result<()> {
        let key = self.redis.key("hot", conversation);
        let mut p = redis::pipe();
        p.atomic();
        // Only if it is cached: a conversation the cache dropped stays out.
        p.cmd("ZREMRANGEBYSCORE").arg(&key).arg(seq).arg(seq);
        p.cmd("ZADD")
            .arg(&key)
            .arg("XX")
            .arg(seq)
            .arg(&**body)
            .ignore();
        let (removed,): (i64,) = p.query_async(&mut self.redis.conn()).await?;
        if removed > 0 {
            let _: i64 = redis::cmd("ZADD")
                .arg(&key)
                .arg(seq)
                .arg(&**body)
                .query_async(&mut self.redis.conn())
                .await?;
        }
        Ok(())
    }

    async fn range(&self, conversation: &str, from: u64, to: u64) -> Option<Vec<(u64, Arc<str>)>> {
        let got: Result<Vec<(String, f64)>, _> = redis::cmd("ZRANGE")
            .arg(self.redis.key("hot", conversation))
            .arg(from)
            .arg(to)
            .arg("BYSCORE")
            .arg("WITHSCORES")
            .query_async(&mut self.redis.conn())
            .await;
        match got {
            Ok(rows) if rows.len() as u64 == to - from + 1 => Some(
                rows.into_iter()
                    .map(|(body, s)| (s as u64, Arc::from(body)))
                    .collect(),
            ),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "hot cache read failed; reading the history");
                None
            }
        }
    }

    async fn max_seqs(&self, conversations: &[Arc<str>]) -> HashMap<Arc<str>, u64> {
        // The highest score is the last message: one read serves both.
        self.last(conversations)
            .await
            .into_iter()
            .map(|(c, (seq, _))| (c, seq))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_values_with_and_without_an_owner() {
        let json = r#"{"server_msg_id":"s","send_time":1}"#;
        let with = format!("p:17:0abc:{json}");
        let without = format!("p:17:{json}");
        assert_eq!(claim_json(&with), json);
        assert_eq!(claim_json(&without), json);
        assert_eq!(claim_json(&format!("d:17:{json}")), json);
        assert_eq!(claim_owner(&with), Some("0abc"));
        assert_eq!(claim_owner(&without), None);
        assert_eq!(claim_owner(&format!("d:17:{json}")), None);
    }
}
