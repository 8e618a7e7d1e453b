//! The config file: where imflow listens, where it keeps its data, and the
//! knobs of its doors. `config/standalone.yaml` uses the embedded store;
//! `config/config.yaml` names the cluster's servers in the seed's shape
//! (`kafka`, `etcd`, `mysql.dbMysqlAddress`, `mongo.dbAddress`,
//! `redis.dbAddress`). Every field has a default; environment variables
//! override the two that differ per machine.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use imflow_gateways::http::HttpLimits;
use imflow_gateways::ws::WsSettings;
use imflow_stages::store::mongo::MongoSettings;
use imflow_stages::store::mysql::MysqlSettings;
use imflow_stages::store::redis::RedisSettings;
use imflow_stages::store::{Durability, S3Settings};
use imflow_stages::ClusterSettings;
use serde::Deserialize;

/// Shipped so a first run works out of the box; the log warns while it is used.
pub const DEFAULT_ADMIN_SECRET: &str = "imflow-admin-secret";

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The pipeline file; relative paths are taken from the current directory.
    /// If it does not exist, the pipeline built into the binary is used.
    pub pipeline: PathBuf,
    /// Where the embedded store lives. `IMFLOW_DATA_DIR` overrides it.
    pub data_dir: PathBuf,
    /// Secret for admin calls (`X-Admin-Secret`). `IMFLOW_ADMIN_SECRET` overrides it.
    pub admin_secret: String,
    /// Secret the processes of a cluster present to each other's internal
    /// ports; never the admin secret. `IMFLOW_CLUSTER_SECRET` overrides it.
    /// Required by `serve --process`.
    pub cluster_secret: String,
    pub listen: Listen,
    pub token_ttl_secs: i64,
    pub store: StoreConfig,
    pub websocket: WsSettings,
    /// Limits of the REST API and the internal ports: connections, header
    /// and request deadlines, requests per user.
    pub rest: HttpLimits,
    /// How long a graceful shutdown may take to drain the pipeline.
    pub shutdown_deadline_secs: u64,
    /// How long after sending a sender may revoke a message (PROTOCOL v2);
    /// a group's owner and admins may revoke any message at any time.
    pub revoke_window_secs: u64,
    /// Most members a group may have; adding past it is 409.
    pub max_group_members: usize,
    /// Largest file `POST /files` accepts (bytes); larger is 413.
    pub max_file_bytes: u64,
    /// How long an upload or download URL works.
    pub file_url_ttl_secs: u64,
    /// When set, the pipeline's edges that name a topic are carried by Kafka
    /// (the cluster data plane); otherwise every edge is in memory.
    pub kafka: Option<KafkaConfig>,
    /// Service discovery (the operators' cluster); checked, used by process
    /// groups.
    pub etcd: Option<EtcdConfig>,
    /// With `mysql`, `mongo` and `redis` the stores are the cluster's
    /// servers; without them, the embedded store in `data_dir`.
    pub mysql: Option<MysqlConfig>,
    pub mongo: Option<MongoConfig>,
    pub redis: Option<RedisConfig>,
    /// The cluster's object storage for files (S3 API: garage, MinIO, …);
    /// without it a cluster refuses files, and standalone keeps them under
    /// `data_dir/files`.
    pub s3: Option<S3Config>,
    /// The cluster's hosts and what each runs (`imflow plan`,
    /// script/start_all.sh). A host without `processes` runs every process
    /// kind: the groups of pipeline.yaml, `gateway` and `api`.
    pub hosts: Vec<HostConfig>,
    /// The web pages the API serves (`/app`, `/console`).
    pub web: WebConfig,
    /// Where this config was read from, so a live reload reads it again.
    #[serde(skip)]
    pub origin: Option<Origin>,
}

/// The web pages (`/app`, the chat page; `/console`, the operators').
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebConfig {
    /// The WebSocket URL the chat page connects to, e.g.
    /// `wss://im.example.com/ws` behind a proxy. Default: the page's own
    /// host at `listen.gateway`'s port.
    pub ws_url: Option<String>,
}

