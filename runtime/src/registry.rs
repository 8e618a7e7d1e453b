//! Stage kinds and the context they are built in.
//!
//! A stage kind is a description with no resources of its own: it says what
//! it consumes and produces ([`PortType`]), checks its own options, declares
//! the roles it needs from the process and those it provides to it
//! ([`crate::resources`]), and, given a [`BuildContext`], returns the tasks
//! that do its work. So a pipeline is checked (`imflow validate`) with no
//! store open, and a process is wired from declarations, never kind names. The runtime type-checks edges by port name before anything runs, and
//! again by Rust type when a stage opens its ports, so a mismatch can never
//! reach a running task.

use std::any::{Any, TypeId};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use metrics::Counter;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::edge::{memory_partition, EdgeSenders, Input, Output, Payload, QueueProbe};
use crate::error::BuildError;
use crate::kafka::{self, KafkaSettings};
use crate::resources::{ResourceError, Resources, Role, RoleId};

/// The type of items on a port: a name for people and a Rust type for the
/// runtime's own check.
#[derive(Debug, Clone, Copy)]
pub struct PortType {
    pub name: &'static str,
    id: TypeId,
    rust_name: &'static str,
}

impl PortType {
    pub fn of<T: 'static>(name: &'static str) -> Self {
        PortType {
            name,
            id: TypeId::of::<T>(),
            rust_name: std::any::type_name::<T>(),
        }
    }

    pub fn same_as(&self, other: &PortType) -> bool {
        self.id == other.id
    }
}

/// What a stage task returns when it stops.
pub type StageResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
/// One running unit of a stage (typically one per input partition).
pub type StageTask = Pin<Box<dyn Future<Output = StageResult> + Send>>;

/// An option problem found by a kind: the field (dotted, under `options`) and
/// what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionError {
    pub field: String,
    pub message: String,
}

pub trait StageKind: Send + Sync + 'static {
    /// The name used as `kind:` in pipeline.yaml.
    fn kind(&self) -> &'static str;
    /// What items it consumes; `None` for a source.
    fn input(&self) -> Option<PortType>;
    /// What items it produces; `None` for a sink.
    fn output(&self) -> Option<PortType>;
    /// Check `options:`; report every problem, not just the first.
    fn check_options(&self, options: &serde_yaml::Value) -> Vec<OptionError>;
    /// The roles `build` takes from the process ([`BuildContext::resource`]).
    fn needs(&self) -> Vec<RoleId> {
        Vec::new()
    }
    /// The roles `build` gives the process ([`BuildContext::provide`]), e.g.
    /// the door through which a source takes items.
    fn provides(&self) -> Vec<RoleId> {
        Vec::new()
    }
    fn build(&self, cx: &mut BuildContext<'_>) -> Result<Vec<StageTask>, BuildError>;
}

/// Decode `options:` into a kind's settings struct, turning serde's message
/// into an [`OptionError`]. A missing or null `options` decodes as `{}`.
pub fn decode_options<T: DeserializeOwned>(options: &serde_yaml::Value) -> Result<T, OptionError> {
    let value = if options.is_null() {
        serde_yaml::Value::Mapping(Default::default())
    } else {
        options.clone()
    };
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        OptionError {
            field: if path == "." { String::new() } else { path },
            message: e.into_inner().to_string(),
        }
    })
}

/// The stage kinds a program knows. Adding a kind is one `register` call.
#[derive(Default, Clone)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn StageKind>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register(&mut self, kind: impl StageKind) -> &mut Self {
        self.kinds.insert(kind.kind(), Arc::new(kind));
        self
    }

    pub fn get(&self, kind: &str) -> Option<&Arc<dyn StageKind>> {
        self.kinds.get(kind)
    }

    pub fn kinds(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kinds.keys().copied()
    }
}

pub(crate) struct OutEdge {
    pub(crate) id: usize,
    pub(crate) label: String,
    pub(crate) partitions: u32,
    pub(crate) capacity: u32,
    pub(crate) consumer: String,
    pub(crate) topic: Option<String>,
}

pub(crate) struct InEdge {
    pub(crate) id: usize,
    pub(crate) label: String,
    pub(crate) partitions: u32,
    pub(crate) capacity: u32,
    pub(crate) topic: Option<String>,
}

