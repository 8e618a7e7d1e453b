//! Live reload (`SIGHUP`, `imflow reload`, `POST /reload`): re-read the
//! config and pipeline.yaml and swap the running pipeline for the file's.
//!
//! Everything that can refuse is asked before the running pipeline is
//! touched: the config, the pipeline's every error, the roles the new
//! stages need, the process group still being in the file, the Kafka
//! topics. Then the door closes (sends wait there, none is refused), the
//! old pipeline drains (everything queued is stored, acked and pushed, as
//! at shutdown), the new one starts and the door opens on it. Connections
//! live outside the pipeline, so none drops. Draining the whole pipeline
//! rather than only the changed stages keeps each conversation's order:
//! no message of the new pipeline can overtake one still in the old.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use imflow_gateways::reload::{ReloadReport, Reloader};
use imflow_runtime::{
    compile, BuildError, CompiledPipeline, KafkaSettings, QueueGauges, Registry, Resources,
    RunningTopology,
};
use imflow_stages::roles::INGEST_DOOR;
use imflow_stages::Door;
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;

/// Which stages of the file a process runs.
pub(crate) enum Scope {
    /// All of them (standalone).
    Everything,
    /// One process group's (a cluster process).
    Group(String),
    /// None (a gateway or API process): only the config is re-read.
    Doors,
}

/// Makes the resources a pipeline's stages need (the process lends some
/// only when a stage needs them, e.g. a dead-letter topic).
pub(crate) type Lend =
    Box<dyn Fn(&CompiledPipeline) -> BoxFuture<'static, anyhow::Result<Resources>> + Send + Sync>;

/// A process's resources for a pipeline's stages (of `group`, or all):
/// the services, and a place for dead letters when a stage needs one (the
/// Kafka topic, else the embedded store). `follows_presence` says whether
/// the process was started knowing where users are online; a pipeline that
/// needs it in a process started without it is refused.
pub(crate) fn lender(
    cfg: &Config,
    services: &imflow_stages::Services,
    kafka: Option<KafkaSettings>,
    embedded: Option<Arc<imflow_stages::store::SqliteStore>>,
    group: Option<String>,
    follows_presence: bool,
) -> Lend {
    use imflow_stages::roles::{DEAD_LETTERS, PRESENCE};
    use imflow_stages::store::DeadLetters;
    let (cfg, services) = (cfg.clone(), services.clone());
    Box::new(move |pipeline: &CompiledPipeline| {
        let needs_dead = pipeline.needs(group.as_deref(), DEAD_LETTERS.id());
        let needs_presence = pipeline.needs(group.as_deref(), PRESENCE.id());
        let file = pipeline.file.clone();
        let (cfg, services, kafka, embedded, group) = (
            cfg.clone(),
            services.clone(),
            kafka.clone(),
            embedded.clone(),
            group.clone(),
        );
        Box::pin(async move {
            if needs_presence && !follows_presence {
                anyhow::bail!("{file}: a stage of `{}` now needs `{}` (where users are online), which this process follows only when started with such a stage; restart the group's processes", group.unwrap_or_default(), PRESENCE.name);
            }
            let mut resources = services.resources();
            if needs_dead {
                let dead: Arc<dyn DeadLetters> = match (&kafka, embedded) {
                    (Some(k), _) => crate::dead_letter_topic(&cfg, k).await?,
                    (None, Some(store)) => store,
                    (None, None) => anyhow::bail!(
                        "{file}: a stage needs `{}`, kept in a Kafka topic or the embedded store; with the cluster stores, configure `kafka`",
                        DEAD_LETTERS.name
                    ),
                };
                tracing::info!(to = %dead.place(), "dead letters");
                resources.insert(&DEAD_LETTERS, dead);
            }
            Ok(resources)
        })
    })
}

/// The queue gauges of whichever pipeline runs now, for `/metrics`.
#[derive(Clone, Default)]
pub(crate) struct GaugeSlot(Arc<Mutex<Option<QueueGauges>>>);

impl GaugeSlot {
    pub(crate) fn set(&self, g: QueueGauges) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(g);
        }
    }

    pub(crate) fn record(&self) {
        let g = self.0.lock().ok().and_then(|s| s.clone());
        if let Some(g) = g {
            g.record();
        }
    }
}

