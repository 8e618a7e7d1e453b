//! One file per stage kind, and one line per kind in the list below: the
//! line declares the file's module and registers its kind (see
//! ARCHITECTURE.md, "Write a stage kind").

use imflow_runtime::registry::{decode_options, OptionError};
use imflow_runtime::{BuildContext, BuildError, PortType, Registry};
use serde::de::DeserializeOwned;

/// `file::Kind, ...`: each kind's file (module) and the type registered.
macro_rules! kinds {
    ($($file:ident :: $kind:ident),* $(,)?) => {
        $(pub mod $file;)*

        /// Register every kind of this crate.
        pub fn register_all(registry: &mut Registry) {
            $(registry.register($file::$kind);)*
        }
    };
}

kinds! {
    ingest::Ingest,
    before_send::BeforeSend,
    seq_assign::SeqAssign,
    persist_mongo::PersistMongo,
    persist_redis::PersistRedis,
    fanout::Fanout,
    push::Push,
    offline_push::OfflinePush,
    webhook::Webhook,
}

use crate::model::{Delivery, Sequenced, Stamped};

/// `check_options` for kinds whose options are one serde struct.
pub(crate) fn check<T: DeserializeOwned>(options: &serde_yaml::Value) -> Vec<OptionError> {
    check_with::<T>(options, |_| Vec::new())
}

/// `check_options` for kinds whose options, once decoded, have rules of
/// their own (`problems`).
pub(crate) fn check_with<T: DeserializeOwned>(
    options: &serde_yaml::Value,
    problems: impl FnOnce(T) -> Vec<OptionError>,
) -> Vec<OptionError> {
    match decode_options::<T>(options) {
        Ok(o) => problems(o),
        Err(e) => vec![e],
    }
}

/// The options of the stage being built (already checked at compile time).
pub(crate) fn options<T: DeserializeOwned>(cx: &BuildContext<'_>) -> Result<T, BuildError> {
    decode_options(cx.options).map_err(|e| BuildError::stage(cx.name, e.message))
}

// The ports: each payload type with the name pipeline.yaml's errors show.
// Public, so a kind written outside this crate connects to these.
pub fn stamped() -> Option<PortType> {
    Some(PortType::of::<Stamped>("stamped-message"))
}
pub fn sequenced() -> Option<PortType> {
    Some(PortType::of::<Sequenced>("sequenced-message"))
}
pub fn delivery() -> Option<PortType> {
    Some(PortType::of::<Delivery>("delivery"))
}

/// The stages `imflow test` feeds and reads around the stages under test:
/// `test-source:PORT` and `test-sink:PORT` for each port of this crate,
/// keyed by conversation as the real producers key them.
pub fn register_test_kinds(registry: &mut Registry) {
    use crate::model::partition_key as key;
    use imflow_runtime::harness::{JsonSink, JsonSource};
    registry
        .register(JsonSource::<Stamped>::new(
            "test-source:stamped-message",
            PortType::of::<Stamped>("stamped-message"),
            |m| key(&m.conversation_id),
        ))
        .register(JsonSource::<Sequenced>::new(
            "test-source:sequenced-message",
            PortType::of::<Sequenced>("sequenced-message"),
            |m| key(&m.msg.conversation_id),
        ))
        .register(JsonSource::<Delivery>::new(
            "test-source:delivery",
            PortType::of::<Delivery>("delivery"),
            |d| key(&d.conversation_id),
        ))
        .register(JsonSink::<Stamped>::new(
            "test-sink:stamped-message",
            PortType::of::<Stamped>("stamped-message"),
        ))
        .register(JsonSink::<Sequenced>::new(
            "test-sink:sequenced-message",
            PortType::of::<Sequenced>("sequenced-message"),
        ))
        .register(JsonSink::<Delivery>::new(
            "test-sink:delivery",
            PortType::of::<Delivery>("delivery"),
        ));
}
