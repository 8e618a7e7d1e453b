//! The imflow binary's wiring: it opens the store, registers the stage kinds,
//! compiles and starts the pipeline, and opens the doors. Library so that the
//! end-to-end tests can run a real server in-process on ephemeral ports.

pub mod config;
mod console;
pub mod nginx;
pub mod pipetest;
pub mod process;
pub mod reload;
mod running;
pub mod supervise;
pub mod tap;
mod targets;
pub mod token;
pub mod top;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use imflow_gateways::api::Api;
use imflow_gateways::auth::Auth;
use imflow_gateways::connections::Connections;
use imflow_gateways::reload::ReloadReport;
use imflow_gateways::rest::{router, RestState};
use imflow_runtime::{compile, CompiledPipeline, Registry, RunningTopology};
use imflow_stages::roles::INGEST_DOOR;
use imflow_stages::store::dead_letters::KafkaDeadLetters;
use imflow_stages::store::DeadLetters;
use imflow_stages::store::SqliteStore;
use imflow_stages::{Backends, Door, Services};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use running::{Parts, Running};

pub use config::Config;

/// The pipeline compiled into the binary, used when no pipeline file exists.
pub const BUILTIN_PIPELINE: &str = include_str!("../pipeline.yaml");

/// Read and compile a pipeline file (or the built-in one when `path` is
/// missing and `required` is false).
pub fn load_pipeline(
    path: &Path,
    required: bool,
    registry: &Registry,
) -> anyhow::Result<CompiledPipeline> {
    let (name, text) = read_pipeline(path, required)?;
    compile(&name, &text, registry).map_err(|e| anyhow::anyhow!("{e}"))
}

/// A pipeline file's name (as errors show it) and text.
pub(crate) fn read_pipeline(path: &Path, required: bool) -> anyhow::Result<(String, String)> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok((path.display().to_string(), t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok((
            "(built-in pipeline.yaml)".to_string(),
            BUILTIN_PIPELINE.to_string(),
        )),
        Err(e) => Err(e).with_context(|| format!("cannot read pipeline file {}", path.display())),
    }
}

/// The Kafka edges' settings, when the config has `kafka`.
pub fn kafka_settings(cfg: &Config) -> Option<imflow_runtime::KafkaSettings> {
    cfg.kafka.as_ref().map(|k| imflow_runtime::KafkaSettings {
        brokers: k.addr.join(","),
        group_prefix: k.group_prefix.clone(),
        linger_ms: k.linger_ms,
        fetch_wait_ms: k.fetch_wait_ms.max(1),
        batch_messages: k.batch_messages.clamp(1, 1_000_000),
        message_timeout: Duration::from_millis(k.message_timeout_ms.max(1)),
        session_timeout: Duration::from_millis(k.session_timeout_ms.max(1)),
        assignment: k.assignment.clone(),
        ..Default::default()
    })
}

/// Dead letters in the configured Kafka topic.
pub(crate) async fn dead_letter_topic(
    cfg: &Config,
    k: &imflow_runtime::KafkaSettings,
) -> anyhow::Result<Arc<dyn DeadLetters>> {
    let topic = cfg
        .kafka
        .as_ref()
        .map(|c| c.dead_letter_topic.clone())
        .unwrap_or_default();
    Ok(KafkaDeadLetters::open(k, &topic).await?)
}

