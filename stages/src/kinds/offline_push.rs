//! `offline-push`: a notification through the user's push provider for
//! each recipient of a message who has no connection on any platform, has
//! not muted the conversation, and registered a device (`PUT
//! /users/me/devices/{platform}` with a `provider` named here).
//!
//! It reads fanout's deliveries beside `push`. Whether a recipient is
//! online is asked of the process's presence when the delivery gets here:
//! a user connected then was pushed the message and is not notified. A
//! user who connected in the last moments may still be notified once (the
//! presence has not heard yet); nobody offline is skipped.
//!
//! Providers, by shape:
//! - `fcm`: Firebase Cloud Messaging's HTTP v1 API, one POST per device to
//!   `url` (`https://fcm.googleapis.com/v1/projects/PROJECT/messages:send`)
//!   with an OAuth2 bearer token;
//! - `apns`: Apple's provider API, one POST per device to
//!   `URL/3/device/TOKEN` (HTTP/2 over TLS to Apple) with a provider
//!   token (JWT) and the app's bundle id as `apns-topic`;
//! - `generic`: up to `batch` notifications per POST to `url`, signed like
//!   the webhook kind, for a push service of the operator's own.
//!
//! The bearer tokens are not minted here: `token_env` names a variable
//! read at start, or `token_file` a file read before each request, so a
//! sidecar that refreshes it (FCM access tokens live an hour, APNs
//! provider tokens must be renewed within one) rotates it without a
//! restart.
//!
//! A notification is retried with backoff; after `max_attempts`, or when
//! the provider refuses it for good (a 4xx other than 408/429: an
//! unregistered token, say), it becomes a dead letter. A batch's acks are
//! released once each of its notifications was taken or kept as a dead
//! letter.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use imflow_runtime::registry::{OptionError, StageResult};
use imflow_runtime::{
    BuildContext, BuildError, CancellationToken, Envelope, Input, PortType, Retrying, RoleId,
    StageKind, StageTask,
};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::hooks::{
    answer, endpoint_problems, keep_dead, until_taken, url_problem, Endpoint, Outcome, Patience,
    Refused,
};
use crate::model::{now_ms, Delivery};
use crate::roles::{DEAD_LETTERS, DIRECTORY, PRESENCE};
use crate::store::{DeadLetter, DeadLetters, Directory, PushDevice, USERS_PER_QUERY};
use crate::Presence;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    /// The providers, by the name a device gives as its `provider`.
    providers: BTreeMap<String, ProviderOptions>,
    /// Show the message's text in the notification (else "New message").
    #[serde(default)]
    preview: bool,
    /// Most notifications per POST to a `generic` provider.
    #[serde(default = "hundred")]
    batch: usize,
    /// Requests in flight at once, per batch of deliveries.
    #[serde(default = "thirty_two")]
    concurrency: usize,
    #[serde(default = "crate::hooks::default_timeout_ms")]
    timeout_ms: u64,
    /// Attempts at one notification before it becomes a dead letter.
    #[serde(default = "five")]
    max_attempts: u32,
    #[serde(default = "five_hundred")]
    retry_first_ms: u64,
    #[serde(default = "crate::hooks::default_retry_cap_ms")]
    retry_cap_ms: u64,
}

