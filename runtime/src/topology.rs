//! Running a compiled pipeline.
//!
//! Stages are built in dependency order, so every producer has opened its
//! queues before its consumers take them. Shutdown follows the graph: the
//! token tells sources to stop, each source drops its output, every consumer
//! drains what is queued and then drops its own output, and so on to the
//! sinks. A deadline bounds the whole drain.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use petgraph::visit::EdgeRef;
use petgraph::Direction;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::compile::CompiledPipeline;
use crate::edge::QueueProbe;
use crate::error::BuildError;
use crate::kafka::{KafkaSettings, Readiness};
use crate::registry::{BuildContext, InEdge, OutEdge, Registry};

pub struct RunningTopology {
    tasks: JoinSet<(String, crate::registry::StageResult)>,
    shutdown: CancellationToken,
    gauges: QueueGauges,
    readiness: Arc<Readiness>,
}

/// Publishes the depth of every queue of a running pipeline as the gauge
/// `imflow_edge_queue_depth` (call before rendering metrics). Cheap to clone.
#[derive(Clone)]
pub struct QueueGauges(Arc<Vec<QueueProbe>>);

impl QueueGauges {
    pub fn record(&self) {
        for p in self.0.iter() {
            if let Some(d) = (p.depth)() {
                metrics::gauge!("imflow_edge_queue_depth", "edge" => p.edge.clone(), "partition" => p.partition.to_string())
                    .set(d as f64);
            }
        }
    }
}

impl RunningTopology {
    /// Build every stage and spawn its tasks on the current tokio runtime;
    /// every edge is in memory (standalone mode).
    pub fn start(pipeline: &CompiledPipeline, registry: &Registry) -> Result<Self, BuildError> {
        Self::start_with(pipeline, registry, None)
    }

    /// As `start`, but with `kafka` set every edge that names a topic is
    /// carried by Kafka (cluster mode).
    pub fn start_with(
        pipeline: &CompiledPipeline,
        registry: &Registry,
        kafka: Option<&KafkaSettings>,
    ) -> Result<Self, BuildError> {
        Self::start_stages(pipeline, registry, kafka, None)
    }

    /// Start only the stages of process group `group` (one process of a
    /// cluster). Every edge leaving or entering the group is a Kafka topic
    /// (the compiler checked), so `kafka` is required.
    pub fn start_group(
        pipeline: &CompiledPipeline,
        registry: &Registry,
        kafka: &KafkaSettings,
        group: &str,
    ) -> Result<Self, BuildError> {
        let placed = pipeline.process(group).ok_or_else(|| {
            let names: Vec<&str> = pipeline.processes.iter().map(|p| p.name.as_str()).collect();
            BuildError::stage(
                group,
                format!(
                    "no process group `{group}` in {}; groups: {}",
                    pipeline.file,
                    names.join(", ")
                ),
            )
        })?;
        Self::start_stages(pipeline, registry, Some(kafka), Some(&placed.stages))
    }