/// Reload requests, each with where to answer.
pub(crate) type Requests = mpsc::Receiver<oneshot::Sender<ReloadReport>>;

/// A handle for the doors (and the signal handler) and the receiving end
/// for the task that owns the pipeline.
pub(crate) fn channel() -> (Reloader, Requests) {
    let (tx, rx) = mpsc::channel::<oneshot::Sender<ReloadReport>>(8);
    let reloader: Reloader = Arc::new(move || {
        let tx = tx.clone();
        Box::pin(async move {
            let (answer, report) = oneshot::channel();
            let gone = || ReloadReport {
                errors: vec!["the server is shutting down".into()],
                ..Default::default()
            };
            if tx.send(answer).await.is_err() {
                return gone();
            }
            report.await.unwrap_or_else(|_| gone())
        })
    });
    (reloader, rx)
}

/// The running pipeline of a process and what it takes to build another.
pub(crate) struct Pipeline {
    /// `imflow`, or `ROLE#INDEX` in a cluster.
    pub(crate) name: String,
    pub(crate) scope: Scope,
    pub(crate) topology: Option<RunningTopology>,
    /// What `topology` was built from, with the resources it was lent.
    pub(crate) compiled: Option<(CompiledPipeline, Resources)>,
    pub(crate) registry: Registry,
    /// The config as it runs (a reload changes only what applies live).
    pub(crate) config: Config,
    pub(crate) kafka: Option<KafkaSettings>,
    pub(crate) lend: Lend,
    pub(crate) door: Door,
    pub(crate) gauges: GaugeSlot,
    /// Set when neither the new nor the old pipeline would start again.
    pub(crate) broken: Option<String>,
}

impl Pipeline {
    /// Resolves when a stage of the running pipeline fails.
    pub(crate) async fn failed(&mut self) -> (String, String) {
        if let Some(why) = &self.broken {
            return ("(reload)".into(), why.clone());
        }
        match &mut self.topology {
            Some(t) => t.failed().await,
            None => std::future::pending().await,
        }
    }

    pub(crate) fn deadline(&self) -> Duration {
        Duration::from_secs(self.config.shutdown_deadline_secs)
    }

    /// Drain and stop; whether everything finished within the deadline.
    pub(crate) async fn shutdown(self) -> bool {
        let deadline = self.deadline();
        match self.topology {
            Some(t) => t.shutdown(deadline).await,
            None => true,
        }
    }

    fn start(
        &self,
        compiled: &CompiledPipeline,
        resources: &Resources,
    ) -> Result<RunningTopology, BuildError> {
        match (&self.scope, &self.kafka) {
            (Scope::Group(g), Some(k)) => {
                RunningTopology::start_group(compiled, &self.registry, resources, k, g)
            }
            _ => RunningTopology::start_with(
                compiled,
                &self.registry,
                resources,
                self.kafka.as_ref(),
            ),
        }
    }

    /// Put `t` in service: its queue gauges on `/metrics`, its door open.
    async fn serve(&mut self, t: RunningTopology, swap: imflow_stages::Swap) {
        if self.kafka.is_some() {
            crate::running::wait_for_consumers(&t).await;
        }
        self.gauges.set(t.queue_gauges());
        swap.open(t.provided(&INGEST_DOOR));
        self.topology = Some(t);
    }

