//! `push`: hands each delivery to the connections of its recipients that are
//! online (on this host, or through the gateways that hold them). It never
//! waits for a connection: a client that does not read is cut off by its
//! gateway, not allowed to slow everyone else. The item's ack goes with it
//! and is released once the gateways took it.

use std::sync::Arc;

use imflow_runtime::{
    BuildContext, BuildError, Envelope, Input, PortType, RoleId, StageKind, StageTask,
};
use serde::Deserialize;

use crate::model::Delivery;
use crate::roles::PRESENCE;
use crate::{Presence, PushItem};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Options {}

pub struct Push;

impl StageKind for Push {
    fn kind(&self) -> &'static str {
        "push"
    }
    fn input(&self) -> Option<PortType> {
        super::delivery()
    }
    fn output(&self) -> Option<PortType> {
        None
    }
    fn check_options(
        &self,
        options: &serde_yaml::Value,
    ) -> Vec<imflow_runtime::registry::OptionError> {
        super::check::<Options>(options)
    }
    fn needs(&self) -> Vec<RoleId> {
        vec![PRESENCE.id()]
    }
    fn build(&self, cx: &mut BuildContext<'_>) -> Result<Vec<StageTask>, BuildError> {
        let presence = cx.resource(&PRESENCE)?;
        cx.each_input(|input| run(input, presence.clone()))
    }
}

/// Messages delivered between two yields to the connections: far below
/// their outgoing queue (`websocket.outgoing_queue`, 1,024 by default).
const YIELD_EVERY: usize = 32;

async fn run(
    mut input: Input<Delivery>,
    presence: Arc<dyn Presence>,
) -> imflow_runtime::registry::StageResult {
    let mut batch: Vec<Envelope<Delivery>> = Vec::with_capacity(256);
    while input.recv_batch(&mut batch, 256).await {
        for (i, env) in batch.drain(..).enumerate() {
            let Envelope { item, ack, .. } = env;
            let push = PushItem {
                conversation_id: item.conversation_id,
                seq: item.seq,
                body: item.body,
            };
            presence.deliver_all(&item.recipients, &push, ack);
            // A batch from Kafka can hold hundreds of messages for one
            // user: let the connections drain every few, or a bounded
            // outgoing queue would overflow for a client that reads fine.
            // Not after each: a sender's connection yields once after its
            // ack to send it with its own push, so pushes delivered in one
            // run leave with their acks (see `gateways::ws`).
            if i % YIELD_EVERY == YIELD_EVERY - 1 {
                tokio::task::yield_now().await;
            }
        }
    }
    Ok(())
}