fn hundred() -> usize {
    100
}
fn thirty_two() -> usize {
    32
}
fn five() -> u32 {
    5
}
fn five_hundred() -> u64 {
    500
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderOptions {
    shape: Shape,
    url: String,
    /// `apns`: the app's bundle id.
    #[serde(default)]
    topic: Option<String>,
    /// `fcm`, `apns`: the bearer token, from this environment variable...
    #[serde(default)]
    token_env: Option<String>,
    /// ...or this file, read before each request.
    #[serde(default)]
    token_file: Option<PathBuf>,
    /// `generic`: the HMAC key, or the variable holding it.
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    secret_env: Option<String>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
enum Shape {
    Fcm,
    Apns,
    Generic,
}

impl Options {
    fn problems(&self) -> Vec<OptionError> {
        let mut bad = Vec::new();
        let mut say = |field: String, message: String| bad.push(OptionError { field, message });
        if self.providers.is_empty() {
            say(
                "providers".into(),
                "empty: name at least one (fcm, apns or generic shape)".into(),
            );
        }
        for (name, p) in &self.providers {
            let at = |field: &str| format!("providers.{name}.{field}");
            if !crate::model::valid_provider(name) {
                say(
                    format!("providers.{name}"),
                    "a provider's name is 1 to 64 letters, digits, '-' or '_' (what devices give as `provider`)".into(),
                );
            }
            let unused = |field: &str, set: bool, say: &mut dyn FnMut(String, String)| {
                if set {
                    say(at(field), format!("not used by the {:?} shape: remove it", p.shape));
                }
            };
            match p.shape {
                Shape::Generic => {
                    for e in endpoint_problems(&p.url, &p.secret, &p.secret_env) {
                        say(at(&e.field), e.message);
                    }
                    unused("topic", p.topic.is_some(), &mut say);
                    unused("token_env", p.token_env.is_some(), &mut say);
                    unused("token_file", p.token_file.is_some(), &mut say);
                }
                Shape::Fcm | Shape::Apns => {
                    if let Some(why) = url_problem(&p.url) {
                        say(at("url"), why);
                    }
                    if p.token_env.is_some() == p.token_file.is_some() {
                        say(
                            at("token_env"),
                            "give `token_env` or `token_file` (the provider's bearer token), one of the two".into(),
                        );
                    }
                    if p.shape == Shape::Apns && p.topic.as_deref().is_none_or(str::is_empty) {
                        say(at("topic"), "missing: the app's bundle id (apns-topic)".into());
                    }
                    if p.shape == Shape::Fcm {
                        unused("topic", p.topic.is_some(), &mut say);
                    }
                    unused("secret", p.secret.is_some(), &mut say);
                    unused("secret_env", p.secret_env.is_some(), &mut say);
                }
            }
        }
        if !(1..=1000).contains(&self.batch) {
            say("batch".into(), "must be 1 to 1000".into());
        }
        if !(1..=1024).contains(&self.concurrency) {
            say("concurrency".into(), "must be 1 to 1024".into());
        }
        if self.max_attempts == 0 {
            say("max_attempts".into(), "must be at least 1".into());
        }
        if self.timeout_ms == 0 {
            say("timeout_ms".into(), "must be at least 1".into());
        }
        bad
    }
}

pub struct OfflinePush;

impl StageKind for OfflinePush {
    fn kind(&self) -> &'static str {
        "offline-push"
    }
    fn input(&self) -> Option<PortType> {
        super::delivery()
    }
    fn output(&self) -> Option<PortType> {
        None
    }
    fn check_options(&self, options: &serde_yaml::Value) -> Vec<OptionError> {
        super::check_with(options, |o: Options| o.problems())
    }
    fn needs(&self) -> Vec<RoleId> {
        vec![PRESENCE.id(), DIRECTORY.id(), DEAD_LETTERS.id()]
    }
    fn build(&self, cx: &mut BuildContext<'_>) -> Result<Vec<StageTask>, BuildError> {
        let opts: Options = super::options(cx)?;
        let stage = cx.name.to_string();
        let timeout = Duration::from_millis(opts.timeout_ms.max(1));
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| BuildError::stage(cx.name, format!("HTTP client: {e}")))?;
        let mut providers = HashMap::new();
        for (name, p) in &opts.providers {
            providers.insert(name.clone(), Provider::open(cx.name, name, p, &http, timeout)?);
        }
        let stage_ = Arc::new(Stage {
            metrics: Metrics::of(&stage),
            stage,
            providers,
            presence: cx.resource(&PRESENCE)?,
            directory: cx.resource(&DIRECTORY)?,
            dead: cx.resource(&DEAD_LETTERS)?,
            errors: cx.error_counter(),
            shutdown: cx.shutdown.clone(),
            patience: Patience {
                max_attempts: opts.max_attempts,
                first: Duration::from_millis(opts.retry_first_ms),
                cap: Duration::from_millis(opts.retry_cap_ms),
            },
            preview: opts.preview,
            batch: opts.batch,
            concurrency: opts.concurrency,
        });
        cx.each_input(|input| run(input, stage_.clone()))
    }
}