/// The bounded queues of one edge's partitions, with their depth probes.
/// Items taken from them count as `consumer`'s input.
fn partition_queues<T: Send + serde::Serialize + 'static>(
    probes: &mut Vec<QueueProbe>,
    label: &str,
    partitions: u32,
    capacity: u32,
    consumer: &str,
) -> (
    Vec<tokio::sync::mpsc::Sender<crate::Envelope<T>>>,
    Vec<Input<T>>,
) {
    let received = metrics::counter!("imflow_stage_in_total", "stage" => consumer.to_string());
    let stage: std::sync::Arc<str> = consumer.into();
    let mut senders = Vec::new();
    let mut inputs = Vec::new();
    for p in 0..partitions {
        let (tx, input, probe) =
            memory_partition::<T>(capacity as usize, label, p, received.clone(), stage.clone());
        senders.push(tx);
        inputs.push(input);
        probes.push(probe);
    }
    (senders, inputs)
}

/// What a kind gets while it is being built.
pub struct BuildContext<'a> {
    pub name: &'a str,
    pub options: &'a serde_yaml::Value,
    /// Cancelled when the pipeline shuts down. Sources stop producing when it
    /// fires; other stages stop when their inputs close.
    pub shutdown: CancellationToken,
    pub(crate) input_type: Option<PortType>,
    pub(crate) output_type: Option<PortType>,
    pub(crate) in_edges: Vec<InEdge>,
    pub(crate) out_edges: Vec<OutEdge>,
    /// Set in cluster mode: edges with a topic then go through Kafka.
    pub(crate) kafka: Option<&'a KafkaSettings>,
    /// Tasks the runtime runs for this stage (Kafka consumers).
    pub(crate) aux: Vec<StageTask>,
    pub(crate) readiness: Arc<kafka::Readiness>,
    pub(crate) pending_inputs: &'a mut HashMap<usize, Box<dyn Any + Send>>,
    pub(crate) probes: &'a mut Vec<QueueProbe>,
    pub(crate) output_opened: bool,
    pub(crate) inputs_opened: bool,
    pub(crate) resources: &'a Resources,
    pub(crate) provided: &'a mut Resources,
    /// What the kind declared, so `resource`/`provide` refuse the undeclared.
    pub(crate) needs: Vec<RoleId>,
    pub(crate) provides: Vec<RoleId>,
}

