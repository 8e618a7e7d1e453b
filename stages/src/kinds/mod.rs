//! One file per stage kind.

pub mod fanout;
pub mod ingest;
pub mod persist_mongo;
pub mod persist_redis;
pub mod push;
pub mod seq_assign;

use imflow_runtime::registry::{decode_options, OptionError};
use serde::de::DeserializeOwned;

/// `check_options` for kinds whose options are one serde struct.
pub(crate) fn check<T: DeserializeOwned>(options: &serde_yaml::Value) -> Vec<OptionError> {
    match decode_options::<T>(options) {
        Ok(_) => Vec::new(),
        Err(e) => vec![e],
    }
}

/// Port names, as pipeline.yaml's error messages show them.
pub const STAMPED: &str = "stamped-message";
pub const SEQUENCED: &str = "sequenced-message";
pub const DELIVERY: &str = "delivery";