/// Where a bearer token comes from.
enum Token {
    Fixed(String),
    File(PathBuf),
}

impl Token {
    async fn current(&self) -> Result<String, String> {
        match self {
            Token::Fixed(t) => Ok(t.clone()),
            Token::File(path) => match tokio::fs::read_to_string(path).await {
                Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
                Ok(_) => Err(format!("token_file {} is empty", path.display())),
                Err(e) => Err(format!("token_file {}: {e}", path.display())),
            },
        }
    }
}

enum Sender {
    /// FCM or APNs: one request per device, with a bearer token.
    PerDevice {
        http: reqwest::Client,
        token: Token,
        topic: Option<String>,
    },
    Generic(Endpoint),
}

struct Provider {
    counters: Counters,
    shape: Shape,
    url: String,
    timeout: Duration,
    sender: Sender,
}

impl Provider {
    fn open(
        stage: &str,
        name: &str,
        p: &ProviderOptions,
        http: &reqwest::Client,
        timeout: Duration,
    ) -> Result<Provider, BuildError> {
        let sender = match p.shape {
            Shape::Generic => Sender::Generic(Endpoint::open(
                stage,
                &p.url,
                &p.secret,
                &p.secret_env,
                timeout.as_millis() as u64,
            )?),
            Shape::Fcm | Shape::Apns => {
                let token = match (&p.token_env, &p.token_file) {
                    (Some(var), _) => Token::Fixed(std::env::var(var).map_err(|_| {
                        BuildError::stage(stage, format!("options.providers.{name}.token_env: the environment variable {var} is not set; set it to the provider's bearer token"))
                    })?),
                    (None, Some(path)) => {
                        std::fs::metadata(path).map_err(|e| {
                            BuildError::stage(stage, format!("options.providers.{name}.token_file: cannot read {}: {e}", path.display()))
                        })?;
                        Token::File(path.clone())
                    }
                    (None, None) => {
                        return Err(BuildError::stage(
                            stage,
                            format!("options.providers.{name}.token_env: missing"),
                        ))
                    }
                };
                Sender::PerDevice {
                    http: http.clone(),
                    token,
                    topic: p.topic.clone(),
                }
            }
        };
        Ok(Provider {
            counters: Counters {
                sent: Metrics::sent(stage, name),
                failed: Metrics::failed(stage, name),
                latency: Metrics::latency(stage, name),
            },
            shape: p.shape,
            url: p.url.trim_end_matches('/').to_string(),
            timeout,
            sender,
        })
    }

    /// One request of a per-device provider.
    async fn send_one(&self, note: &Note, bearer: &str) -> Result<(), Refused> {
        let Sender::PerDevice { http, topic, .. } = &self.sender else {
            unreachable!("send_one is only called for per-device providers")
        };
        let (url, request) = match self.shape {
            Shape::Apns => {
                // The token is the user's input: encoded, it stays one
                // path segment of Apple's host.
                let url = format!(
                    "{}/3/device/{}",
                    self.url,
                    percent_encoding::utf8_percent_encode(
                        &note.device.push_token,
                        percent_encoding::NON_ALPHANUMERIC
                    )
                );
                let mut r = http
                    .post(&url)
                    .header("apns-topic", topic.as_deref().unwrap_or_default())
                    .header("apns-push-type", "alert")
                    .header("apns-priority", "10");
                if note.server_msg_id.len() <= 64 {
                    r = r.header("apns-collapse-id", &note.server_msg_id);
                }
                (url, r.json(&note.apns_body()))
            }
            _ => (self.url.clone(), http.post(&self.url).json(&note.fcm_body())),
        };
        answer(request.bearer_auth(bearer), &url, self.timeout)
            .await
            .map(drop)
            .map_err(|mut r| {
                // Our bearer token, not this notification: expired or
                // revoked until the sidecar renews it. Retried.
                if matches!(r.status, Some(401 | 403)) {
                    r.for_good = false;
                }
                r
            })
    }
}

