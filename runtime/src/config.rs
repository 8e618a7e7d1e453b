//! The unchecked shape of `pipeline.yaml`, as the user wrote it.
//!
//! Parsing is deliberately lenient per stage: each stage entry is decoded on
//! its own so that one malformed stage does not hide the errors of the others.

use serde::Deserialize;

/// One input of a stage: the producing stage and how the edge is carried.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum InputSpec {
    /// `inputs: [seq]`: an in-memory edge with default settings.
    Name(String),
    Full(EdgeSpec),
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeSpec {
    pub from: String,
    /// Kafka topic carrying the edge in cluster mode. In standalone mode the
    /// edge is an in-memory channel with the same partitioning.
    #[serde(default)]
    pub topic: Option<String>,
    /// Partitions of the edge: the consumer runs one task per partition and
    /// items with the same key always land in the same partition.
    #[serde(default)]
    pub partitions: Option<u32>,
    /// Bound of each in-memory partition queue (items). Producers wait when it
    /// is full: backpressure instead of unbounded memory.
    #[serde(default)]
    pub capacity: Option<u32>,
}

impl InputSpec {
    pub fn edge(&self) -> EdgeSpec {
        match self {
            InputSpec::Name(from) => EdgeSpec {
                from: from.clone(),
                topic: None,
                partitions: None,
                capacity: None,
            },
            InputSpec::Full(e) => e.clone(),
        }
    }
}

/// One entry under `stages:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    pub kind: String,
    #[serde(default)]
    pub inputs: Vec<InputSpec>,
    /// Kind-specific settings, checked by the kind itself.
    #[serde(default)]
    pub options: serde_yaml::Value,
}

/// The whole file: the stages in the order written.
#[derive(Debug, Clone, Default)]
pub struct PipelineSpec {
    pub stages: Vec<(String, StageSpec)>,
    pub processes: Vec<(String, ProcessSpec)>,
}

/// One entry under `processes:`: which stages run together in one OS process
/// kind, and how many of those processes there are. As in the seed, a list of
/// N ports means N processes (each serves its health, metrics and RPC on its
/// port); `count` starts N processes that need no port of their own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    pub stages: Vec<String>,
    #[serde(default)]
    pub ports: Option<Vec<u16>>,
    #[serde(default)]
    pub count: Option<u32>,
}