    fn start_stages(
        pipeline: &CompiledPipeline,
        registry: &Registry,
        kafka: Option<&KafkaSettings>,
        only: Option<&[String]>,
    ) -> Result<Self, BuildError> {
        let shutdown = CancellationToken::new();
        let mut pending = HashMap::new();
        let mut probes = Vec::new();
        let mut tasks = JoinSet::new();
        let readiness = Arc::new(Readiness::default());
        let g = &pipeline.graph;
        for &idx in &pipeline.order {
            let node = &g[idx];
            if only.is_some_and(|stages| !stages.contains(&node.name)) {
                continue;
            }
            let kind = registry.get(&node.kind).ok_or_else(|| {
                BuildError::stage(&node.name, format!("unknown kind `{}`", node.kind))
            })?;
            let in_edges: Vec<InEdge> = g
                .edges_directed(idx, Direction::Incoming)
                .map(|e| InEdge {
                    id: e.id().index(),
                    label: format!("{}->{}", g[e.source()].name, node.name),
                    partitions: e.weight().partitions,
                    capacity: e.weight().capacity,
                    topic: e.weight().topic.clone(),
                })
                .collect();
            let out_edges: Vec<OutEdge> = g
                .edges_directed(idx, Direction::Outgoing)
                .map(|e| OutEdge {
                    id: e.id().index(),
                    label: format!("{}->{}", node.name, g[e.target()].name),
                    partitions: e.weight().partitions,
                    capacity: e.weight().capacity,
                    consumer: g[e.target()].name.clone(),
                    topic: e.weight().topic.clone(),
                })
                .collect();
            let has_inputs = !in_edges.is_empty();
            let has_outputs = !out_edges.is_empty();
            let mut cx = BuildContext {
                name: &node.name,
                options: &node.options,
                shutdown: shutdown.child_token(),
                input_type: node.input,
                output_type: node.output,
                in_edges,
                out_edges,
                pending_inputs: &mut pending,
                probes: &mut probes,
                output_opened: false,
                inputs_opened: false,
                kafka,
                aux: Vec::new(),
                readiness: readiness.clone(),
            };
            let mut stage_tasks = kind.build(&mut cx)?;
            stage_tasks.append(&mut cx.aux);
            if has_outputs && !cx.output_opened {
                return Err(BuildError::stage(
                    &node.name,
                    "the stage never opened its output",
                ));
            }
            if has_inputs && !cx.inputs_opened {
                return Err(BuildError::stage(
                    &node.name,
                    "the stage never opened its inputs",
                ));
            }
            for t in stage_tasks {
                let name = node.name.clone();
                tasks.spawn(async move { (name, t.await) });
            }
            tracing::debug!(stage = %node.name, kind = %node.kind, "stage built");
        }
        Ok(RunningTopology {
            tasks,
            shutdown,
            gauges: QueueGauges(Arc::new(probes)),
            readiness,
        })
    }

    /// Resolves once every Kafka consumer of this topology has its
    /// partitions (at once without Kafka edges).
    pub async fn ready(&self) {
        self.readiness.wait().await
    }

    pub fn queue_gauges(&self) -> QueueGauges {
        self.gauges.clone()
    }

    /// Resolves when a stage task ends on its own before shutdown, which
    /// means the pipeline can no longer serve. Returns the stage and why.
    pub async fn failed(&mut self) -> (String, String) {
        loop {
            match self.tasks.join_next().await {
                None => {
                    // Nothing left to watch: park forever; shutdown() is how
                    // the owner ends things.
                    std::future::pending::<()>().await;
                }
                Some(Ok((stage, Ok(())))) => {
                    if !self.shutdown.is_cancelled() {
                        tracing::warn!(%stage, "stage task ended before shutdown");
                    }
                }
                Some(Ok((stage, Err(e)))) => return (stage, e.to_string()),
                Some(Err(e)) => return ("(task)".into(), e.to_string()),
            }
        }
    }

    /// Tell sources to stop, let everything queued drain, and wait at most
    /// `deadline` for the stages to finish. Returns whether all finished.
    pub async fn shutdown(mut self, deadline: Duration) -> bool {
        self.shutdown.cancel();
        let drained = tokio::time::timeout(deadline, async {
            while let Some(res) = self.tasks.join_next().await {
                match res {
                    Ok((stage, Err(e))) => {
                        tracing::error!(%stage, error = %e, "stage failed while draining")
                    }
                    Err(e) if e.is_panic() => tracing::error!(error = %e, "stage task panicked"),
                    _ => {}
                }
            }
        })
        .await
        .is_ok();
        if !drained {
            tracing::warn!(
                remaining = self.tasks.len(),
                "shutdown deadline passed; aborting the remaining stage tasks"
            );
            self.tasks.abort_all();
        }
        drained
    }
}