struct Stage {
    stage: String,
    providers: HashMap<String, Provider>,
    presence: Arc<dyn Presence>,
    directory: Arc<dyn Directory>,
    dead: Arc<dyn DeadLetters>,
    errors: metrics::Counter,
    metrics: Metrics,
    shutdown: CancellationToken,
    patience: Patience,
    preview: bool,
    batch: usize,
    concurrency: usize,
}

struct Metrics {
    dead_lettered: metrics::Counter,
    online: metrics::Counter,
    muted: metrics::Counter,
    unknown_provider: metrics::Counter,
}

impl Metrics {
    fn of(stage: &str) -> Self {
        let skipped = |reason: &'static str| {
            metrics::counter!("imflow_offline_push_skipped_total", "stage" => stage.to_string(), "reason" => reason)
        };
        Metrics {
            dead_lettered: metrics::counter!("imflow_offline_push_dead_lettered_total", "stage" => stage.to_string()),
            online: skipped("online"),
            muted: skipped("muted"),
            unknown_provider: skipped("unknown_provider"),
        }
    }

    fn sent(stage: &str, provider: &str) -> metrics::Counter {
        metrics::counter!("imflow_offline_push_sent_total", "stage" => stage.to_string(), "provider" => provider.to_string())
    }
    fn failed(stage: &str, provider: &str) -> metrics::Counter {
        metrics::counter!("imflow_offline_push_failed_requests_total", "stage" => stage.to_string(), "provider" => provider.to_string())
    }
    fn latency(stage: &str, provider: &str) -> metrics::Histogram {
        metrics::histogram!("imflow_offline_push_request_seconds", "stage" => stage.to_string(), "provider" => provider.to_string())
    }
}

/// Notifications gathered before they are sent.
const MAX_PENDING: usize = 1000;

/// A provider's counters.
struct Counters {
    sent: metrics::Counter,
    failed: metrics::Counter,
    latency: metrics::Histogram,
}

/// One notification to one device.
#[derive(Clone)]
struct Note {
    user_id: String,
    device: crate::store::Device,
    conversation_id: String,
    seq: u64,
    server_msg_id: String,
    sender: String,
    group_id: Option<String>,
    title: String,
    body: String,
}

impl Note {
    /// Keys an app needs to open the conversation, as FCM data (strings).
    fn data(&self) -> Value {
        let mut data = json!({
            "conversation_id": self.conversation_id,
            "seq": self.seq.to_string(),
            "server_msg_id": self.server_msg_id,
            "sender": self.sender,
        });
        if let Some(g) = &self.group_id {
            data["group_id"] = json!(g);
        }
        data
    }

    fn fcm_body(&self) -> Value {
        json!({"message": {
            "token": self.device.push_token,
            "notification": {"title": self.title, "body": self.body},
            "data": self.data(),
            "android": {"priority": "high", "collapse_key": self.conversation_id},
        }})
    }

    fn apns_body(&self) -> Value {
        json!({
            "aps": {
                "alert": {"title": self.title, "body": self.body},
                "sound": "default",
                "thread-id": self.conversation_id,
            },
            "conversation_id": self.conversation_id,
            "seq": self.seq,
            "server_msg_id": self.server_msg_id,
            "sender": self.sender,
        })
    }

    /// As a `generic` provider gets it (and as a dead letter keeps it).
    fn generic(&self) -> Value {
        let mut v = json!({
            "user_id": self.user_id,
            "platform": self.device.platform,
            "provider": self.device.provider,
            "push_token": self.device.push_token,
            "conversation_id": self.conversation_id,
            "seq": self.seq,
            "server_msg_id": self.server_msg_id,
            "sender": self.sender,
            "title": self.title,
            "body": self.body,
        });
        if let Some(g) = &self.group_id {
            v["group_id"] = json!(g);
        }
        v
    }
}

async fn run(mut input: Input<Delivery>, stage: Arc<Stage>) -> StageResult {
    let mut batch: Vec<Envelope<Delivery>> = Vec::with_capacity(256);
    while input.recv_batch(&mut batch, 256).await {
        let done = stage.notify(&batch).await;
        for env in batch.drain(..) {
            if !done {
                // With Kafka edges the offset stays: the next start sends it.
                env.ack.fail("the server stopped before the notifications went out");
            }
            env.ack.release();
        }
    }
    Ok(())
}

