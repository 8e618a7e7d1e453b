//! `persist-redis`: keeps the recent messages of each conversation hot, so
//! `pull` after a short absence and `sync` are served without the history.
//! It sits after the durable history, so the cache never shows a message
//! that could still be lost. (In standalone mode the hot state is in process
//! memory.) A failed write is retried before the messages go on: a cache
//! that missed a message would report a stale max seq to `sync`.

use std::sync::Arc;
use std::time::Duration;

use imflow_runtime::{
    Backoff, BuildContext, BuildError, Envelope, Input, Output, PortType, StageKind, StageTask,
};
use serde::Deserialize;

use crate::model::Sequenced;
use crate::store::Hot;
use crate::Services;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Options {}

pub struct PersistRedis {
    hot: Arc<dyn Hot>,
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
            tasks.push(Box::pin(run(
                input,
                out.clone(),
                self.hot.clone(),
                cx.error_counter(),
            )));
        }
        Ok(tasks)
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
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        while let Err(e) = hot.insert(&items).await {
            errors.increment(1);
            tracing::error!(error = %e, retry_in_ms = backoff.delay().as_millis() as u64, "hot cache write failed; retrying");
            backoff.wait().await;
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
