//! `seq-assign`: gives each message the next seq of its conversation and
//! drops resends.
//!
//! Each task owns the conversations of its partition, so counters need no
//! lock. A counter starts from the store's committed max the first time the
//! task meets the conversation, which keeps seqs gap-free and unrepeated
//! across restarts: anything assigned but not committed before a crash was
//! never acknowledged nor pushed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use imflow_runtime::{
    BuildContext, BuildError, Envelope, Input, Output, PortType, StageKind, StageTask,
};
use serde::Deserialize;

use crate::dedup::{Claim, DedupIndex};
use crate::model::{Sequenced, Stamped};
use crate::store::Store;
use crate::Services;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Options {
    /// Most messages handled per batch.
    max_batch: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options { max_batch: 512 }
    }
}

pub struct SeqAssign {
    store: Arc<Store>,
    dedup: Arc<DedupIndex>,
}

impl SeqAssign {
    pub fn new(services: &Services) -> Self {
        SeqAssign {
            store: services.store.clone(),
            dedup: services.dedup.clone(),
        }
    }
}

impl StageKind for SeqAssign {
    fn kind(&self) -> &'static str {
        "seq-assign"
    }
    fn input(&self) -> Option<PortType> {
        super::stamped()
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
        for input in cx.inputs::<Stamped>()? {
            let task = Partition {
                input,
                out: out.clone(),
                store: self.store.clone(),
                dedup: self.dedup.clone(),
                next: HashMap::new(),
                max_batch: opts.max_batch.max(1),
                errors: errors.clone(),
            };
            tasks.push(Box::pin(task.run()));
        }
        Ok(tasks)
    }
}

struct Partition {
    input: Input<Stamped>,
    out: Output<Sequenced>,
    store: Arc<Store>,
    dedup: Arc<DedupIndex>,
    /// Last seq given out per conversation.
    next: HashMap<Arc<str>, u64>,
    max_batch: usize,
    errors: metrics::Counter,
}

impl Partition {
    async fn run(mut self) -> imflow_runtime::registry::StageResult {
        let mut batch = Vec::with_capacity(self.max_batch);
        while self.input.recv_batch(&mut batch, self.max_batch).await {
            let fresh = self.drop_repeats(&mut batch);
            self.load_counters(&fresh).await;
            for env in fresh {
                let seq = {
                    let c = self
                        .next
                        .entry(env.item.conversation_id.clone())
                        .or_insert(0);
                    *c += 1;
                    *c
                };
                let body: Arc<str> = env.item.render(seq).into();
                let key = env.key;
                let item = Sequenced {
                    msg: env.item,
                    seq,
                    body,
                };
                if self
                    .out
                    .send(Envelope::new(key, item, env.ack))
                    .await
                    .is_err()
                {
                    return Err("downstream of seq-assign stopped".into());
                }
            }
        }
        Ok(())
    }

    /// Claim each message's (sender, client_msg_id); repeats are settled
    /// by the index and dropped here.
    fn drop_repeats(&mut self, batch: &mut Vec<Envelope<Stamped>>) -> Vec<Envelope<Stamped>> {
        let mut fresh = Vec::with_capacity(batch.len());
        for mut env in batch.drain(..) {
            if let Claim::New = self.dedup.claim(&env.item, &mut env.ack) {
                fresh.push(env);
            }
        }
        fresh
    }

    async fn load_counters(&mut self, batch: &[Envelope<Stamped>]) {
        let mut unknown: Vec<Arc<str>> = batch
            .iter()
            .map(|e| e.item.conversation_id.clone())
            .filter(|c| !self.next.contains_key(c))
            .collect();
        if unknown.is_empty() {
            return;
        }
        unknown.sort();
        unknown.dedup();
        let max = loop {
            match self.store.max_seqs(&unknown).await {
                Ok(m) => break m,
                Err(e) => {
                    self.errors.increment(1);
                    tracing::error!(error = %e, "reading max seqs failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        self.next.extend(max);
    }
}
