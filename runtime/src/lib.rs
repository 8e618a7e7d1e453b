//! imflow's dataflow runtime.
//!
//! It reads `pipeline.yaml` ([`config`]), compiles it into a checked graph
//! ([`compile`]), and runs it ([`topology`]) with the stage kinds a caller
//! registered ([`registry`]). It knows nothing of instant messaging: stage
//! kinds, payload types and stores live in other crates and reach the runtime
//! only through [`registry::StageKind`].

pub mod ack;
pub mod compile;
pub mod config;
pub mod edge;
pub mod error;
pub mod fault;
pub mod harness;
pub mod kafka;
pub mod locate;
pub mod registry;
pub mod resources;
pub mod retry;
pub mod tap;
pub mod topology;

pub use ack::{Ack, AckStatus};
pub use compile::{compile, CompiledPipeline, StageDiff};
pub use edge::{Envelope, Input, Output, Payload};
pub use error::{BuildError, CompileErrors, Diagnostic};
pub use kafka::KafkaSettings;
pub use registry::{BuildContext, PortType, Registry, StageKind, StageTask};
pub use resources::{Resources, Role, RoleId};
pub use retry::{Backoff, Retrying};
pub use tokio_util::sync::CancellationToken;
pub use topology::{QueueGauges, RunningTopology};
