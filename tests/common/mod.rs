//! A real imflow server on ephemeral loopback ports, and a protocol client
//! over real sockets, for the end-to-end tests.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use imflow::{Config, Server};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub mod faults;
pub mod load;
pub mod trace;

pub const ADMIN: &str = "test-admin-secret";
/// How long a test waits for an event before it fails.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub struct TestServer {
    pub server: Option<Server>,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
    pub api: String,
    pub ws: String,
    pub cfg: Config,
}

/// Run the `imflow` binary in the project's root: (exit code, stdout,
/// stderr).
pub fn imflow(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imflow"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run imflow");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether the end-to-end tests run on the cluster data plane:
/// `IMFLOW_TEST_MODE=cluster` (set by `script/test.sh` for a second pass)
/// puts every test server on Kafka edges and the MySQL, MongoDB and Redis of
/// `script/infra.sh`, on the seed's ports.
pub fn cluster_mode() -> bool {
    std::env::var("IMFLOW_TEST_MODE").is_ok_and(|m| m == "cluster")
}

/// A name no other test server uses: its own topics, consumer groups,
/// databases and Redis keys.
pub fn unique() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "t{}x{}x{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
            % 100_000_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn server_env(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_string())
}

/// The shipped pipeline with its topics renamed, written under `dir`.
pub fn pipeline_with_own_topics(dir: &std::path::Path, id: &str) -> PathBuf {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/pipeline.yaml"))
        .unwrap()
        .replace("topic: ws2ms_chat", &format!("topic: ws2ms_chat-{id}"))
        .replace("topic: msg_to_mongo", &format!("topic: msg_to_mongo-{id}"))
        .replace("topic: ms2ps_chat", &format!("topic: ms2ps_chat-{id}"));
    let path = dir.join(format!("pipeline-{id}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// A pipeline's text with stage `name` between `ingest` and `seq` (`seq`
/// then reads from it); `inputs_and_options` are the stage's lines after
/// its `kind`, indented four spaces. Where it runs is the caller's choice.
pub fn stage_after_ingest(text: &str, name: &str, kind: &str, inputs_and_options: &str) -> String {
    let seq_from_ingest = "  seq:\n    kind: seq-assign\n    inputs:\n      - from: ingest\n";
    assert!(
        text.contains(seq_from_ingest),
        "the shipped pipeline changed"
    );
    text.replace(
        seq_from_ingest,
        &format!("  {name}:\n    kind: {kind}\n{inputs_and_options}\n  seq:\n    kind: seq-assign\n    inputs:\n      - from: {name}\n"),
    )
}

/// Kafka edges with this server's own topics.
pub fn use_kafka(cfg: &mut Config, dir: &std::path::Path, id: &str) {
    cfg.pipeline = pipeline_with_own_topics(dir, id);
    cfg.kafka = Some(imflow::config::KafkaConfig {
        addr: vec![server_env("IMFLOW_KAFKA_BROKERS", "127.0.0.1:9092")],
        group_prefix: format!("test-{id}"),
        linger_ms: 1,
        ..Default::default()
    });
}

/// The cluster's stores, in this server's own databases and key space.
pub fn use_cluster_stores(cfg: &mut Config, id: &str) {
    use imflow::config::{MongoConfig, MysqlConfig, RedisConfig};
    cfg.mysql = Some(MysqlConfig {
        db_mysql_address: vec![server_env("IMFLOW_TEST_MYSQL", "127.0.0.1:13306")],
        db_mysql_database_name: id.to_string(),
        ..Default::default()
    });
    cfg.mongo = Some(MongoConfig {
        db_address: vec![server_env("IMFLOW_TEST_MONGO", "127.0.0.1:37017")],
        db_database: id.to_string(),
        ..Default::default()
    });
    cfg.redis = Some(RedisConfig {
        db_address: vec![server_env("IMFLOW_TEST_REDIS", "127.0.0.1:16379")],
        key_prefix: id.to_string(),
        ..Default::default()
    });
    // The garage of script/infra.sh (`script/infra.sh s3`); file ids are
    // random, so servers share its bucket.
    cfg.s3 = Some(imflow::config::S3Config {
        endpoint: server_env("IMFLOW_TEST_S3", "http://127.0.0.1:10005"),
        region: "garage".into(),
        bucket: "imflow".into(),
        access_key_id: "GK1a2b3c4d5e6f708192a3b4c5".into(),
        secret_access_key: "9f1c2e3d4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"
            .into(),
        ..Default::default()
    });
}

/// The whole cluster data plane: Kafka edges and the cluster's stores.
pub fn use_cluster(cfg: &mut Config, dir: &std::path::Path) {
    let id = unique();
    use_kafka(cfg, dir, &id);
    use_cluster_stores(cfg, &id);
}

pub fn test_config(data_dir: PathBuf) -> Config {
    let mut cfg = Config {
        pipeline: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/pipeline.yaml")),
        data_dir,
        admin_secret: ADMIN.into(),
        ..Default::default()
    };
    cfg.listen.gateway = "127.0.0.1:0".parse().unwrap();
    cfg.listen.api = "127.0.0.1:0".parse().unwrap();
    cfg.websocket.rate_limit_per_sec = 100_000;
    cfg.websocket.rate_limit_burst = 100_000;
    cfg.shutdown_deadline_secs = 10;
    cfg
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        Self::start_with_kinds(tweak, imflow_stages::registry()).await
    }

    /// A server whose pipeline may use the kinds of `registry`.
    pub async fn start_with_kinds(
        tweak: impl FnOnce(&mut Config),
        registry: imflow_runtime::Registry,
    ) -> TestServer {
        if let Ok(filter) = std::env::var("IMFLOW_TEST_LOG") {
            // Server logs in the test's output, e.g. IMFLOW_TEST_LOG=imflow=debug.
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = test_config(dir.path().join("data"));
        if cluster_mode() {
            use_cluster(&mut cfg, dir.path());
        }
        tweak(&mut cfg);
        let server = Server::start_with_kinds(cfg.clone(), registry)
            .await
            .expect("server starts");
        TestServer {
            api: format!("http://{}", server.api_addr),
            ws: format!("ws://{}/ws", server.gateway_addr),
            server: Some(server),
            dir,
            http: reqwest::Client::new(),
            cfg,
        }
    }

    /// A client of a server running in another process.
    pub fn attach(gateway: &str, api: &str) -> TestServer {
        TestServer {
            server: None,
            dir: tempfile::tempdir().expect("tempdir"),
            http: reqwest::Client::new(),
            api: format!("http://{api}"),
            ws: format!("ws://{gateway}/ws"),
            cfg: Config::default(),
        }
    }

    /// The other process was restarted at new addresses.
    pub fn reattach(&mut self, gateway: &str, api: &str) {
        self.api = format!("http://{api}");
        self.ws = format!("ws://{gateway}/ws");
    }

    /// Stop gracefully and start again on the same data directory.
    pub async fn restart(&mut self) {
        self.stop_server().await;
        self.start_again().await;
    }

    /// Stop gracefully (the stores stay, for a test to tamper with).
    pub async fn stop_server(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await.expect("clean stop");
        }
    }

    /// Start again on the same config and stores, at new addresses.
    pub async fn start_again(&mut self) {
        let server = Server::start(self.cfg.clone())
            .await
            .expect("server restarts");
        self.api = format!("http://{}", server.api_addr);
        self.ws = format!("ws://{}/ws", server.gateway_addr);
        self.server = Some(server);
    }

    pub async fn admin(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.api))
            .header("X-Admin-Secret", ADMIN)
            .json(&body)
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn register(&self, users: &[&str]) {
        let list: Vec<Value> = users.iter().map(|u| json!({"user_id": u})).collect();
        for chunk in list.chunks(1000) {
            let (s, _) = self.admin("/auth/register", json!({"users": chunk})).await;
            assert_eq!(s, 200);
        }
    }

    pub async fn token(&self, user: &str, platform: u8) -> String {
        let (s, v) = self
            .admin(
                "/auth/token",
                json!({"user_id": user, "platform": platform}),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        v["token"].as_str().expect("token").to_string()
    }

    /// The value of metric `name` (with `label` in its labels, if given),
    /// summed over its series, from this server's /metrics.
    pub async fn metric(&self, name: &str, label: &str) -> f64 {
        let text = self
            .http
            .get(format!("{}/metrics", self.api))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter(|l| l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The first `n` dead letters of stage `stage`: from the embedded
    /// store's table (the server is stopped first), or read back from the
    /// Kafka topic, in the order written.
    pub async fn dead_letters(
        &mut self,
        stage: &str,
        n: usize,
    ) -> Vec<imflow_stages::store::DeadLetter> {
        let Some(kafka) = self.cfg.kafka.clone() else {
            self.stop_server().await;
            let store =
                imflow_stages::store::SqliteStore::open(&self.cfg.data_dir, Default::default())
                    .await
                    .expect("store opens");
            return store.dead_letters(stage).await.expect("dead letters");
        };
        use rdkafka::consumer::{Consumer, StreamConsumer};
        use rdkafka::Message;
        let consumer: StreamConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", kafka.addr.join(","))
            .set("group.id", format!("read-{}", unique()))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        consumer
            .subscribe(&[&kafka.dead_letter_topic])
            .expect("subscribe");
        let mut letters = Vec::new();
        let deadline = tokio::time::Instant::now() + PATIENCE * 3;
        while letters.len() < n {
            let m = tokio::time::timeout_at(deadline, consumer.recv())
                .await
                .unwrap_or_else(|_| panic!("{n} dead letters of {stage} on the topic in time"))
                .expect("read");
            let letter: imflow_stages::store::DeadLetter =
                serde_json::from_slice(m.payload().expect("payload")).expect("a dead letter");
            if letter.stage == stage {
                letters.push(letter);
            }
        }
        letters
    }

    /// A user call over REST: (status, body).
    pub async fn call(
        &self,
        method: &str,
        token: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.api);
        let mut req = match method {
            "GET" => self.http.get(url),
            "POST" => self.http.post(url),
            "PUT" => self.http.put(url),
            "DELETE" => self.http.delete(url),
            m => panic!("method {m}"),
        };
        req = req.bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Create a group as the holder of `token`; returns the HTTP status.
    pub async fn create_group(&self, token: &str, group_id: &str, members: &[&str]) -> u16 {
        let body = json!({"group_id": group_id, "name": group_id, "members": members});
        self.call("POST", token, "/groups", Some(body)).await.0
    }

    pub async fn connect(&self, user: &str, platform: u8) -> Client {
        let token = self.token(user, platform).await;
        self.connect_token(&token)
            .await
            .expect("websocket connects")
    }

    pub async fn connect_token(
        &self,
        token: &str,
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let (ws, _) =
            tokio_tungstenite::connect_async(format!("{}?token={token}", self.ws)).await?;
        Ok(Client {
            ws,
            backlog: VecDeque::new(),
        })
    }
}

static RID: AtomicU64 = AtomicU64::new(1);

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Frames read while waiting for something else.
    pub backlog: VecDeque<Value>,
}

impl Client {
    pub fn from_stream(ws: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Client {
        Client {
            ws,
            backlog: VecDeque::new(),
        }
    }

    pub async fn send_raw(&mut self, text: String) {
        self.ws.send(Message::text(text)).await.expect("send frame");
    }

    pub async fn send_json(&mut self, v: &Value) {
        self.send_raw(v.to_string()).await;
    }

    /// Next frame from the socket (not the backlog); None when closed.
    pub async fn read_frame(&mut self) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        self.read_frame_until(deadline)
            .await
            .expect("timed out waiting for a frame")
    }

    /// Next frame from the socket by `deadline` (Err when it passes);
    /// Ok(None) when closed.
    pub async fn read_frame_until(
        &mut self,
        deadline: tokio::time::Instant,
    ) -> Result<Option<Value>, tokio::time::error::Elapsed> {
        loop {
            let Some(m) = tokio::time::timeout_at(deadline, self.ws.next()).await? else {
                return Ok(None);
            };
            match m {
                Ok(Message::Text(t)) => {
                    return Ok(Some(
                        serde_json::from_str(t.as_str()).expect("server frames are JSON"),
                    ))
                }
                Ok(Message::Close(_)) | Err(_) => return Ok(None),
                Ok(_) => continue,
            }
        }
    }

    /// The first frame (backlog first) that `pred` accepts by `deadline`,
    /// however long the quiet between frames; None if the deadline passes.
    /// Others are kept. Panics if the connection closes.
    pub async fn next_where_until(
        &mut self,
        deadline: tokio::time::Instant,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        if let Some(i) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(i);
        }
        // Frames already buffered are read without waiting, so a stream
        // of unwanted ones must not carry the wait past the deadline.
        while tokio::time::Instant::now() < deadline {
            let f = self
                .read_frame_until(deadline)
                .await
                .ok()?
                .expect("connection closed while waiting");
            if pred(&f) {
                return Some(f);
            }
            self.backlog.push_back(f);
        }
        None
    }

    /// The first frame (backlog first) that `pred` accepts; others are kept.
    pub async fn next_where(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(i).expect("index");
        }
        loop {
            let f = self
                .read_frame()
                .await
                .expect("connection closed while waiting");
            if pred(&f) {
                return f;
            }
            self.backlog.push_back(f);
        }
    }

    /// Send a request with a fresh rid and wait for its reply.
    pub async fn request(&mut self, mut frame: Value) -> Value {
        let rid = format!("r{}", RID.fetch_add(1, Ordering::Relaxed));
        frame["rid"] = json!(rid);
        self.send_json(&frame).await;
        self.next_where(|f| f["rid"] == json!(rid)).await
    }

    pub async fn send_text(&mut self, to: Target<'_>, client_msg_id: &str, text: &str) -> Value {
        self.request(send_frame(to, client_msg_id, text)).await
    }

    /// Wait for the push of the message acknowledged by `ack` and return its
    /// seq: from then on the message is in the history. (With Kafka edges
    /// the ack means "durable in Kafka" and comes before the seq; a client
    /// learns the seq from the push, PROTOCOL.md rule 5.)
    pub async fn stored(&mut self, ack: &Value) -> u64 {
        let id = ack["server_msg_id"].clone();
        assert!(id.is_string(), "not an ack: {ack}");
        let has = |f: &Value| {
            f["op"] == "push"
                && f["messages"]
                    .as_array()
                    .is_some_and(|m| m.iter().any(|m| m["server_msg_id"] == id))
        };
        let f = self.next_where(has).await;
        self.take_message(f, &id)["seq"]
            .as_u64()
            .expect("a pushed message has a seq")
    }

    /// The message `server_msg_id` out of the push frame `f`. A push frame
    /// merges whatever was queued for the connection, other conversations'
    /// messages too: the rest of it stays for later readers.
    pub fn take_message(&mut self, mut f: Value, server_msg_id: &Value) -> Value {
        let messages = f["messages"].as_array_mut().expect("push has messages");
        let at = messages
            .iter()
            .position(|m| m["server_msg_id"] == *server_msg_id)
            .expect("the push holds the message");
        let m = messages.remove(at);
        if !messages.is_empty() {
            self.backlog.push_front(f);
        }
        m
    }

    /// Messages from `push` frames until `n` have arrived, in arrival order.
    pub async fn pushed(&mut self, n: usize) -> Vec<Value> {
        self.pushed_where(n, |_| true).await
    }

    /// The next `n` messages pushed that a user sent: server notifications
    /// (content types from 1000, PROTOCOL v2) are skipped, since whether
    /// one written just before this client connected reaches it by push or
    /// only by sync depends on timing.
    pub async fn pushed_chat(&mut self, n: usize) -> Vec<Value> {
        self.pushed_where(n, |m| m["content_type"].as_u64().is_some_and(|t| t < 1000))
            .await
    }

    pub async fn pushed_where(&mut self, n: usize, keep: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut out = Vec::new();
        while out.len() < n {
            let f = self.next_where(|f| f["op"] == "push").await;
            out.extend(
                f["messages"]
                    .as_array()
                    .expect("push has messages")
                    .iter()
                    .filter(|m| keep(m))
                    .cloned(),
            );
        }
        out
    }

    /// The `push` frame carrying the message `server_msg_id`.
    pub async fn push_of(&mut self, server_msg_id: &Value) -> Value {
        self.next_where(|f| {
            f["op"] == "push"
                && f["messages"]
                    .as_array()
                    .is_some_and(|m| m.iter().any(|m| m["server_msg_id"] == *server_msg_id))
        })
        .await
    }
}

#[derive(Clone, Copy)]
pub enum Target<'a> {
    User(&'a str),
    Group(&'a str),
}

pub fn send_frame(to: Target<'_>, client_msg_id: &str, text: &str) -> Value {
    let mut f = json!({"op": "send", "client_msg_id": client_msg_id, "content_type": 101, "content": {"text": text}});
    match to {
        Target::User(u) => f["recv_id"] = json!(u),
        Target::Group(g) => f["group_id"] = json!(g),
    }
    f
}

/// Seqs of the messages of one conversation, in arrival order.
pub fn seqs_of(messages: &[Value], conversation: &str) -> Vec<u64> {
    messages
        .iter()
        .filter(|m| m["conversation_id"] == conversation)
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect()
}
