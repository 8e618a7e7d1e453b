//! The processes the operators' tools (`top`, `tap`) talk to: those etcd
//! lists for a cluster (their internal ports, with the cluster secret), or
//! the standalone server's API (with the admin secret).

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::config::Config;

/// One process, and how to get in.
pub struct Process {
    /// `ROLE#INDEX@HOST`, or `imflow` for a standalone server.
    pub name: String,
    /// `http://ADDR`, without a trailing slash.
    pub base: String,
    /// The header its endpoints want.
    pub secret: Option<(&'static str, String)>,
}

/// The processes of `config`; without one, the cluster of
/// config/config.yaml if its etcd lists processes, else the standalone
/// server of config/standalone.yaml.
pub async fn processes(config: Option<&Path>) -> anyhow::Result<Vec<Process>> {
    let (path, cfg) = match config {
        Some(path) => (path.to_path_buf(), Config::load(path, true)?),
        None => {
            let cluster = PathBuf::from("config/config.yaml");
            let cfg = Config::load(&cluster, false).ok();
            let running = match &cfg {
                Some(cfg) => members_of(cfg).await.is_ok_and(|m| !m.is_empty()),
                None => false,
            };
            match cfg {
                Some(cfg) if running => (cluster, cfg),
                _ => {
                    let standalone = PathBuf::from("config/standalone.yaml");
                    (standalone.clone(), Config::load(&standalone, false)?)
                }
            }
        }
    };
    of_config(&path, &cfg).await
}

/// The processes of a config already read from `path`.
pub(crate) async fn of_config(path: &Path, cfg: &Config) -> anyhow::Result<Vec<Process>> {
    let Some(etcd) = &cfg.etcd else {
        let mut api = cfg.listen.api;
        if api.ip().is_unspecified() {
            api.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        return Ok(vec![Process {
            name: "imflow".into(),
            base: format!("http://{api}"),
            secret: Some(("x-admin-secret", cfg.admin_secret.clone())),
        }]);
    };
    let mut members = members_of(cfg)
        .await
        .with_context(|| format!("{}: etcd", path.display()))?;
    members.sort_by(|a, b| (&a.role, a.index, &a.host).cmp(&(&b.role, b.index, &b.host)));
    if members.is_empty() {
        anyhow::bail!(
            "etcd ({}) lists no imflow process: is the cluster started (script/start_all.sh)?",
            etcd.etcd_addr.join(",")
        );
    }
    Ok(members
        .into_iter()
        .map(|m| Process {
            name: format!("{}#{}@{}", m.role, m.index, m.host),
            base: format!("http://{}", m.addr),
            secret: Some((
                imflow_gateways::cluster::SECRET_HEADER,
                cfg.cluster_secret.clone(),
            )),
        })
        .collect())
}

/// The processes a cluster's etcd lists.
async fn members_of(cfg: &Config) -> anyhow::Result<Vec<imflow_gateways::discovery::Member>> {
    let Some(etcd) = &cfg.etcd else {
        anyhow::bail!("no etcd section");
    };
    let discovery = imflow_gateways::discovery::Discovery::connect(
        &etcd.etcd_addr,
        &etcd.etcd_schema,
        etcd.user(),
    )
    .await?;
    Ok(discovery.members().await?.0)
}
