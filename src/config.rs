//! `config/standalone.yaml`: where imflow listens, where it keeps its data,
//! and the knobs of its doors. Every field has a default; environment
//! variables override the two that differ per machine.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use imflow_gateways::ws::WsSettings;
use imflow_stages::store::Durability;
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
    pub listen: Listen,
    pub token_ttl_secs: i64,
    pub store: StoreConfig,
    pub websocket: WsSettings,
    /// How long a graceful shutdown may take to drain the pipeline.
    pub shutdown_deadline_secs: u64,
    /// When set, the pipeline's edges that name a topic are carried by Kafka
    /// (the cluster data plane); otherwise every edge is in memory.
    pub kafka: Option<KafkaConfig>,
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
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            addr: vec!["127.0.0.1:9092".into()],
            group_prefix: "imflow".into(),
            linger_ms: 2,
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
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            durability: Durability::default(),
            dedup_remember: imflow_stages::DEFAULT_DEDUP_REMEMBER,
        }
    }
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            gateway: SocketAddr::from(([0, 0, 0, 0], 10001)),
            api: SocketAddr::from(([0, 0, 0, 0], 10002)),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            pipeline: PathBuf::from("pipeline.yaml"),
            data_dir: PathBuf::from("data"),
            admin_secret: DEFAULT_ADMIN_SECRET.to_string(),
            listen: Listen::default(),
            token_ttl_secs: 7 * 24 * 3600,
            store: StoreConfig::default(),
            websocket: WsSettings::default(),
            shutdown_deadline_secs: 10,
            kafka: None,
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
        Ok(cfg)
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
            anyhow::anyhow!("{file}{at}: {e}; see config/standalone.yaml in the imflow sources for every field and its default")
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
        if let Some(k) = &self.kafka {
            if k.addr.is_empty()
                || k.addr
                    .iter()
                    .any(|a| a.trim().is_empty() || !a.contains(':'))
            {
                bail!("{file}: kafka.addr must list brokers as host:port, e.g. [127.0.0.1:9092]");
            }
        }
        if self.websocket.outgoing_queue == 0 || self.websocket.max_pending_acks == 0 {
            bail!("{file}: websocket.outgoing_queue and websocket.max_pending_acks must be at least 1");
        }
        Ok(())
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
    fn defaults_follow_the_seed() {
        let c = Config::parse("c.yaml", "").unwrap();
        assert_eq!(c.listen.gateway.port(), 10001);
        assert_eq!(c.listen.api.port(), 10002);
    }
}