impl BuildContext<'_> {
    fn check<T: 'static>(
        &self,
        port: Option<PortType>,
        what: &'static str,
    ) -> Result<(), BuildError> {
        match port {
            Some(p) if p.id == TypeId::of::<T>() => Ok(()),
            Some(p) => Err(BuildError::PortType {
                stage: self.name.to_string(),
                what,
                wanted: std::any::type_name::<T>(),
                actual: p.rust_name,
            }),
            None => Err(BuildError::stage(
                self.name,
                format!("this kind has no {what}"),
            )),
        }
    }

    /// The process's handle for `role`, which the kind must list in `needs`
    /// (so a process can be checked, and wired, before anything is built).
    pub fn resource<T: Clone + Send + Sync + 'static>(
        &self,
        role: &Role<T>,
    ) -> Result<T, BuildError> {
        if !self.needs.contains(&role.id()) {
            return Err(BuildError::stage(
                self.name,
                format!("took `{}` without declaring it in `needs`", role.name),
            ));
        }
        self.resources
            .get(role)
            .map_err(|e: ResourceError| BuildError::stage(self.name, e))
    }

    /// Give the process `handle` as `role`, which the kind must list in
    /// `provides`; the process takes it from the running topology.
    pub fn provide<T: Clone + Send + Sync + 'static>(
        &mut self,
        role: &Role<T>,
        handle: T,
    ) -> Result<(), BuildError> {
        if !self.provides.contains(&role.id()) {
            return Err(BuildError::stage(
                self.name,
                format!(
                    "provided `{}` without declaring it in `provides`",
                    role.name
                ),
            ));
        }
        if self.provided.has(role.id()) {
            return Err(BuildError::stage(
                self.name,
                format!(
                    "another stage of this process already provides `{}`; keep one per process",
                    role.name
                ),
            ));
        }
        self.provided.insert(role, handle);
        Ok(())
    }

    /// One task per partition of this stage's inputs, each made by `task`
    /// from its partition: how a stage keeps each partition's order while
    /// partitions run side by side.
    pub fn each_input<T, F, Fut>(&mut self, mut task: F) -> Result<Vec<StageTask>, BuildError>
    where
        T: Payload,
        F: FnMut(Input<T>) -> Fut,
        Fut: Future<Output = StageResult> + Send + 'static,
    {
        Ok(self
            .inputs::<T>()?
            .into_iter()
            .map(|input| Box::pin(task(input)) as StageTask)
            .collect())
    }

    /// Whether some input of this stage is carried by Kafka in this run (an
    /// edge with a topic, with Kafka on): its items were durable, and their
    /// senders answered, before this stage saw them.
    pub fn reads_kafka(&self) -> bool {
        self.kafka.is_some() && self.in_edges.iter().any(|e| e.topic.is_some())
    }

    /// Counter of items this stage handled that failed.
    pub fn error_counter(&self) -> Counter {
        metrics::counter!("imflow_stage_errors_total", "stage" => self.name.to_string())
    }

    /// Open this stage's output: one bounded queue per partition of every
    /// outgoing edge. Must be called once by every kind that has an output.
    pub fn output<T: Payload>(&mut self) -> Result<Output<T>, BuildError> {
        self.check::<T>(self.output_type, "output")?;
        if self.output_opened {
            return Err(BuildError::stage(self.name, "output opened twice"));
        }
        self.output_opened = true;
        let mut edges = Vec::new();
        for e in &self.out_edges {
            if let (Some(topic), Some(kafka)) = (&e.topic, self.kafka) {
                let out = kafka::producer(kafka, topic, e.partitions).map_err(|err| {
                    BuildError::stage(
                        self.name,
                        format!("kafka producer for topic `{topic}`: {err}"),
                    )
                })?;
                edges.push(EdgeSenders::Kafka(out));
                continue;
            }
            let (senders, inputs) =
                partition_queues::<T>(self.probes, &e.label, e.partitions, e.capacity, &e.consumer);
            self.pending_inputs.insert(e.id, Box::new(inputs));
            edges.push(EdgeSenders::Memory {
                partitions: senders,
            });
        }
        let sent = metrics::counter!("imflow_stage_out_total", "stage" => self.name.to_string());
        Ok(Output::with_fault(
            self.name.into(),
            edges,
            sent,
            crate::fault::output_stalled(self.name),
        ))
    }

    /// Take every partition of every input edge of this stage.
    pub fn inputs<T: Payload>(&mut self) -> Result<Vec<Input<T>>, BuildError> {
        self.check::<T>(self.input_type, "input")?;
        if self.inputs_opened {
            return Err(BuildError::stage(self.name, "inputs opened twice"));
        }
        self.inputs_opened = true;
        let mut all = Vec::new();
        for e in &self.in_edges {
            if let (Some(topic), Some(kafka)) = (&e.topic, self.kafka) {
                let (senders, inputs) = partition_queues::<T>(
                    self.probes,
                    &e.label,
                    e.partitions,
                    e.capacity,
                    self.name,
                );
                all.extend(inputs);
                let task = kafka::consumer_task::<T>(
                    kafka,
                    self.name,
                    topic,
                    senders,
                    self.shutdown.clone(),
                    self.error_counter(),
                    self.readiness.clone(),
                )
                .map_err(|err| {
                    BuildError::stage(
                        self.name,
                        format!("kafka consumer for topic `{topic}`: {err}"),
                    )
                })?;
                self.aux.push(task);
                continue;
            }
            let id = &e.id;
            let boxed = self.pending_inputs.remove(id).ok_or_else(|| {
                BuildError::stage(self.name, "an upstream stage did not open its output")
            })?;
            let inputs = boxed
                .downcast::<Vec<Input<T>>>()
                .map_err(|_| BuildError::PortType {
                    stage: self.name.to_string(),
                    what: "input",
                    wanted: std::any::type_name::<T>(),
                    actual: "a different type",
                })?;
            all.extend(*inputs);
        }
        Ok(all)
    }
}
