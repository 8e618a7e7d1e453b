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
use crate::resources::{Resources, Role};

pub struct RunningTopology {
    tasks: JoinSet<(String, crate::registry::StageResult)>,
    shutdown: CancellationToken,
    gauges: QueueGauges,
    readiness: Arc<Readiness>,
    provided: Resources,
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
    /// Build every stage, lending it the `resources` it declared, and spawn
    /// its tasks on the current tokio runtime; every edge is in memory
    /// (standalone mode).
    pub fn start(
        pipeline: &CompiledPipeline,
        registry: &Registry,
        resources: &Resources,
    ) -> Result<Self, BuildError> {
        Self::start_with(pipeline, registry, resources, None)
    }

    /// As `start`, but with `kafka` set every edge that names a topic is
    /// carried by Kafka (cluster mode).
    pub fn start_with(
        pipeline: &CompiledPipeline,
        registry: &Registry,
        resources: &Resources,
        kafka: Option<&KafkaSettings>,
    ) -> Result<Self, BuildError> {
        Self::start_stages(pipeline, registry, resources, kafka, None)
    }

    /// Start only the stages of process group `group` (one process of a
    /// cluster). Every edge leaving or entering the group is a Kafka topic
    /// (the compiler checked), so `kafka` is required.
    pub fn start_group(
        pipeline: &CompiledPipeline,
        registry: &Registry,
        resources: &Resources,
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
        Self::start_stages(
            pipeline,
            registry,
            resources,
            Some(kafka),
            Some(&placed.stages),
        )
    }

    /// Whether `resources` has every role the stages (of group `only`, or
    /// all) need: every gap at once, before a task runs (a live reload asks
    /// before it stops the running pipeline).
    pub fn check_roles(
        pipeline: &CompiledPipeline,
        resources: &Resources,
        only: Option<&[String]>,
    ) -> Result<(), BuildError> {
        let missing: Vec<(String, String, &'static str)> = pipeline
            .graph
            .node_weights()
            .filter(|n| only.is_none_or(|stages| stages.contains(&n.name)))
            .flat_map(|n| {
                n.needs
                    .iter()
                    .filter(|r| !resources.has(**r))
                    .map(|r| (n.name.clone(), n.kind.clone(), r.0))
            })
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(BuildError::MissingRoles(missing))
        }
    }

    fn start_stages(
        pipeline: &CompiledPipeline,
        registry: &Registry,
        resources: &Resources,
        kafka: Option<&KafkaSettings>,
        only: Option<&[String]>,
    ) -> Result<Self, BuildError> {
        Self::check_roles(pipeline, resources, only)?;
        let mut provided = Resources::new();
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
                resources,
                provided: &mut provided,
                needs: node.needs.clone(),
                provides: node.provides.clone(),
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
            provided,
        })
    }

    /// What a stage gave the process as `role` (e.g. the ingest door), if a
    /// stage of this topology provides it.
    pub fn provided<T: Clone + Send + Sync + 'static>(&self, role: &Role<T>) -> Option<T> {
        self.provided.get(role).ok()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{OptionError, PortType, StageKind, StageTask};
    use crate::resources::RoleId;
    use crate::{compile, BuildContext};

    const DOOR: Role<Arc<str>> = Role::new("door");
    const CLOCK: Role<Arc<str>> = Role::new("clock");
    const ROOM: Role<Arc<str>> = Role::new("room");

    /// A source that takes CLOCK (if `needs` declares it), gives DOOR, and
    /// then tries to give ROOM, which it never declared.
    struct Source {
        needs: Vec<RoleId>,
    }

    impl StageKind for Source {
        fn kind(&self) -> &'static str {
            "source"
        }
        fn input(&self) -> Option<PortType> {
            None
        }
        fn output(&self) -> Option<PortType> {
            None
        }
        fn check_options(&self, _: &serde_yaml::Value) -> Vec<OptionError> {
            vec![]
        }
        fn needs(&self) -> Vec<RoleId> {
            self.needs.clone()
        }
        fn provides(&self) -> Vec<RoleId> {
            vec![DOOR.id()]
        }
        fn build(&self, cx: &mut BuildContext<'_>) -> Result<Vec<StageTask>, BuildError> {
            let clock = cx.resource(&CLOCK)?;
            cx.provide(&DOOR, format!("door of {}", cx.name).into())?;
            cx.provide(&ROOM, clock)?;
            Ok(vec![])
        }
    }

    fn start(needs: Vec<RoleId>, resources: &Resources) -> Result<RunningTopology, BuildError> {
        let mut registry = Registry::new();
        registry.register(Source { needs });
        let p = compile("p.yaml", "stages:\n  a:\n    kind: source\n", &registry).unwrap();
        RunningTopology::start(&p, &registry, resources)
    }

    #[tokio::test]
    async fn roles_are_checked_before_building_and_only_the_declared_are_handed_over() {
        // Every missing role named at once, with its stage and kind.
        let err = start(vec![CLOCK.id(), ROOM.id()], &Resources::new())
            .err()
            .expect("nothing lent")
            .to_string();
        assert!(
            err.contains(
                "stage `a` (kind `source`) needs `clock`; stage `a` (kind `source`) needs `room`"
            ),
            "{err}"
        );

        // A role taken without being declared is refused, even if lent.
        let lent = Resources::new().with(&CLOCK, Arc::from("tick"));
        let err = start(vec![], &lent).err().expect("undeclared").to_string();
        assert!(err.contains("took `clock` without declaring it"), "{err}");

        // Declared and lent: the build runs up to the undeclared `provide`.
        let err = start(vec![CLOCK.id()], &lent)
            .err()
            .expect("undeclared")
            .to_string();
        assert!(
            err.contains("provided `room` without declaring it"),
            "{err}"
        );
    }
}