/// A notification that failed for good.
struct Failed {
    note: Note,
    why: String,
    attempts: u32,
}

/// How one provider's share of a batch went.
#[derive(Default)]
struct Sent {
    failed: Vec<Failed>,
    stopped: bool,
}

impl Stage {
    /// Notify the offline recipients of `batch`: `true` once every
    /// notification was taken or kept as a dead letter, `false` if the
    /// server is stopping first. Recipients are looked up
    /// `USERS_PER_QUERY` at a time and notifications sent once
    /// `MAX_PENDING` are ready, so a message to a huge group never holds
    /// all of its notifications at once.
    async fn notify(&self, batch: &[Envelope<Delivery>]) -> bool {
        let mut titles: HashMap<String, String> = HashMap::new();
        let mut pending: Vec<Note> = Vec::new();
        for env in batch {
            let d = &env.item;
            let Some((msg, offline)) = self.offline_of(d) else {
                continue;
            };
            for users in offline.chunks(USERS_PER_QUERY) {
                let Some(notes) = self.notes_for(d, &msg, users, &mut titles).await else {
                    return false;
                };
                pending.extend(notes);
                if pending.len() >= MAX_PENDING && !self.deliver(std::mem::take(&mut pending)).await {
                    return false;
                }
            }
        }
        pending.is_empty() || self.deliver(pending).await
    }

    /// Send `notes`, each through its device's provider; `false` if the
    /// server is stopping first.
    async fn deliver(&self, notes: Vec<Note>) -> bool {
        let mut per: HashMap<&str, Vec<Note>> = HashMap::new();
        for note in notes {
            match self.providers.get_key_value(&note.device.provider) {
                Some((name, _)) => per.entry(name.as_str()).or_default().push(note),
                None => {
                    self.metrics.unknown_provider.increment(1);
                    tracing::debug!(stage = %self.stage, user = %note.user_id, provider = %note.device.provider, "device of a provider this stage does not have; not notified");
                }
            }
        }
        let sent = futures::future::join_all(
            per.into_iter()
                .map(|(name, notes)| self.send(&self.providers[name], notes)),
        )
        .await;
        let stopped = sent.iter().any(|s| s.stopped);
        let failed: Vec<Failed> = sent.into_iter().flat_map(|s| s.failed).collect();
        if !failed.is_empty() {
            self.bury(&failed).await;
        }
        !stopped
    }

    /// The message and its recipients no connection has (never its
    /// sender); `None` if nobody is to be notified.
    fn offline_of(&self, d: &Delivery) -> Option<(Value, Vec<Arc<str>>)> {
        let mut offline: Vec<Arc<str>> = Vec::new();
        for u in d.recipients.iter() {
            if self.presence.is_online(u) {
                self.metrics.online.increment(1);
            } else {
                offline.push(u.clone());
            }
        }
        if offline.is_empty() {
            return None;
        }
        let Ok(msg) = serde_json::from_str::<Value>(&d.body) else {
            tracing::error!(stage = %self.stage, conversation = %d.conversation_id, seq = d.seq, "a delivery whose body is not JSON; not notified");
            return None;
        };
        // Server notifications (1000 and up) and revoked messages notify
        // nobody; nor does a message its own sender.
        if msg["content_type"].as_i64().is_none_or(|t| t >= 1000) || msg["revoked"] == true {
            return None;
        }
        let sender = msg["sender"].as_str().unwrap_or_default();
        offline.retain(|u| **u != *sender);
        (!offline.is_empty()).then_some((msg, offline))
    }

