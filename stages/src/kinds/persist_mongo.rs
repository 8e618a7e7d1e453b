//! `persist-mongo`: writes the durable history in batches, idempotently, and
//! only then releases each message's ack (the client's "ack" frame, or with
//! Kafka edges the offset commit of its input). The history is MongoDB in
//! cluster mode and the embedded store in standalone mode. A single chat's
//! first message also makes the chat appear in both users' conversation
//! lists, before the ack.
//!
//! A failed commit is retried, never skipped: skipping would leave a hole in
//! the conversation's seqs. While it retries, backpressure stops the senders.

use std::sync::Arc;
use std::time::Duration;

use imflow_runtime::CancellationToken;
use imflow_runtime::{
    Ack, BuildContext, BuildError, Envelope, Input, Output, PortType, StageKind, StageTask,
};
use serde::Deserialize;

use crate::model::{Sequenced, Target};
use crate::store::{Directory, History};
use crate::{Resends, Services};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Options {
    /// Most messages per commit from one partition (the store may merge
    /// several partitions' batches into one transaction).
    max_batch: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options { max_batch: 1024 }
    }
}

pub struct PersistMongo {
    stores: Stores,
}

#[derive(Clone)]
struct Stores {
    history: Arc<dyn History>,
    directory: Arc<dyn Directory>,
    resends: Resends,
}

impl PersistMongo {
    pub fn new(services: &Services) -> Self {
        PersistMongo {
            stores: Stores {
                history: services.history.clone(),
                directory: services.directory.clone(),
                resends: services.resends.clone(),
            },
        }
    }
}

impl StageKind for PersistMongo {
    fn kind(&self) -> &'static str {
        "persist-mongo"
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
        let opts: Options = super::options(cx)?;
        let out = cx.output::<Sequenced>()?;
        let errors = cx.error_counter();
        let mut tasks: Vec<StageTask> = Vec::new();
        for input in cx.inputs::<Sequenced>()? {
            tasks.push(Box::pin(run(
                input,
                out.clone(),
                self.stores.clone(),
                opts.max_batch.max(1),
                errors.clone(),
                cx.shutdown.clone(),
            )));
        }
        Ok(tasks)
    }
}

async fn run(
    mut input: Input<Sequenced>,
    out: Output<Sequenced>,
    stores: Stores,
    max_batch: usize,
    errors: metrics::Counter,
    shutdown: CancellationToken,
) -> imflow_runtime::registry::StageResult {
    let mut batch: Vec<Envelope<Sequenced>> = Vec::with_capacity(max_batch);
    while input.recv_batch(&mut batch, max_batch).await {
        let items: Vec<Sequenced> = batch.iter().map(|e| e.item.clone()).collect();
        let opened: Vec<Arc<str>> = items
            .iter()
            .filter(|m| m.seq == 1 && matches!(m.msg.target, Target::User(_)))
            .map(|m| m.msg.conversation_id.clone())
            .collect();
        let mut backoff = Duration::from_millis(50);
        loop {
            let result = match stores.history.commit(items.clone()).await {
                Ok(()) if opened.is_empty() => Ok(()),
                Ok(()) => stores
                    .directory
                    .open_single_chats(&opened)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => break,
                Err(e) => {
                    errors.increment(1);
                    if shutdown.is_cancelled() && backoff >= Duration::from_secs(2) {
                        // Shutting down and the store will not take them: the
                        // senders were never acked and are told to resend.
                        for env in batch.drain(..) {
                            if let Resends::Local(index) = &stores.resends {
                                index.abandon(&env.item.msg);
                            }
                            env.ack.fail(format!("not stored: {e}"));
                            env.ack.release();
                        }
                        return Err(format!("history commit failed: {e}").into());
                    }
                    tracing::error!(error = %e, retry_in_ms = backoff.as_millis() as u64, "history commit failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        for env in batch.drain(..) {
            let Envelope { key, item, ack } = env;
            if let Resends::Local(index) = &stores.resends {
                index.mark_durable(&item.msg);
            }
            ack.release();
            if out
                .send(Envelope::new(key, item, Ack::none()))
                .await
                .is_err()
            {
                return Err("downstream of persist-mongo stopped".into());
            }
        }
    }
    Ok(())
}