/// Create the pipeline's missing topics; errors name `kafka.addr`.
pub async fn ensure_topics(
    k: &imflow_runtime::KafkaSettings,
    pipeline: &CompiledPipeline,
) -> anyhow::Result<()> {
    let created = tokio::time::timeout(
        Duration::from_secs(10),
        imflow_runtime::kafka::ensure_topics(k, pipeline),
    )
    .await
    .map_err(|_| anyhow::anyhow!("kafka.addr: no answer from {} within 10 s", k.brokers))?
    .with_context(|| {
        format!(
            "kafka.addr: cannot create the pipeline's topics on {}",
            k.brokers
        )
    })?;
    if !created.is_empty() {
        tracing::info!(?created, "kafka topics created");
    }
    // A topic that exists keeps its partition count, and a message's
    // partition is its key modulo the count pipeline.yaml gives: the two
    // must agree, or writes land where no reader expects them.
    let edges: Vec<(String, String, u32)> = pipeline
        .edges()
        .filter_map(|(_, to, w)| w.topic.clone().map(|t| (t, to.to_string(), w.partitions)))
        .collect();
    let topics: Vec<String> = edges.iter().map(|(t, _, _)| t.clone()).collect();
    let counts = imflow_runtime::kafka::partition_counts(k, &topics)
        .await
        .with_context(|| format!("kafka.addr: cannot read the topics on {}", k.brokers))?;
    let wrong: Vec<String> = edges
        .iter()
        .filter_map(|(topic, to, wanted)| {
            let has = *counts.get(topic)?;
            (has != *wanted).then(|| {
                format!(
                    "{}: stage `{to}` reads topic `{topic}` with {wanted} partitions, but `{topic}` has {has} on the broker; a topic's partition count cannot change in place (keys would move to other partitions). Give the edge a new topic (and restart once the old one is drained), or set partitions back to {has}",
                    pipeline.file
                )
            })
        })
        .collect();
    if !wrong.is_empty() {
        anyhow::bail!("{}", wrong.join("\n"));
    }
    Ok(())
}

/// How often histogram samples are drained into their summaries (the
/// exporter's own default when it runs the upkeep itself).
const METRICS_UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

pub(crate) fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // A second server in the same process (tests) shares the first's recorder.
        let _ = metrics::set_global_recorder(recorder);
        // Histogram samples pile up until drained: without this a server
        // nobody scrapes grows by every sample it records, and the first
        // scrape drains them all at once. (`build_recorder`, unlike
        // `install`, spawns no upkeep of its own; a thread, because the
        // recorder outlives any one runtime, as in tests.)
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(METRICS_UPKEEP);
                upkeep.run_upkeep();
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no metrics upkeep thread: histograms drain only when scraped");
        }
        handle
    })
}

/// This process's metrics in Prometheus text: its own CPU, memory, open
/// files and threads first (so every process answers with something), then
/// whatever its parts recorded.
pub(crate) fn render_metrics() -> String {
    static PROCESS: OnceLock<metrics_process::Collector> = OnceLock::new();
    let handle = prometheus();
    PROCESS
        .get_or_init(|| {
            let c = metrics_process::Collector::default();
            c.describe();
            c
        })
        .collect();
    handle.render()
}

/// A running standalone server.
pub struct Server {
    pub gateway_addr: SocketAddr,
    pub api_addr: SocketAddr,
    running: Running,
    reloader: imflow_gateways::reload::Reloader,
}

impl Server {
    /// Start serving. Returns once both doors listen.
    pub async fn start(cfg: Config) -> anyhow::Result<Server> {
        Self::start_with_kinds(cfg, imflow_stages::registry()).await
    }

