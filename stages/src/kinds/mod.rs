//! One file per stage kind.

pub mod fanout;
pub mod ingest;
pub mod persist_mongo;
pub mod persist_redis;
pub mod push;
pub mod seq_assign;

use imflow_runtime::registry::{decode_options, OptionError};
use imflow_runtime::{BuildContext, BuildError, PortType};
use serde::de::DeserializeOwned;

use crate::model::{Delivery, Sequenced, Stamped};

/// `check_options` for kinds whose options are one serde struct.
pub(crate) fn check<T: DeserializeOwned>(options: &serde_yaml::Value) -> Vec<OptionError> {
    match decode_options::<T>(options) {
        Ok(_) => Vec::new(),
        Err(e) => vec![e],
    }
}

/// The options of the stage being built (already checked at compile time).
pub(crate) fn options<T: DeserializeOwned>(cx: &BuildContext<'_>) -> Result<T, BuildError> {
    decode_options(cx.options).map_err(|e| BuildError::stage(cx.name, e.message))
}

// The ports: each payload type with the name pipeline.yaml's errors show.
pub(crate) fn stamped() -> Option<PortType> {
    Some(PortType::of::<Stamped>("stamped-message"))
}
pub(crate) fn sequenced() -> Option<PortType> {
    Some(PortType::of::<Sequenced>("sequenced-message"))
}
pub(crate) fn delivery() -> Option<PortType> {
    Some(PortType::of::<Delivery>("delivery"))
}