/// The file a config came from and what the command line set over it.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub path: PathBuf,
    /// A missing file is an error (else it means the defaults).
    pub required: bool,
    pub overrides: Overrides,
}

/// Settings given on `imflow serve`'s command line, which win over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub gateway: Option<SocketAddr>,
    pub api: Option<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// The address this host's processes listen on and announce.
    pub addr: String,
    /// Where this host's internal ports (10130+, 10140, 10170+) listen and
    /// are announced: an address of the cluster's private network. Default:
    /// `addr`.
    #[serde(default)]
    pub private_addr: Option<String>,
    #[serde(default)]
    pub processes: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct EtcdConfig {
    pub etcd_schema: String,
    pub etcd_addr: Vec<String>,
    pub user_name: String,
    pub password: String,
}

impl EtcdConfig {
    /// The credentials, when `userName` is set (etcd with auth on).
    pub fn user(&self) -> Option<(&str, &str)> {
        (!self.user_name.is_empty()).then_some((self.user_name.as_str(), self.password.as_str()))
    }
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            etcd_schema: "imflow".into(),
            etcd_addr: vec!["127.0.0.1:2379".into()],
            user_name: String::new(),
            password: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct MysqlConfig {
    /// The master first, then replicas (reads that may lag go there).
    pub db_mysql_address: Vec<String>,
    pub db_mysql_user_name: String,
    pub db_mysql_password: String,
    pub db_mysql_database_name: String,
    pub db_max_open_conns: u32,
}

impl Default for MysqlConfig {
    fn default() -> Self {
        let d = MysqlSettings::default();
        MysqlConfig {
            db_mysql_address: d.addrs,
            db_mysql_user_name: d.username,
            db_mysql_password: d.password,
            db_mysql_database_name: d.database,
            db_max_open_conns: d.max_connections,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct S3Config {
    /// The S3 API as the processes reach it, e.g. http://127.0.0.1:10005.
    pub endpoint: String,
    /// The S3 API as clients reach it, when that differs (e.g. behind
    /// nginx with TLS): the URLs handed to clients are signed for it.
    pub public_endpoint: String,
    pub region: String,
    pub bucket: String,
    #[serde(rename = "accessKeyID")]
    pub access_key_id: String,
    pub secret_access_key: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct MongoConfig {
    /// A full `mongodb://` URI; overrides the fields below when set.
    pub db_uri: String,
    /// Servers (mongos when sharded).
    pub db_address: Vec<String>,
    pub db_database: String,
    /// The authentication database.
    pub db_source: String,
    pub db_user_name: String,
    pub db_password: String,
    pub db_max_pool_size: u32,
}

impl Default for MongoConfig {
    fn default() -> Self {
        let d = MongoSettings::default();
        MongoConfig {
            db_uri: d.uri,
            db_address: d.addrs,
            db_database: d.database,
            db_source: d.auth_source,
            db_user_name: String::new(),
            db_password: String::new(),
            db_max_pool_size: d.max_pool_size,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct RedisConfig {
    /// One server, or the nodes of a Redis Cluster (`enableCluster: true`).
    pub db_address: Vec<String>,
    pub db_user_name: String,
    pub db_pass_word: String,
    pub enable_cluster: bool,
    /// Namespace of every key imflow writes.
    pub key_prefix: String,
    /// Recent messages cached per conversation.
    pub hot_messages: usize,
    /// How long a resend is recognised (s).
    pub resend_ttl_secs: u64,
    /// After how long a resend may take over a first copy that never
    /// became durable (its ingest process died) (s).
    pub resend_takeover_secs: u64,
    /// How long a message replayed from Kafka after a crash is recognised
    /// and keeps its seq (s); Redis holds ~100 bytes per message this long.
    pub replay_ttl_secs: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        let d = RedisSettings::default();
        RedisConfig {
            db_address: d.addrs,
            db_user_name: String::new(),
            db_pass_word: String::new(),
            enable_cluster: d.cluster,
            key_prefix: d.prefix,
            hot_messages: d.hot_keep,
            resend_ttl_secs: d.resend_ttl.as_secs(),
            resend_takeover_secs: d.resend_takeover.as_secs(),
            replay_ttl_secs: d.replay_ttl.as_secs(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers, as in the seed's `kafka.*.addr`.
    pub addr: Vec<String>,
    /// Consumer groups are named `PREFIX.STAGE`.
    pub group_prefix: String,
    /// How long a producer waits to fill a batch (ms).
    pub linger_ms: u32,
    /// Longest wait of a consumer's fetch on the broker (ms).
    pub fetch_wait_ms: u32,
    /// Most messages in one produce batch per partition.
    pub batch_messages: u32,
    /// How long a producer keeps trying one write before failing it (ms);
    /// the item is then handed to its stage again.
    pub message_timeout_ms: u64,
    /// How long the broker waits for a silent consumer before moving its
    /// partitions to the others (ms).
    pub session_timeout_ms: u64,
    /// How a consumer group shares partitions: `cooperative-sticky` (a
    /// member that dies moves only its own; the rest never stop) or an
    /// eager `range` / `roundrobin` (for brokers without incremental
    /// rebalancing; every member stops while the group settles).
    pub assignment: String,
    /// Where sink stages (webhooks) put what they gave up on.
    pub dead_letter_topic: String,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        let d = imflow_runtime::KafkaSettings::default();
        KafkaConfig {
            addr: vec![d.brokers],
            group_prefix: d.group_prefix,
            linger_ms: d.linger_ms,
            fetch_wait_ms: d.fetch_wait_ms,
            batch_messages: d.batch_messages,
            message_timeout_ms: d.message_timeout.as_millis() as u64,
            session_timeout_ms: d.session_timeout.as_millis() as u64,
            assignment: d.assignment,
            dead_letter_topic: "imflow_dead_letters".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Listen {
    /// WebSocket gateway (the seed's 10001).
    pub gateway: SocketAddr,
    /// REST API (the seed's 10002).
    pub api: SocketAddr,
    /// A cluster gateway's internal port (pushes from `push` processes,
    /// /healthz, /metrics); the seed's message gateway RPC port.
    pub gateway_rpc: u16,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `full`: fsync every commit (survives power loss); `normal`: survives a
    /// process crash only, faster.
    pub durability: Durability,
    /// How many of the most recent messages a resend is recognised against
    /// (about 24 bytes of memory each).
    pub dedup_remember: usize,
    /// Memory for the recent messages kept hot (bytes); least recently
    /// active conversations are dropped first.
    pub hot_cache_bytes: usize,
    /// Standalone: how long a group commit may wait for more messages
    /// (microseconds; 0: never). Taken only while commits are asked for
    /// faster than one per delay, so it costs a quiet server no latency.
    pub commit_delay_us: u64,
}

/// The longest `store.commit_delay_us` accepted: 100 ms. More is almost
/// surely milliseconds written as microseconds.
const MAX_COMMIT_DELAY_US: u64 = 100_000;

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            durability: Durability::default(),
            dedup_remember: imflow_stages::DEFAULT_DEDUP_REMEMBER,
            hot_cache_bytes: imflow_stages::hot::DEFAULT_HOT_BYTES,
            commit_delay_us: 1000,
        }
    }
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            gateway: SocketAddr::from(([0, 0, 0, 0], 10001)),
            api: SocketAddr::from(([0, 0, 0, 0], 10002)),
            gateway_rpc: 10140,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            pipeline: PathBuf::from("pipeline.yaml"),
            data_dir: PathBuf::from("data"),
            admin_secret: DEFAULT_ADMIN_SECRET.to_string(),
            cluster_secret: String::new(),
            listen: Listen::default(),
            token_ttl_secs: 7 * 24 * 3600,
            store: StoreConfig::default(),
            websocket: WsSettings::default(),
            rest: HttpLimits::default(),
            shutdown_deadline_secs: 10,
            revoke_window_secs: 120,
            max_group_members: 100_000,
            max_file_bytes: 100 * 1024 * 1024,
            file_url_ttl_secs: 900,
            kafka: None,
            etcd: None,
            mysql: None,
            mongo: None,
            redis: None,
            s3: None,
            hosts: Vec::new(),
            web: WebConfig::default(),
            origin: None,
        }
    }
}

impl Config {
    /// Read `path`; a missing default file means defaults.
    pub fn load(path: &Path, required: bool) -> anyhow::Result<Config> {
        let mut cfg = match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&path.display().to_string(), &text)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Config::default(),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot read config file {}", path.display()))
            }
        };
        cfg.apply_env();
        cfg.check(&path.display().to_string())?;
        cfg.origin = Some(Origin {
            path: path.to_path_buf(),
            required,
            overrides: Overrides::default(),
        });
        Ok(cfg)
    }

    /// Apply the command line's settings, and keep them for reloads.
    pub fn set_overrides(&mut self, o: Overrides) {
        if let Some(d) = &o.data_dir {
            self.data_dir = d.clone();
        }
        if let Some(a) = o.gateway {
            self.listen.gateway = a;
        }
        if let Some(a) = o.api {
            self.listen.api = a;
        }
        if let Some(origin) = &mut self.origin {
            origin.overrides = o;
        }
    }

    /// The config as its file says now, with the same command-line
    /// settings (itself when it was not read from a file).
    pub fn reread(&self) -> anyhow::Result<Config> {
        let Some(origin) = &self.origin else {
            return Ok(self.clone());
        };
        let mut cfg = Config::load(&origin.path, origin.required)?;
        cfg.set_overrides(origin.overrides.clone());
        Ok(cfg)
    }

    /// The settings `newer` changes that a running process takes only at
    /// start. The pipeline file and the shutdown deadline apply live.
    pub fn restart_needed(&self, newer: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        macro_rules! compare {
            ($($field:ident),*) => {$(
                if format!("{:?}", self.$field) != format!("{:?}", newer.$field) {
                    changed.push(stringify!($field));
                }
            )*};
        }
        compare!(
            data_dir,
            admin_secret,
            cluster_secret,
            listen,
            token_ttl_secs,
            store,
            websocket,
            rest,
            revoke_window_secs,
            max_group_members,
            max_file_bytes,
            file_url_ttl_secs,
            kafka,
            etcd,
            mysql,
            mongo,
            redis,
            s3,
            hosts,
            web
        );
        changed
    }

    pub fn parse(file: &str, text: &str) -> anyhow::Result<Config> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_yaml::from_str(text).map_err(|e| {
            let at = e
                .location()
                .map(|l| format!(":{}:{}", l.line(), l.column()))
                .unwrap_or_default();
            anyhow::anyhow!("{file}{at}: {e}; see config/standalone.yaml and config/config.yaml in the imflow sources for every field and its default")
        })
    }

    pub fn apply_env(&mut self) {
        if let Some(d) = std::env::var_os("IMFLOW_DATA_DIR").filter(|v| !v.is_empty()) {
            self.data_dir = PathBuf::from(d);
        }
        if let Ok(s) = std::env::var("IMFLOW_ADMIN_SECRET") {
            if !s.is_empty() {
                self.admin_secret = s;
            }
        }
        if let Ok(s) = std::env::var("IMFLOW_CLUSTER_SECRET") {
            if !s.is_empty() {
                self.cluster_secret = s;
            }
        }
    }

    pub fn check(&self, file: &str) -> anyhow::Result<()> {
        if self.admin_secret.len() < 8 {
            bail!("{file}: admin_secret must be at least 8 characters; set a longer one (or IMFLOW_ADMIN_SECRET)");
        }
        if self.token_ttl_secs <= 0 {
            bail!("{file}: token_ttl_secs must be positive, e.g. 604800 for a week");
        }
        if self.websocket.max_connections == 0 {
            bail!("{file}: websocket.max_connections must be at least 1");
        }
        if self.store.commit_delay_us > MAX_COMMIT_DELAY_US {
            bail!("{file}: store.commit_delay_us is {} µs, more than {MAX_COMMIT_DELAY_US} (every busy commit, and its senders' acks, would wait that long); it is in microseconds: e.g. 1000, or 0 for none", self.store.commit_delay_us);
        }
        if let Some(url) = &self.web.ws_url {
            if !(url.starts_with("ws://") || url.starts_with("wss://")) {
                bail!("{file}: web.ws_url `{url}` is not a WebSocket URL; give one like wss://im.example.com/ws, or leave it out to use the page's host at listen.gateway's port");
            }
        }
        for (i, h) in self.hosts.iter().enumerate() {
            if h.addr.parse::<std::net::IpAddr>().is_err() {
                bail!("{file}: hosts[{i}].addr `{}` is not an IP address; give the address this host's processes listen on, e.g. 10.0.0.5", h.addr);
            }
            if self.hosts[..i].iter().any(|o| o.addr == h.addr) {
                bail!("{file}: hosts[{i}].addr `{}` is listed twice", h.addr);
            }
            if let Some(p) = &h.private_addr {
                if p.parse::<std::net::IpAddr>().is_err() {
                    bail!("{file}: hosts[{i}].private_addr `{p}` is not an IP address; give this host's address on the cluster's private network, e.g. 10.0.0.5");
                }
            }
        }
        if let Some(k) = &self.kafka {
            if k.addr.is_empty()
                || k.addr
                    .iter()
                    .any(|a| a.trim().is_empty() || !a.contains(':'))
            {
                bail!("{file}: kafka.addr must list brokers as host:port, e.g. [127.0.0.1:9092]");
            }
            if k.message_timeout_ms < 1000 {
                bail!("{file}: kafka.message_timeout_ms must be at least 1000, e.g. 30000");
            }
            if k.dead_letter_topic.trim().is_empty() {
                bail!("{file}: kafka.dead_letter_topic is empty; name the topic for dead letters (e.g. imflow_dead_letters)");
            }
            if !["cooperative-sticky", "range", "roundrobin"].contains(&k.assignment.as_str()) {
                bail!("{file}: kafka.assignment must be cooperative-sticky, range or roundrobin");
            }
            if !(1000..=300_000).contains(&k.session_timeout_ms) {
                bail!("{file}: kafka.session_timeout_ms must be between 1000 and 300000 (and within the broker's group.min/max.session.timeout.ms), e.g. 10000");
            }
        }
        let cluster = [
            ("mysql", self.mysql.is_some()),
            ("mongo", self.mongo.is_some()),
            ("redis", self.redis.is_some()),
        ];
        if cluster.iter().any(|(_, set)| *set) {
            if let Some((missing, _)) = cluster.iter().find(|(_, set)| !*set) {
                bail!("{file}: `{missing}` is missing: cluster stores need all of mysql, mongo and redis (see config/config.yaml), or none of them for the embedded store");
            }
        }
        fn addrs(file: &str, field: &str, list: &[String], example: &str) -> anyhow::Result<()> {
            if list.is_empty() || list.iter().any(|a| a.trim().is_empty() || !a.contains(':')) {
                bail!("{file}: {field} must list servers as host:port, e.g. [{example}]");
            }
            Ok(())
        }
        if let Some(m) = &self.mysql {
            addrs(
                file,
                "mysql.dbMysqlAddress",
                &m.db_mysql_address,
                "127.0.0.1:13306",
            )?;
            if m.db_mysql_user_name.is_empty() {
                bail!("{file}: mysql.dbMysqlUserName must be set, e.g. root");
            }
        }
        if let Some(m) = &self.mongo {
            if m.db_uri.is_empty() {
                addrs(file, "mongo.dbAddress", &m.db_address, "127.0.0.1:37017")?;
            } else if !m.db_uri.starts_with("mongodb://") && !m.db_uri.starts_with("mongodb+srv://")
            {
                bail!("{file}: mongo.dbUri must start with mongodb:// (or leave it empty and set mongo.dbAddress)");
            }
            if m.db_database.is_empty() {
                bail!("{file}: mongo.dbDatabase must be set, e.g. imflow");
            }
        }
        if let Some(r) = &self.redis {
            addrs(file, "redis.dbAddress", &r.db_address, "127.0.0.1:16379")?;
            if r.key_prefix.is_empty() || r.key_prefix.contains(['{', '}', ' ']) {
                bail!("{file}: redis.keyPrefix must be non-empty without braces or spaces, e.g. imflow");
            }
            if r.resend_ttl_secs == 0 {
                bail!("{file}: redis.resendTtlSecs must be at least 1, e.g. 86400");
            }
            if r.resend_takeover_secs == 0 || r.resend_takeover_secs > 300 {
                bail!("{file}: redis.resendTakeoverSecs must be between 1 and 300, e.g. 10");
            }
            if r.replay_ttl_secs < 60 {
                bail!("{file}: redis.replayTtlSecs must be at least 60, e.g. 3600 (a crashed process restarted later than this may store its last uncommitted messages twice)");
            }
        }
        if let Some(e) = &self.etcd {
            addrs(file, "etcd.etcdAddr", &e.etcd_addr, "127.0.0.1:2379")?;
        }
        if let Some(s) = &self.s3 {
            if !(s.endpoint.starts_with("http://") || s.endpoint.starts_with("https://")) {
                bail!("{file}: s3.endpoint must be an http:// or https:// URL, e.g. http://127.0.0.1:10005");
            }
            for (field, value) in [
                ("region", &s.region),
                ("bucket", &s.bucket),
                ("accessKeyID", &s.access_key_id),
                ("secretAccessKey", &s.secret_access_key),
            ] {
                if value.is_empty() {
                    bail!("{file}: s3.{field} must be set (the object store's {field}; script/infra.sh prints the local garage's)");
                }
            }
        }
        if self.max_file_bytes == 0 {
            bail!("{file}: max_file_bytes must be at least 1, e.g. 104857600 (100 MiB)");
        }
        if self.file_url_ttl_secs == 0 || self.file_url_ttl_secs > 7 * 24 * 3600 {
            bail!("{file}: file_url_ttl_secs must be 1 to 604800 (S3 signs for at most a week), e.g. 900");
        }
        if self.max_group_members < 2 {
            bail!("{file}: max_group_members must be at least 2, e.g. 100000");
        }
        if self.rest.max_connections == 0 {
            bail!("{file}: rest.max_connections must be at least 1, e.g. 10000");
        }
        if self.websocket.max_pending_acks == 0 {
            bail!("{file}: websocket.max_pending_acks must be at least 1, e.g. 1024");
        }
        // The push stage hands a connection up to 32 messages between two
        // of its turns (stages/src/kinds/push.rs): a smaller queue would
        // close clients that read fine.
        if self.websocket.outgoing_queue < 64 {
            bail!("{file}: websocket.outgoing_queue must be at least 64 (a burst of pushes to one client is queued whole), e.g. 1024");
        }
        Ok(())
    }
}

impl Config {
    /// Where the chat page finds the gateway, which listens on `ws_port`.
    pub fn app_settings(&self, ws_port: u16) -> imflow_gateways::web::AppSettings {
        imflow_gateways::web::AppSettings {
            ws_url: self.web.ws_url.clone(),
            ws_port,
        }
    }

    /// The protocol's configurable rules.
    pub fn rules(&self) -> imflow_gateways::api::Rules {
        imflow_gateways::api::Rules {
            revoke_window_secs: self.revoke_window_secs,
            max_group_members: self.max_group_members,
            max_file_bytes: self.max_file_bytes,
            file_url_ttl: std::time::Duration::from_secs(self.file_url_ttl_secs),
        }
    }

    /// What one process of a multi-process cluster needs beyond `check`:
    /// its internal ports are guarded by the cluster secret, so neither the
    /// shipped admin secret nor a missing or reused cluster secret will do.
    pub fn check_cluster_process(&self, file: &str) -> anyhow::Result<()> {
        if self.admin_secret == DEFAULT_ADMIN_SECRET {
            bail!("{file}: admin_secret is the shipped default `{DEFAULT_ADMIN_SECRET}`, which a cluster's processes refuse: set your own (or IMFLOW_ADMIN_SECRET), the same on every host");
        }
        if self.cluster_secret.len() < 16 {
            bail!("{file}: cluster_secret must be set, at least 16 characters (or IMFLOW_CLUSTER_SECRET), the same on every host; it guards the processes' internal ports");
        }
        if self.cluster_secret == self.admin_secret {
            bail!("{file}: cluster_secret must differ from admin_secret: a process's internal ports must not accept the admin's secret, nor the API the cluster's");
        }
        Ok(())
    }

    /// Where `host`'s internal ports listen and are announced.
    pub fn private_addr(&self, host: std::net::IpAddr) -> std::net::IpAddr {
        self.hosts
            .iter()
            .find(|h| h.addr.parse::<std::net::IpAddr>().ok() == Some(host))
            .and_then(|h| h.private_addr.as_ref()?.parse().ok())
            .unwrap_or(host)
    }

    /// The cluster's servers, when the config names them.
    pub fn cluster_settings(&self) -> Option<ClusterSettings> {
        let (m, g, r) = (
            self.mysql.as_ref()?,
            self.mongo.as_ref()?,
            self.redis.as_ref()?,
        );
        let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Some(ClusterSettings {
            mysql: MysqlSettings {
                addrs: m.db_mysql_address.clone(),
                username: m.db_mysql_user_name.clone(),
                password: m.db_mysql_password.clone(),
                database: m.db_mysql_database_name.clone(),
                max_connections: m.db_max_open_conns.max(1),
            },
            mongo: MongoSettings {
                uri: g.db_uri.clone(),
                addrs: g.db_address.clone(),
                database: g.db_database.clone(),
                username: some(&g.db_user_name),
                password: some(&g.db_password),
                auth_source: g.db_source.clone(),
                max_pool_size: g.db_max_pool_size.max(1),
            },
            redis: RedisSettings {
                addrs: r.db_address.clone(),
                cluster: r.enable_cluster,
                username: some(&r.db_user_name),
                password: some(&r.db_pass_word),
                prefix: r.key_prefix.clone(),
                hot_keep: r.hot_messages,
                resend_ttl: std::time::Duration::from_secs(r.resend_ttl_secs),
                replay_ttl: std::time::Duration::from_secs(r.replay_ttl_secs),
                resend_takeover: std::time::Duration::from_secs(r.resend_takeover_secs),
                ..RedisSettings::default()
            },
            s3: self.s3.as_ref().map(|s| S3Settings {
                endpoint: s.endpoint.clone(),
                public_endpoint: some(&s.public_endpoint),
                region: s.region.clone(),
                bucket: s.bucket.clone(),
                access_key_id: s.access_key_id.clone(),
                secret_access_key: s.secret_access_key.clone(),
            }),
        })
    }

    /// Where the data lives, for the start-up log.
    pub fn stores_description(&self) -> String {
        match (&self.mysql, &self.mongo, &self.redis) {
            (Some(m), Some(g), Some(r)) => format!(
                "mysql {} / mongo {} / redis {}",
                m.db_mysql_address.join(","),
                if g.db_uri.is_empty() {
                    g.db_address.join(",")
                } else {
                    "(dbUri)".into()
                },
                r.db_address.join(",")
            ),
            _ => format!("embedded in {}", self.data_dir.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_named_with_their_place() {
        let err = Config::parse("c.yaml", "listen:\n  gatway: 127.0.0.1:1\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c.yaml:2:"), "{err}");
        assert!(err.contains("gatway"), "{err}");
    }

    #[test]
    fn a_commit_delay_in_milliseconds_by_mistake_is_refused() {
        let c = Config::parse("c.yaml", "store:\n  commit_delay_us: 1000000\n").unwrap();
        let err = c.check("c.yaml").unwrap_err().to_string();
        assert!(err.contains("store.commit_delay_us is 1000000 µs"), "{err}");
        let c = Config::parse("c.yaml", "store:\n  commit_delay_us: 100000\n").unwrap();
        c.check("c.yaml").expect("100 ms is allowed");
    }

    #[test]
    fn cluster_stores_need_all_three_sections() {
        let c = Config::parse("c.yaml", "mysql: {}\nredis: {}\n").unwrap();
        let err = c.check("c.yaml").unwrap_err().to_string();
        assert!(err.contains("`mongo` is missing"), "{err}");
        let c = Config::parse(
            "c.yaml",
            "mysql: {}\nmongo: {}\nredis: {dbAddress: [nowhere]}\n",
        )
        .unwrap();
        let err = c.check("c.yaml").unwrap_err().to_string();
        assert!(
            err.contains("redis.dbAddress must list servers as host:port"),
            "{err}"
        );
    }

    #[test]
    fn the_shipped_cluster_config_points_at_the_seed_ports() {
        let text = include_str!("../config/config.yaml");
        let c = Config::parse("config/config.yaml", text).unwrap();
        c.check("config/config.yaml").unwrap();
        let s = c.cluster_settings().expect("cluster stores");
        assert_eq!(s.mysql.addrs, ["127.0.0.1:13306"]);
        assert_eq!(s.mongo.addrs, ["127.0.0.1:37017"]);
        assert_eq!(s.redis.addrs, ["127.0.0.1:16379"]);
        assert_eq!(c.kafka.unwrap().addr, ["127.0.0.1:9092"]);
    }

    /// config/standalone.yaml says its values are the defaults: they are.
    #[test]
    fn the_shipped_standalone_config_shows_the_defaults() {
        let text = include_str!("../config/standalone.yaml");
        let c = Config::parse("config/standalone.yaml", text).unwrap();
        let d = Config::default();
        assert_eq!(c.store.dedup_remember, d.store.dedup_remember);
        assert_eq!(c.store.hot_cache_bytes, d.store.hot_cache_bytes);
        assert_eq!(c.store.durability, d.store.durability);
        assert_eq!(c.store.commit_delay_us, d.store.commit_delay_us);
        assert_eq!(c.token_ttl_secs, d.token_ttl_secs);
        assert_eq!(c.shutdown_deadline_secs, d.shutdown_deadline_secs);
        assert_eq!(c.revoke_window_secs, d.revoke_window_secs);
        assert_eq!(c.max_group_members, d.max_group_members);
        assert_eq!(c.listen.gateway, d.listen.gateway);
        assert_eq!(c.listen.api, d.listen.api);
        let (w, dw) = (&c.websocket, &d.websocket);
        assert_eq!(
            (
                w.max_connections,
                w.rate_limit_per_sec,
                w.rate_limit_burst,
                w.max_pending_acks,
                w.outgoing_queue,
                w.read_buffer_bytes
            ),
            (
                dw.max_connections,
                dw.rate_limit_per_sec,
                dw.rate_limit_burst,
                dw.max_pending_acks,
                dw.outgoing_queue,
                dw.read_buffer_bytes
            )
        );
        let (r, dr) = (&c.rest, &d.rest);
        assert_eq!(
            (
                r.max_connections,
                r.header_timeout_secs,
                r.request_timeout_secs,
                r.rate_limit_per_sec,
                r.rate_limit_burst
            ),
            (
                dr.max_connections,
                dr.header_timeout_secs,
                dr.request_timeout_secs,
                dr.rate_limit_per_sec,
                dr.rate_limit_burst
            )
        );
    }

    #[test]
    fn defaults_follow_the_seed() {
        let c = Config::parse("c.yaml", "").unwrap();
        assert_eq!(c.listen.gateway.port(), 10001);
        assert_eq!(c.listen.api.port(), 10002);
    }
}
