//! What the web console reads (`GET /admin/overview` on the API): the
//! pipeline compiled from the file this process serves, drawn by the page
//! as a graph, and a reading of every process's metrics with the same
//! figures as `imflow top` (rates between this reading and the one
//! before, queues, Kafka lag, CPU, memory, up or not).
//!
//! The pipeline is compiled from the file at each reading, so a changed
//! file shows up on the page without editing it. A standalone server reads
//! its own metrics in place; an API process of a cluster reads every
//! process etcd lists, over their internal ports, as `imflow top` does.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use imflow_gateways::web::Overview;
use imflow_runtime::{CompiledPipeline, Registry};
use serde_json::{json, Value};
use tokio::sync::Mutex;

use crate::config::Config;
use crate::top::{self, Reading, Scrape, Target};

/// Readings closer together than this share one scrape (two consoles open
/// at once, or a quick reload of the page).
const FRESH: Duration = Duration::from_millis(500);
/// The list of a cluster's processes is asked of etcd at most this often.
const TARGETS_TTL: Duration = Duration::from_secs(5);

struct Console {
    cfg: Config,
    registry: Registry,
    local: Arc<dyn Fn() -> String + Send + Sync>,
    http: reqwest::Client,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    targets: Option<(Instant, Vec<Target>)>,
    /// The last scrape, for the rates of the next reading.
    last: Option<LastScrape>,
    reading: Option<Reading>,
}

struct LastScrape {
    at: Instant,
    /// The targets scraped, by name: rates need the same processes twice.
    names: Vec<String>,
    scrapes: Vec<Result<Scrape, String>>,
}

/// The console's reader for a process started with `cfg`; `local`
/// renders this process's own metrics.
pub(crate) fn overview(
    cfg: &Config,
    registry: Registry,
    local: Arc<dyn Fn() -> String + Send + Sync>,
) -> Overview {
    let console = Arc::new(Console {
        cfg: cfg.clone(),
        registry,
        local,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .unwrap_or_default(),
        state: Mutex::new(State::default()),
    });
    Arc::new(move || {
        let console = console.clone();
        Box::pin(async move { console.read().await })
    })
}

impl Console {
    async fn read(&self) -> Value {
        let pipeline = match crate::load_pipeline(&self.cfg.pipeline, false, &self.registry) {
            Ok(p) => graph(&p, self.cfg.kafka.is_some()),
            Err(e) => {
                json!({ "file": self.cfg.pipeline.display().to_string(), "error": format!("{e:#}") })
            }
        };
        let mut state = self.state.lock().await;
        let (reading, error) = match self.targets(&mut state).await {
            Ok(targets) => (Some(self.reading(&mut state, &targets).await), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        };
        json!({
            "mode": if self.cfg.etcd.is_some() { "cluster" } else { "standalone" },
            "pipeline": pipeline,
            "reading": reading,
            "error": error,
        })
    }

    async fn targets(&self, state: &mut State) -> anyhow::Result<Vec<Target>> {
        if let Some((at, t)) = &state.targets {
            if at.elapsed() < TARGETS_TTL {
                return Ok(t.clone());
            }
        }
        let targets = if self.cfg.etcd.is_some() {
            let path = self
                .cfg
                .origin
                .as_ref()
                .map(|o| o.path.clone())
                .unwrap_or_else(|| PathBuf::from("config"));
            crate::targets::of_config(&path, &self.cfg)
                .await?
                .into_iter()
                .map(Target::from)
                .collect()
        } else {
            vec![Target {
                name: "imflow".into(),
                url: "(this process)".into(),
                secret: None,
                local: Some(self.local.clone()),
            }]
        };
        state.targets = Some((Instant::now(), targets.clone()));
        Ok(targets)
    }

    async fn reading(&self, state: &mut State, targets: &[Target]) -> Reading {
        let names: Vec<String> = targets.iter().map(|t| t.name.clone()).collect();
        if let (Some(last), Some(r)) = (&state.last, &state.reading) {
            if last.at.elapsed() < FRESH && last.names == names {
                return r.clone();
            }
        }
        let now = top::scrape_all(&self.http, targets).await;
        let reading = match state.last.take() {
            // Rates need two scrapes of the same processes; the first
            // reading (or one after the cluster changed) shows totals only.
            Some(last) if last.names == names => {
                top::read(targets, &last.scrapes, &now, last.at.elapsed())
            }
            _ => top::read(targets, &now, &now, Duration::ZERO),
        };
        state.last = Some(LastScrape {
            at: Instant::now(),
            names,
            scrapes: now,
        });
        state.reading = Some(reading.clone());
        reading
    }
}

/// The pipeline as the page draws it: stages in dependency order with
/// their kind and process group, and every edge with what carries it.
fn graph(p: &CompiledPipeline, kafka: bool) -> Value {
    let group_of = |stage: &str| {
        p.processes
            .iter()
            .find(|g| g.stages.iter().any(|s| s == stage))
            .map(|g| g.name.clone())
    };
    let stages: Vec<Value> = p
        .order
        .iter()
        .map(|&i| {
            let n = &p.graph[i];
            json!({ "name": n.name, "kind": n.kind, "process": group_of(&n.name) })
        })
        .collect();
    let edges: Vec<Value> = p
        .edges()
        .map(|(from, to, e)| {
            let transport = if kafka && e.topic.is_some() {
                "kafka"
            } else {
                "memory"
            };
            json!({
                "from": from, "to": to, "transport": transport, "topic": e.topic,
                "partitions": e.partitions, "capacity": e.capacity, "carries": e.carries,
            })
        })
        .collect();
    let processes: Vec<Value> = p
        .processes
        .iter()
        .map(|g| json!({ "name": g.name, "stages": g.stages, "instances": g.instances() }))
        .collect();
    json!({ "file": p.file, "stages": stages, "edges": edges, "processes": processes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_graph_is_the_files_stages_and_edges() {
        let registry = imflow_stages::registry();
        let text = std::fs::read_to_string("pipeline.yaml").expect("pipeline.yaml");
        let p = imflow_runtime::compile("pipeline.yaml", &text, &registry).expect("compiles");
        let g = graph(&p, true);
        let names: Vec<&str> = g["stages"]
            .as_array()
            .expect("stages")
            .iter()
            .filter_map(|s| s["name"].as_str())
            .collect();
        assert_eq!(names[0], "ingest");
        assert!(names.contains(&"push"));
        let seq_in = g["edges"]
            .as_array()
            .expect("edges")
            .iter()
            .find(|e| e["to"] == "seq")
            .expect("an edge into seq");
        assert_eq!(seq_in["topic"], "ws2ms_chat");
        assert_eq!(seq_in["transport"], "kafka");
        assert_eq!(graph(&p, false)["edges"][0]["transport"], "memory");
        let seq = g["stages"]
            .as_array()
            .expect("stages")
            .iter()
            .find(|s| s["name"] == "seq")
            .expect("seq");
        assert_eq!(seq["process"], "im_msg_transfer");
    }
}
