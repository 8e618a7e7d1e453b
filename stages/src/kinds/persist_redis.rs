//! `persist-redis`: keeps the recent messages of each conversation hot, so
//! `pull` after a short absence and `sync` are served without the history.
//! It sits after the durable history, so the cache never shows a message
//! that could still be lost. (In standalone mode the hot state is in process
//! memory.) A failed write is retried before the messages go on: a cache
//! that missed a message would report a stale max seq to `sync`.

use std::sync::Arc;
use std::time::Duration;

use imflow_runtime::{
    BuildContext, BuildError, Envelope, Input, Output, PortType, Retrying,
    RoleId, StageKind, StageTask,
};
use serde::Deserialize;

use crate::model::Sequenced;
use crate::roles::HOT;
use crate::store::Hot;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Options {}

pub struct PersistRedis;

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
    fn needs(&self) -> Vec<RoleId> {
        vec![HOT.id()]
    }
    fn build(&self, cx: &mut BuildContext<'_>) -> Result<Vec<StageTask>, BuildError> {
        let hot = cx.resource(&HOT)?;
        let out = cx.output::<Sequenced>()?;
        let errors = cx.error_counter();
        cx.each_input(|input| run(input, out.clone(), hot.clone(), errors.clone()))
    }
}

async fn run(
    mut input: Input<Sequenced>,
    out: Output<Sequenced>,
    hot: Arc<dyn Hot>,
    errors: metrics::Counter,
) -> imflow_runtime::registry::StageResult {
    let mut batch: Vec<Envelope<Sequenced>> = Vec::with_capacity(256);
    while input.recv_batch(&mut batch, 256).await {
        let items: Vec<&Sequenced> = batch.iter().map(|e| &e.item).collect();
        let mut retrying =
            Retrying::new("hot cache write", Duration::from_secs(2)).counting(&errors);
        while let Err(e) = hot.insert(&items).await {
            retrying.failed(e).await;
        }
        drop(items);
        for env in batch.drain(..) {
            if out.send(env).await.is_err() {
                return Err("downstream of persist-redis stopped".into());
            }
        }
    }
    Ok(())
}
