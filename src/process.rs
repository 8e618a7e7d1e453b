//! One process of a cluster: a process group of `pipeline.yaml`, a
//! gateway, or the REST API, on one host. `imflow serve --process NAME
//! --index I --host ADDR` runs it; `imflow plan` lists what a host runs.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::{bail, Context};
use imflow_gateways::api::{Api, ClusterDoor};
use imflow_gateways::auth::Auth;
use imflow_gateways::cluster::{rpc_router, DoorLink, RemoteIngest, RemotePresence, RpcState};
use imflow_gateways::connections::Connections;
use imflow_gateways::discovery::{Discovery, Member};
use imflow_gateways::reload::{ReloadReport, Reloader};
use imflow_gateways::rest::{router, RestState};
use imflow_runtime::{CompiledPipeline, RunningTopology};
use imflow_stages::roles::{INGEST_DOOR, PRESENCE};
use imflow_stages::{Backends, Door, Presence, Resends, Services};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::reload::{Pipeline, Scope};
use crate::running::{serve_http, wait_for_consumers, Parts, Running};
use crate::{kafka_settings, load_pipeline, prometheus, Config};

/// Which process this is.
#[derive(Debug, Clone)]
pub struct Placement {
    pub process: String,
    pub index: u32,
    pub host: IpAddr,
}

/// One line of a host's plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub process: String,
    pub index: u32,
    /// The port a health check reaches (none for a `count` group).
    pub port: Option<u16>,
}

/// The processes `host` runs: every group of the pipeline and both doors,
/// or the subset its `hosts` entry names.
pub fn plan(cfg: &Config, pipeline: &CompiledPipeline, host: &str) -> anyhow::Result<Vec<Planned>> {
    let subset = match cfg.hosts.iter().find(|h| h.addr == host) {
        Some(h) => h.processes.clone(),
        None if cfg.hosts.is_empty() => None,
        None => {
            let known: Vec<&str> = cfg.hosts.iter().map(|h| h.addr.as_str()).collect();
            bail!(
                "host {host} is not in the config's `hosts` ({}); add it or pass one of those",
                known.join(", ")
            );
        }
    };
    let mut all: Vec<Planned> = Vec::new();
    for g in &pipeline.processes {
        for i in 0..g.instances() {
            all.push(Planned {
                process: g.name.clone(),
                index: i,
                port: g.port(i),
            });
        }
    }
    all.push(Planned {
        process: "gateway".into(),
        index: 0,
        port: Some(cfg.listen.gateway.port()),
    });
    all.push(Planned {
        process: "api".into(),
        index: 0,
        port: Some(cfg.listen.api.port()),
    });
    if let Some(names) = subset {
        for n in &names {
            if !all.iter().any(|p| &p.process == n) {
                bail!("hosts: host {host} lists process `{n}`, which is neither a process group of {} nor gateway/api", pipeline.file);
            }
        }
        all.retain(|p| names.contains(&p.process));
    }
    Ok(all)
}

/// A running cluster process.
pub struct ProcessServer {
    /// Where it serves: its internal port, or the door's public port.
    pub addr: SocketAddr,
    pub placement: Placement,
    running: Running,
    reloader: Reloader,
}

/// A `Presence` for processes that push to nobody.
struct Nobody;
impl Presence for Nobody {
    fn deliver(&self, _: &str, _: &imflow_stages::PushItem) {}
    /// Lent only to groups where no stage needs presence: never asked.
    fn is_online(&self, _: &str) -> bool {
        false
    }
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("{what}: cannot listen on {addr}"))
}

