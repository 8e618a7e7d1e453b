//! `persist-redis`: keeps the recent messages of each conversation hot, so
//! `pull` after a short absence is served from memory. It sits after the
//! durable history, so the cache never shows a message that could still be
//! lost. (In standalone mode the hot state is in process memory.)

use std::sync::Arc;

use imflow_runtime::{
    BuildContext, BuildError, Envelope, Input, Output, PortType, StageKind, StageTask,
};
use serde::Deserialize;

use crate::hot::HotCache;
use crate::model::Sequenced;
use crate::Services;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Options {}

pub struct PersistRedis {
    hot: Arc<HotCache>,
}

impl PersistRedis {
    pub fn new(services: &Services) -> Self {
        PersistRedis {
            hot: services.hot.clone(),
        }
    }
}

impl StageKind for PersistRedis {
    fn kind(&self) -> &'static str {
        "persist-redis"
    }
    fn input(&self) -> Option<PortType> {
        super::sequenced()
    }
    fn output(&self) -> Option<PortType> {
        super::sequenced()
    }
    fn check_options(
        &self,
        options: &serde_yaml::Value,
    ) -> Vec<imflow_runtime::registry::OptionError> {
        super::check::<Options>(options)
    }
    fn build(&self, cx: &mut BuildContext<'_>) -> Result<Vec<StageTask>, BuildError> {
        let out = cx.output::<Sequenced>()?;
        let mut tasks: Vec<StageTask> = Vec::new();
        for input in cx.inputs::<Sequenced>()? {
            tasks.push(Box::pin(run(input, out.clone(), self.hot.clone())));
        }
        Ok(tasks)
    }
}

async fn run(
    mut input: Input<Sequenced>,
    out: Output<Sequenced>,
    hot: Arc<HotCache>,
) -> imflow_runtime::registry::StageResult {
    let mut batch: Vec<Envelope<Sequenced>> = Vec::with_capacity(256);
    while input.recv_batch(&mut batch, 256).await {
        for env in batch.drain(..) {
            hot.insert(&env.item.msg.conversation_id, env.item.seq, &env.item.body);
            if out.send(env).await.is_err() {
                return Err("downstream of persist-redis stopped".into());
            }
        }
    }
    Ok(())
}