    /// As `start`, with the stage kinds of `registry` (imflow's own, and
    /// whatever a program embedding imflow registered besides).
    pub async fn start_with_kinds(cfg: Config, registry: Registry) -> anyhow::Result<Server> {
        if cfg.admin_secret == config::DEFAULT_ADMIN_SECRET {
            tracing::warn!("using the default admin secret; set admin_secret in the config or IMFLOW_ADMIN_SECRET before exposing this server");
        }
        // Install the recorder first: metric handles created before it exists
        // would record nowhere.
        prometheus();
        let mut embedded = None;
        let backends = match cfg.cluster_settings() {
            Some(settings) => Backends::cluster(&settings).await?,
            None => {
                let store = SqliteStore::open_with(
                    &cfg.data_dir,
                    cfg.store.durability,
                    std::time::Duration::from_micros(cfg.store.commit_delay_us),
                )
                .await
                .with_context(|| {
                    format!("opening the data directory {}", cfg.data_dir.display())
                })?;
                embedded = Some(store.clone());
                Backends::embedded_with(store, cfg.store.dedup_remember, cfg.store.hot_cache_bytes)
            }
        };
        let conns = Arc::new(Connections::new(cfg.websocket.outgoing_queue));
        let services = Services::open(backends.clone(), conns.clone()).await?;
        let pipeline = load_pipeline(&cfg.pipeline, false, &registry)?;
        if !pipeline.provides(None, INGEST_DOOR.id()) {
            anyhow::bail!(
                "{}: no stage provides `{}`, so sends would have nowhere to go; add a stage of kind `ingest`",
                pipeline.file,
                INGEST_DOOR.name
            );
        }
        tracing::info!(%pipeline, "pipeline compiled");

        let ws_listener = TcpListener::bind(cfg.listen.gateway)
            .await
            .with_context(|| format!("listen.gateway: cannot listen on {}", cfg.listen.gateway))?;
        let api_listener = TcpListener::bind(cfg.listen.api)
            .await
            .with_context(|| format!("listen.api: cannot listen on {}", cfg.listen.api))?;
        let gateway_addr = ws_listener.local_addr()?;
        let api_addr = api_listener.local_addr()?;

        let kafka = kafka_settings(&cfg);
        if let Some(k) = &kafka {
            ensure_topics(k, &pipeline).await?;
        }
        let lend = reload::lender(&cfg, &services, kafka.clone(), embedded, None, true);
        let resources = lend(&pipeline).await?;
        let topology =
            RunningTopology::start_with(&pipeline, &registry, &resources, kafka.as_ref())?;
        if kafka.is_some() {
            running::wait_for_consumers(&topology).await;
        }
        let auth = Auth::new(
            services.directory.clone(),
            cfg.admin_secret.clone(),
            cfg.token_ttl_secs,
        )
        .await?;
        let door = Door::new(topology.provided(&INGEST_DOOR));
        let api = Arc::new(Api {
            services: services.clone(),
            auth,
            conns: conns.clone(),
            ingest: door.clone(),
            cluster: None,
            rules: cfg.rules(),
        });
        let gauges = reload::GaugeSlot::default();
        gauges.set(topology.queue_gauges());
        let (reloader, reloads) = reload::channel();
        let draining = CancellationToken::new();
        let metrics: Arc<dyn Fn() -> String + Send + Sync> = Arc::new({
            let gauges = gauges.clone();
            move || {
                gauges.record();
                render_metrics()
            }
        });
        let rest = router(RestState {
            api: api.clone(),
            metrics: metrics.clone(),
            draining: draining.clone(),
            per_user: imflow_gateways::rest::user_rate(&cfg.rest),
            reload: Some(reloader.clone()),
            overview: Some(console::overview(&cfg, registry.clone(), metrics)),
            app: Arc::new(cfg.app_settings(gateway_addr.port())),
        });

        let accept_stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let ws = imflow_gateways::ws::serve(
            ws_listener,
            api.clone(),
            cfg.websocket.clone(),
            accept_stop.clone(),
            tracker.clone(),
        );
        let servers = vec![
            tokio::spawn(async move {
                let _ = ws.await;
            }),
            running::serve_http(api_listener, rest, accept_stop.clone(), &cfg.rest),
        ];
        tracing::info!(gateway = %gateway_addr, api = %api_addr, stores = cfg.stores_description(), "imflow serving");

        let running = Running::start(
            CancellationToken::new(),
            Parts {
                leave: None,
                draining,
                accept_stop,
                pipeline: reload::Pipeline {
                    name: "imflow".into(),
                    scope: reload::Scope::Everything,
                    topology: Some(topology),
                    compiled: Some((pipeline, resources)),
                    registry,
                    config: cfg,
                    kafka,
                    lend,
                    door,
                    gauges,
                    broken: None,
                },
                reloads,
                conns,
                tracker,
                servers,
                backends,
            },
        );
        Ok(Server {
            gateway_addr,
            api_addr,
            running,
            reloader,
        })
    }

    /// Wait until the server stops on its own (a pipeline failure).
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        self.running.wait().await
    }

    /// Graceful shutdown.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.running.stop().await
    }

    /// Re-read the config and pipeline file and swap the running pipeline
    /// for the file's (what `SIGHUP` does).
    pub async fn reload(&self) -> ReloadReport {
        (self.reloader)().await
    }

    pub fn is_finished(&self) -> bool {
        self.running.is_finished()
    }
}
