//! What `imflow test` wires around the stages under test, for any port
//! type: a source that feeds them items written as JSON (each with its
//! own [`Ack`], whose outcome is reported back) and a sink that collects
//! what they produce as JSON. The program registers one of each per port
//! type it has (the runtime knows no payload).

use std::marker::PhantomData;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::ack::{Ack, AckStatus};
use crate::edge::{Envelope, Payload};
use crate::error::BuildError;
use crate::registry::{OptionError, PortType, StageKind, StageTask};
use crate::resources::{Role, RoleId};
use crate::BuildContext;

/// An item to feed, and where to say what became of it: its ack's
/// outcome, or why the JSON is not an item of the port's type.
pub struct Fed {
    pub item: Value,
    pub done: oneshot::Sender<Result<AckStatus, String>>,
}

/// Given by the test source: where the harness feeds items.
pub const TEST_FEED: Role<mpsc::UnboundedSender<Fed>> = Role::new("test-feed");
/// Lent to the test sink: where it puts what reached it.
pub const TEST_COLLECT: Role<mpsc::UnboundedSender<Value>> = Role::new("test-collect");

fn no_options(options: &serde_yaml::Value) -> Vec<OptionError> {
    match options {
        serde_yaml::Value::Null => vec![],
        serde_yaml::Value::Mapping(m) if m.is_empty() => vec![],
        _ => vec![OptionError {
            field: String::new(),
            message: "a test stage takes no options".into(),
        }],
    }
}

/// A source of `T` items given as JSON.
pub struct JsonSource<T> {
    kind: &'static str,
    port: PortType,
    key: fn(&T) -> u64,
}

impl<T> JsonSource<T> {
    /// `kind` is what a harness pipeline names it by; `key` partitions as
    /// the real producer of `port` would.
    pub fn new(kind: &'static str, port: PortType, key: fn(&T) -> u64) -> Self {
        JsonSource { kind, port, key }
    }
}

impl<T: Payload + Sync> StageKind for JsonSource<T> {
    fn kind(&self) -> &'static str {
        self.kind
    }
    fn input(&self) -> Option<PortType> {
        None
    }
    fn output(&self) -> Option<PortType> {
        Some(self.port)
    }
    fn check_options(&self, options: &serde_yaml::Value) -> Vec<OptionError> {
        no_options(options)
    }
    fn provides(&self) -> Vec<RoleId> {
        vec![TEST_FEED.id()]
    }
    fn build(&self, cx: &mut BuildContext<'_>) -> Result<Vec<StageTask>, BuildError> {
        let out = cx.output::<T>()?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Fed>();
        cx.provide(&TEST_FEED, tx)?;
        let shutdown = cx.shutdown.clone();
        let key = self.key;
        Ok(vec![Box::pin(async move {
            loop {
                let fed = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    fed = rx.recv() => match fed { Some(f) => f, None => break },
                };
                let item = match serde_json::from_value::<T>(fed.item) {
                    Ok(item) => item,
                    Err(e) => {
                        let _ = fed.done.send(Err(e.to_string()));
                        continue;
                    }
                };
                let done = fed.done;
                let ack = Ack::new(move |status| {
                    let _ = done.send(Ok(status));
                });
                if out
                    .send(Envelope::new(key(&item), item, ack))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            Ok(())
        })])
    }
}

/// A sink that collects `T` items as JSON and releases their acks.
pub struct JsonSink<T> {
    kind: &'static str,
    port: PortType,
    _items: PhantomData<fn(T)>,
}

impl<T> JsonSink<T> {
    pub fn new(kind: &'static str, port: PortType) -> Self {
        JsonSink {
            kind,
            port,
            _items: PhantomData,
        }
    }
}

impl<T: Payload + Sync> StageKind for JsonSink<T> {
    fn kind(&self) -> &'static str {
        self.kind
    }
    fn input(&self) -> Option<PortType> {
        Some(self.port)
    }
    fn output(&self) -> Option<PortType> {
        None
    }
    fn check_options(&self, options: &serde_yaml::Value) -> Vec<OptionError> {
        no_options(options)
    }
    fn needs(&self) -> Vec<RoleId> {
        vec![TEST_COLLECT.id()]
    }
    fn build(&self, cx: &mut BuildContext<'_>) -> Result<Vec<StageTask>, BuildError> {
        let collect = cx.resource(&TEST_COLLECT)?;
        cx.each_input(move |mut input: crate::Input<T>| {
            let collect = collect.clone();
            async move {
                let mut batch = Vec::new();
                while input.recv_batch(&mut batch, 64).await {
                    for env in batch.drain(..) {
                        let v = serde_json::to_value(&env.item)
                            .unwrap_or_else(|e| Value::String(format!("(not JSON: {e})")));
                        let _ = collect.send(v);
                        env.ack.release();
                    }
                }
                Ok(())
            }
        })
    }
}

/// How a test names an ack's outcome.
pub fn status_name(s: &AckStatus) -> &'static str {
    match s {
        AckStatus::Delivered => "delivered",
        AckStatus::Duplicate(_) => "duplicate",
        AckStatus::Refused(_) => "refused",
        AckStatus::Failed(_) => "failed",
    }
}