    /// The notifications of `msg` to `users`' devices; `None` if the
    /// server is stopping while the directory is away.
    async fn notes_for(
        &self,
        d: &Delivery,
        msg: &Value,
        users: &[Arc<str>],
        titles: &mut HashMap<String, String>,
    ) -> Option<Vec<Note>> {
        let sender = msg["sender"].as_str().unwrap_or_default().to_string();
        let devices = self
            .ask("reading devices for offline push", || {
                self.directory.push_devices(&d.conversation_id, users)
            })
            .await?;
        if devices.is_empty() {
            return Some(Vec::new());
        }
        if !titles.contains_key(&sender) {
            let profile = self
                .ask("reading the sender's profile", || self.directory.profile(&sender))
                .await?;
            let title = profile
                .map(|p| p.nickname)
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| sender.clone());
            titles.insert(sender.clone(), title);
        }
        let title = titles[&sender].clone();
        let body = summary(msg, self.preview);
        let mut notes = Vec::new();
        for PushDevice {
            user_id,
            device,
            muted,
        } in devices
        {
            if muted {
                self.metrics.muted.increment(1);
                continue;
            }
            notes.push(Note {
                user_id,
                device,
                conversation_id: d.conversation_id.to_string(),
                seq: d.seq,
                server_msg_id: msg["server_msg_id"].as_str().unwrap_or_default().into(),
                sender: sender.clone(),
                group_id: msg["group_id"].as_str().map(str::to_string),
                title: title.clone(),
                body: body.clone(),
            });
        }
        Some(notes)
    }

    /// Run a directory read until it answers; `None` if the server stops
    /// first (the batch's acks then fail, and Kafka hands it over again).
    async fn ask<T, F, Fut>(&self, what: &'static str, mut read: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = crate::error::Result<T>>,
    {
        let mut retrying = Retrying::new(what, Duration::from_secs(5)).counting(&self.errors);
        loop {
            match read().await {
                Ok(v) => return Some(v),
                Err(e) if self.shutdown.is_cancelled() => {
                    tracing::warn!(stage = %self.stage, error = %e, "{what}: failed while stopping");
                    return None;
                }
                Err(e) => retrying.failed(e).await,
            }
        }
    }

    /// Send `notes` through `provider`, `concurrency` requests at a time.
    async fn send(&self, provider: &Provider, notes: Vec<Note>) -> Sent {
        let counters = &provider.counters;
        let parts: Vec<Sent> = match &provider.sender {
            Sender::Generic(endpoint) => {
                // The futures are made first, then run: a `map` closure
                // over borrowed state trips the compiler's Send check.
                let posts: Vec<_> = notes
                    .chunks(self.batch)
                    .map(|chunk| {
                        let body = json!({
                            "event": "notification",
                            "stage": self.stage,
                            "notifications": chunk.iter().map(Note::generic).collect::<Vec<_>>(),
                        })
                        .to_string();
                        self.attempt(chunk.to_vec(), counters, move || {
                            endpoint.post(body.clone())
                        })
                    })
                    .collect();
                stream::iter(posts)
                    .buffer_unordered(self.concurrency)
                    .collect()
                    .await
            }
            Sender::PerDevice { token, .. } => {
                let posts: Vec<_> = notes
                    .into_iter()
                    .map(|note| {
                        let one = note.clone();
                        self.attempt(vec![note], counters, move || {
                            let one = one.clone();
                            async move {
                                // Read per request: a file a sidecar
                                // rewrites is picked up by the next one.
                                let bearer = token
                                    .current()
                                    .await
                                    .map_err(|why| Refused {
                                        why,
                                        for_good: false,
                                        status: None,
                                    })?;
                                provider.send_one(&one, &bearer).await
                            }
                        })
                    })
                    .collect();
                stream::iter(posts)
                    .buffer_unordered(self.concurrency)
                    .collect()
                    .await
            }
        };
        let mut all = Sent::default();
        for p in parts {
            all.failed.extend(p.failed);
            all.stopped |= p.stopped;
        }
        all
    }

    /// Post `notes` (one request) with `post` until taken, given up on,
    /// or stopped.
    async fn attempt<F, Fut, R>(&self, notes: Vec<Note>, counters: &Counters, mut post: F) -> Sent
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<R, Refused>>,
    {
        let outcome = until_taken(
            &self.stage,
            "offline push",
            &self.patience,
            &self.shutdown,
            &counters.failed,
            || {
                let started = Instant::now();
                let request = post();
                async move {
                    let result = request.await.map(drop);
                    counters.latency.record(started.elapsed().as_secs_f64());
                    if result.is_err() {
                        self.errors.increment(1);
                    }
                    result
                }
            },
        )
        .await;
        let mut out = Sent::default();
        match outcome {
            Outcome::Taken => counters.sent.increment(notes.len() as u64),
            Outcome::GaveUp { why, attempts } => {
                out.failed = notes
                    .into_iter()
                    .map(|note| Failed {
                        note,
                        why: why.clone(),
                        attempts,
                    })
                    .collect();
            }
            Outcome::Stopped => out.stopped = true,
        }
        out
    }

    async fn bury(&self, failed: &[Failed]) {
        let at_ms = now_ms();
        let letters: Vec<DeadLetter> = failed
            .iter()
            .map(|f| DeadLetter {
                stage: self.stage.clone(),
                conversation_id: f.note.conversation_id.clone(),
                seq: f.note.seq,
                server_msg_id: f.note.server_msg_id.clone(),
                body: f.note.generic().to_string(),
                error: f.why.clone(),
                attempts: f.attempts,
                at_ms,
            })
            .collect();
        tracing::warn!(stage = %self.stage, notifications = letters.len(), to = %self.dead.place(), "offline push gave up; kept as dead letters");
        keep_dead(&*self.dead, &letters, &self.errors).await;
        self.metrics.dead_lettered.increment(letters.len() as u64);
    }
}