    /// Re-read the config and the pipeline file; swap the running pipeline
    /// for the file's when it is valid and differs for this process.
    pub(crate) async fn reload(&mut self) -> ReloadReport {
        let mut report = ReloadReport {
            process: self.name.clone(),
            drained: true,
            ..Default::default()
        };
        let newer = match self.config.reread() {
            Ok(c) => c,
            Err(e) => {
                report.errors.push(format!("{e:#}"));
                return report;
            }
        };
        report.restart_needed = self
            .config
            .restart_needed(&newer)
            .into_iter()
            .map(String::from)
            .collect();
        // What applies live, whatever happens to the pipeline.
        self.config.shutdown_deadline_secs = newer.shutdown_deadline_secs;
        if matches!(self.scope, Scope::Doors) {
            return report;
        }
        let (file, text) = match crate::read_pipeline(&newer.pipeline, false) {
            Ok(ft) => ft,
            Err(e) => {
                report.errors.push(format!("{e:#}"));
                return report;
            }
        };
        report.pipeline = file.clone();
        let compiled = match compile(&file, &text, &self.registry) {
            Ok(c) => c,
            Err(e) => {
                report.errors = e.0.iter().map(|d| d.to_string()).collect();
                return report;
            }
        };
        if let Err(why) = self.fits(&compiled) {
            report.errors.push(why);
            return report;
        }
        let group = match &self.scope {
            Scope::Group(g) => Some(g.as_str()),
            _ => None,
        };
        // Every process with stages started with a compiled pipeline.
        let Some((old, _)) = &self.compiled else {
            return report;
        };
        let diff = compiled.diff(old, group);
        report.added = diff.added.clone();
        report.removed = diff.removed.clone();
        report.changed = diff.changed.clone();
        if diff.is_empty() {
            self.config.pipeline = newer.pipeline;
            return report;
        }
        if self.kafka.is_some() {
            let moves = compiled.kafka_moves(old);
            if !moves.is_empty() {
                report.errors = moves;
                return report;
            }
        }
        let resources = match (self.lend)(&compiled).await {
            Ok(r) => r,
            Err(e) => {
                report.errors.push(format!("{e:#}"));
                return report;
            }
        };
        let only = group
            .and_then(|g| compiled.process(g))
            .map(|p| p.stages.clone());
        if let Err(e) = RunningTopology::check_roles(&compiled, &resources, only.as_deref()) {
            report.errors.push(e.to_string());
            return report;
        }
        if let Some(k) = &self.kafka {
            if let Err(e) = crate::ensure_topics(k, &compiled).await {
                report.errors.push(format!("{e:#}"));
                return report;
            }
        }

        // From here the old pipeline stops: sends wait at the door.
        let started = Instant::now();
        let Ok(swap) = tokio::time::timeout(self.deadline(), self.door.close()).await else {
            report.errors.push(format!(
                "sends did not reach the pipeline within {} s (is it stalled?); nothing was changed",
                self.config.shutdown_deadline_secs
            ));
            return report;
        };
        if let Some(old) = self.topology.take() {
            report.drained = old.shutdown(self.deadline()).await;
        }
        match self.start(&compiled, &resources) {
            Ok(t) => {
                self.serve(t, swap).await;
                self.compiled = Some((compiled, resources));
                self.config.pipeline = newer.pipeline;
                report.reloaded = true;
            }
            Err(e) => {
                report
                    .errors
                    .push(format!("the new pipeline did not start: {e}"));
                let again = match &self.compiled {
                    Some((old, lent)) => self.start(old, lent),
                    None => Err(BuildError::stage("(pipeline)", "none ran before")),
                };
                match again {
                    Ok(t) => {
                        report
                            .errors
                            .push("the previous pipeline was started again".into());
                        self.serve(t, swap).await;
                    }
                    Err(e) => {
                        // Sends are answered `unavailable` rather than wait
                        // for a pipeline that will not come; the owner sees
                        // the failure and stops the process.
                        swap.open(None);
                        let why = format!("the previous pipeline did not start again: {e}");
                        self.broken = Some(why.clone());
                        report.errors.push(why);
                    }
                }
            }
        }
        report.paused_ms = started.elapsed().as_millis() as u64;
        report
    }

    /// Refusals that depend on what this process is.
    fn fits(&self, compiled: &CompiledPipeline) -> Result<(), String> {
        // A cluster process announced in etcd the roles its stages give
        // (doors find ingest processes by them): those stay as announced.
        if let (Scope::Group(g), Some((old, _))) = (&self.scope, &self.compiled) {
            let gives = |p: &CompiledPipeline| {
                let mut v: Vec<String> = p
                    .stages_of(Some(g))
                    .flat_map(|n| n.provides.iter().map(|r| r.to_string()))
                    .collect();
                v.sort();
                v.dedup();
                v
            };
            if compiled.process(g).is_some() && gives(compiled) != gives(old) {
                return Err(format!(
                    "{}: the stages of `{g}` would provide {:?} instead of {:?}, which this process announced in etcd; restart the group's processes for that",
                    compiled.file,
                    gives(compiled),
                    gives(old)
                ));
            }
        }
        match &self.scope {
            Scope::Group(g) if compiled.process(g).is_none() => Err(format!(
                "{}: process group `{g}` is no longer in the file; stop this process (script/start_all.sh stop) or put the group back",
                compiled.file
            )),
            Scope::Everything if !compiled.provides(None, INGEST_DOOR.id()) => Err(format!(
                "{}: no stage provides `{}`, so sends would have nowhere to go; add a stage of kind `ingest`",
                compiled.file, INGEST_DOOR.name
            )),
            _ => Ok(()),
        }
    }
}