impl ProcessServer {
    pub async fn start(cfg: Config, placement: Placement) -> anyhow::Result<ProcessServer> {
        cfg.check_cluster_process("the config")?;
        // Before any metric handle is made: handles made earlier record nowhere.
        prometheus();
        let settings = cfg.cluster_settings().context(
            "a cluster process needs the cluster stores: mysql, mongo and redis in the config",
        )?;
        let kafka =
            kafka_settings(&cfg).context("a cluster process needs `kafka` in the config")?;
        let etcd = cfg
            .etcd
            .clone()
            .context("a cluster process needs `etcd` in the config")?;
        let backends = Backends::cluster(&settings).await?;
        let Resends::Redis(redis) = backends.resends.clone() else {
            bail!("cluster stores without Redis");
        };
        let discovery = Discovery::connect(&etcd.etcd_addr, &etcd.etcd_schema, etcd.user()).await?;
        let stop = CancellationToken::new();
        let members = discovery.watch(stop.clone()).await?;
        let secret = cfg.cluster_secret.clone();
        let host = placement.host;
        // Internal ports listen on the private network's address.
        let private = cfg.private_addr(host);
        let draining = CancellationToken::new();
        let tracker = TaskTracker::new();
        let conns = Arc::new(Connections::new(cfg.websocket.outgoing_queue));
        let metrics = Arc::new(crate::render_metrics);

        let mut running_pipeline = None;
        let mut door_handle = Door::default();
        let gauges = crate::reload::GaugeSlot::default();
        let (reloader, reloads) = crate::reload::channel();
        let mut servers: Vec<tokio::task::JoinHandle<()>> = Vec::new();
        let accept_stop = CancellationToken::new();
        let mut kinds = Vec::new();
        let mut provides = Vec::new();
        let addr;
        let door = |services: Services, link: Arc<DoorLink>| async {
            let auth = Auth::new(
                services.directory.clone(),
                cfg.admin_secret.clone(),
                cfg.token_ttl_secs,
            )
            .await?;
            anyhow::Ok(Arc::new(Api {
                services,
                auth,
                conns: conns.clone(),
                ingest: Default::default(),
                cluster: Some(ClusterDoor {
                    ingest: RemoteIngest::new(members.clone(), &secret),
                    link,
                }),
                rules: cfg.rules(),
            }))
        };
        match placement.process.as_str() {
            "gateway" => {
                let services = Services::open(backends.clone(), conns.clone()).await?;
                let ws = bind(
                    SocketAddr::new(host, cfg.listen.gateway.port()),
                    "listen.gateway",
                )
                .await?;
                let rpc = bind(
                    SocketAddr::new(private, cfg.listen.gateway_rpc),
                    "listen.gateway_rpc",
                )
                .await?;
                addr = rpc.local_addr()?;
                let link = DoorLink::gateway(
                    redis.clone(),
                    &addr.to_string(),
                    conns.clone(),
                    members.clone(),
                    backends.directory.clone(),
                )
                .await?;
                let api = door(services, link).await?;
                servers.push(tokio::spawn({
                    let f = imflow_gateways::ws::serve(
                        ws,
                        api,
                        cfg.websocket.clone(),
                        accept_stop.clone(),
                        tracker.clone(),
                    );
                    async move {
                        let _ = f.await;
                    }
                }));
                servers.push(serve_http(
                    rpc,
                    rpc_router(RpcState {
                        secret: secret.as_str().into(),
                        ingest: Default::default(),
                        conns: Some(conns.clone()),
                        metrics: metrics.clone(),
                        draining: draining.clone(),
                        reload: Some(reloader.clone()),
                    }),
                    accept_stop.clone(),
                    &cfg.rest,
                ));
            }
            "api" => {
                let services = Services::open(backends.clone(), conns.clone()).await?;
                let listener =
                    bind(SocketAddr::new(host, cfg.listen.api.port()), "listen.api").await?;
                addr = listener.local_addr()?;
                let link = DoorLink::api(redis.clone(), &addr.to_string(), members.clone());
                let api = door(services, link).await?;
                servers.push(serve_http(
                    listener,
                    router(RestState {
                        api,
                        metrics: metrics.clone(),
                        draining: draining.clone(),
                        per_user: imflow_gateways::rest::user_rate(&cfg.rest),
                        reload: Some(reloader.clone()),
                        overview: Some(crate::console::overview(
                            &cfg,
                            imflow_stages::registry(),
                            metrics.clone(),
                        )),
                        app: Arc::new(cfg.app_settings(cfg.listen.gateway.port())),
                    }),
                    accept_stop.clone(),
                    &cfg.rest,
                ));
            }
            group => {
                let registry = imflow_stages::registry();
                let pipeline = load_pipeline(&cfg.pipeline, false, &registry)?;
                let Some(g) = pipeline.process(group).cloned() else {
                    let mut names: Vec<&str> =
                        pipeline.processes.iter().map(|p| p.name.as_str()).collect();
                    names.extend(["gateway", "api"]);
                    bail!(
                        "--process {group}: no such process in {}; processes: {}",
                        pipeline.file,
                        names.join(", ")
                    );
                };
                if placement.index >= g.instances() {
                    bail!(
                        "--index {}: process `{group}` has {} instances (0..{})",
                        placement.index,
                        g.instances(),
                        g.instances() - 1
                    );
                }
                // Only a group that pushes follows where users are online.
                let follows = pipeline.needs(Some(group), PRESENCE.id());
                let presence: Arc<dyn Presence> = if follows {
                    RemotePresence::start(redis.clone(), members.clone(), &secret, stop.clone())
                } else {
                    Arc::new(Nobody)
                };
                let services = Services::open(backends.clone(), presence).await?;
                for n in pipeline.stages_of(Some(group)) {
                    kinds.push(n.kind.clone());
                    provides.extend(n.provides.iter().map(|r| r.to_string()));
                }
                crate::ensure_topics(&kafka, &pipeline).await?;
                let port = g.port(placement.index).unwrap_or(0);
                let rpc = bind(
                    SocketAddr::new(private, port),
                    &format!("processes.{group}.ports"),
                )
                .await?;
                addr = rpc.local_addr()?;
                let lend = crate::reload::lender(
                    &cfg,
                    &services,
                    Some(kafka.clone()),
                    None,
                    Some(group.to_string()),
                    follows,
                );
                let resources = lend(&pipeline).await?;
                let t =
                    RunningTopology::start_group(&pipeline, &registry, &resources, &kafka, group)?;
                wait_for_consumers(&t).await;
                gauges.set(t.queue_gauges());
                door_handle = Door::new(t.provided(&INGEST_DOOR));
                servers.push(serve_http(
                    rpc,
                    rpc_router(RpcState {
                        secret: secret.as_str().into(),
                        ingest: door_handle.clone(),
                        conns: None,
                        metrics: metrics.clone(),
                        draining: draining.clone(),
                        reload: Some(reloader.clone()),
                    }),
                    accept_stop.clone(),
                    &cfg.rest,
                ));
                running_pipeline = Some((t, pipeline, resources, registry, lend));
            }
        }
        let registration = discovery
            .register(
                Member {
                    role: placement.process.clone(),
                    index: placement.index,
                    host: host.to_string(),
                    addr: addr.to_string(),
                    pid: std::process::id(),
                    kinds,
                    provides,
                },
                stop.clone(),
            )
            .await?;
        tracing::info!(process = %placement.process, index = placement.index, %addr, "imflow process serving");

        let name = format!("{}#{}", placement.process, placement.index);
        let pipeline = match running_pipeline {
            Some((t, compiled, resources, registry, lend)) => Pipeline {
                name,
                scope: Scope::Group(placement.process.clone()),
                topology: Some(t),
                compiled: Some((compiled, resources)),
                registry,
                config: cfg,
                kafka: Some(kafka),
                lend,
                door: door_handle,
                gauges,
                broken: None,
            },
            None => Pipeline {
                name,
                scope: Scope::Doors,
                topology: None,
                compiled: None,
                registry: imflow_stages::registry(),
                config: cfg,
                kafka: Some(kafka),
                lend: Box::new(|_| Box::pin(async { Ok(imflow_runtime::Resources::new()) })),
                door: door_handle,
                gauges,
                broken: None,
            },
        };
        let running = Running::start(
            stop,
            Parts {
                leave: Some(registration),
                draining,
                accept_stop,
                pipeline,
                reloads,
                conns,
                tracker,
                servers,
                backends,
            },
        );
        Ok(ProcessServer {
            addr,
            placement,
            running,
            reloader,
        })
    }

    /// Wait until the process stops on its own (a pipeline failure).
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        self.running.wait().await
    }

    /// Re-read the config and pipeline file and swap this process's stages
    /// for the file's (what `SIGHUP` does).
    pub async fn reload(&self) -> ReloadReport {
        (self.reloader)().await
    }

    /// Graceful shutdown: out of etcd first, then drain.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.running.stop().await
    }
}