/// The notification's text.
fn summary(msg: &Value, preview: bool) -> String {
    const NEW: &str = "New message";
    if !preview {
        return NEW.into();
    }
    match msg["content_type"].as_i64() {
        Some(101 | 106) => {
            let text = msg["content"]["text"].as_str().unwrap_or_default();
            match text.char_indices().nth(120) {
                Some((cut, _)) => format!("{}…", &text[..cut]),
                None => text.to_string(),
            }
        }
        Some(102) => "[Picture]".into(),
        Some(103) => "[Voice]".into(),
        Some(104) => "[Video]".into(),
        Some(105) => "[File]".into(),
        _ => NEW.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(yaml: &str) -> Vec<String> {
        let v: serde_yaml::Value = serde_yaml::from_str(yaml).expect("yaml");
        OfflinePush
            .check_options(&v)
            .into_iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect()
    }

    #[test]
    fn each_provider_is_checked_for_what_its_shape_needs() {
        assert!(problems(
            "{providers: {fcm: {shape: fcm, url: 'https://fcm.googleapis.com/v1/projects/p/messages:send', token_env: FCM},
                          apns: {shape: apns, url: 'https://api.push.apple.com', topic: com.example.chat, token_file: /etc/apns.jwt},
                          mine: {shape: generic, url: 'http://push.local/x', secret_env: PUSH}}}"
        )
        .is_empty());
        let bad = problems(
            "{providers: {a: {shape: apns, url: 'ftp://x', token_env: A, token_file: /f},
                          g: {shape: generic, url: 'http://x', token_env: T}},
              batch: 0}",
        );
        assert_eq!(
            bad,
            [
                "providers.a.url: scheme `ftp`: use http or https",
                "providers.a.token_env: give `token_env` or `token_file` (the provider's bearer token), one of the two",
                "providers.a.topic: missing: the app's bundle id (apns-topic)",
                "providers.g.secret: missing: give `secret`, or `secret_env` naming the variable that holds it",
                "providers.g.token_env: not used by the Generic shape: remove it",
                "batch: must be 1 to 1000",
            ]
        );
        let none = problems("{providers: {}}");
        assert!(none[0].starts_with("providers: empty"), "{none:?}");
        let shape = problems("{providers: {x: {shape: gcm, url: 'http://x'}}}");
        assert!(shape[0].contains("unknown variant `gcm`"), "{shape:?}");
    }

    #[test]
    fn the_text_is_shown_only_with_preview_and_cut_at_120_characters() {
        let text = json!({"content_type": 101, "content": {"text": "hello"}});
        assert_eq!(summary(&text, false), "New message");
        assert_eq!(summary(&text, true), "hello");
        let long = json!({"content_type": 101, "content": {"text": "é".repeat(200)}});
        assert_eq!(summary(&long, true).chars().count(), 121);
        assert_eq!(summary(&json!({"content_type": 102}), true), "[Picture]");
    }
}