/// The report as one log event.
pub(crate) fn log(report: &ReloadReport) {
    if report.refused() {
        tracing::warn!(
            pipeline = %report.pipeline,
            errors = ?report.errors,
            "reload refused; the running pipeline keeps serving"
        );
    } else {
        tracing::info!(
            pipeline = %report.pipeline,
            reloaded = report.reloaded,
            added = ?report.added,
            removed = ?report.removed,
            changed = ?report.changed,
            restart_needed = ?report.restart_needed,
            paused_ms = report.paused_ms,
            drained = report.drained,
            "reload done"
        );
    }
}

/// `imflow reload`.
#[derive(clap::Args)]
pub struct ReloadArgs {
    /// The config of the server(s) to reload: a cluster's (every process
    /// its etcd lists, one after the other) or a standalone server's. By
    /// default config/config.yaml when its etcd lists processes, else
    /// config/standalone.yaml.
    #[arg(long, short)]
    pub config: Option<std::path::PathBuf>,
    /// Print each process's report as a JSON line.
    #[arg(long)]
    pub json: bool,
}

/// Ask every process to reload, one at a time (a cluster's groups pause
/// in turn, never all at once); fails if any refused or did not answer.
pub async fn run(args: ReloadArgs) -> anyhow::Result<()> {
    let processes = crate::targets::processes(args.config.as_deref()).await?;
    // A process drains its pipeline and, in a cluster, waits for its Kafka
    // consumers to be assigned again: well past a plain request's time.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    let mut failed = 0;
    for p in &processes {
        let mut req = http.post(format!("{}/reload", p.base));
        if let Some((header, secret)) = &p.secret {
            req = req.header(*header, secret);
        }
        let report = match req.send().await {
            Ok(r) if r.status().is_success() || r.status().as_u16() == 422 => {
                match r.json::<ReloadReport>().await {
                    Ok(report) => report,
                    Err(e) => {
                        failed += 1;
                        eprintln!("{}: an answer that is not a reload report: {e}", p.name);
                        continue;
                    }
                }
            }
            Ok(r) => {
                failed += 1;
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                eprintln!("{}: {status}: {}", p.name, text.trim());
                continue;
            }
            Err(e) => {
                failed += 1;
                eprintln!("{}: cannot reach {}: {e}", p.name, p.base);
                continue;
            }
        };
        if report.refused() {
            failed += 1;
        }
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print!("{}", describe(&p.name, &report));
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {} process(es) did not reload", processes.len());
    }
    Ok(())
}

/// A report for people: one line, or the errors one per line.
pub fn describe(process: &str, r: &ReloadReport) -> String {
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(", ")
        }
    };
    let mut out = if r.refused() {
        let mut s = format!("{process}: refused; the running pipeline keeps serving:\n");
        for e in &r.errors {
            s.push_str(&format!("  {e}\n"));
        }
        s
    } else if r.reloaded {
        format!(
            "{process}: reloaded {}: added {}; removed {}; changed {}; sends paused {} ms{}\n",
            r.pipeline,
            list(&r.added),
            list(&r.removed),
            list(&r.changed),
            r.paused_ms,
            if r.drained {
                ""
            } else {
                "; the drain was cut short by shutdown_deadline_secs"
            }
        )
    } else if r.pipeline.is_empty() {
        format!("{process}: no stages here; config read again\n")
    } else {
        format!("{process}: {} unchanged for this process\n", r.pipeline)
    };
    if !r.restart_needed.is_empty() {
        out.push_str(&format!(
            "{process}: changed in the config, applied at the next restart: {}\n",
            r.restart_needed.join(", ")
        ));
    }
    out
}
