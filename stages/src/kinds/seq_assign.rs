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

use crate::dedup::{Claim, DedupIndex, DedupKey};
use crate::model::{Sequenced, Stamped};
use crate::store::Store;
use crate::Services;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Options {
    /// Most messages handled per batch.
    max_batch: usize,
    /// How long a durable message stays in the in-memory resend index; older
    /// resends are found in the history instead.
    dedup_window_secs: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_batch: 512,
            dedup_window_secs: 600,
        }
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
        Some(PortType::of::<Stamped>(super::STAMPED))
    }
    fn output(&self) -> Option<PortType> {
        Some(PortType::of::<Sequenced>(super::SEQUENCED))
    }
    fn check_options(
        &self,
        options: &serde_yaml::Value,
    ) -> Vec<imflow_runtime::registry::OptionError> {
        super::check::<Options>(options)
    }
    fn build(&self, cx: &mut BuildContext<'_>) -> Result<Vec<StageTask>, BuildError> {
        let opts: Options = imflow_runtime::registry::decode_options(cx.options)
            .map_err(|e| BuildError::stage(cx.name, e.message))?;
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
        let dedup = self.dedup.clone();
        let shutdown = cx.shutdown.clone();
        let every = Duration::from_secs(opts.dedup_window_secs.clamp(1, 60));
        tasks.push(Box::pin(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tick.tick() => {
                        let n = dedup.sweep();
                        if n > 0 {
                            tracing::debug!(dropped = n, left = dedup.len(), "resend index swept");
                        }
                    }
                }
            }
        }));
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
            let fresh = self.drop_repeats(&mut batch).await;
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

    /// Claim each message's (sender, client_msg_id); settle repeats of
    /// recent messages from memory and of older ones from the history.
    async fn drop_repeats(&mut self, batch: &mut Vec<Envelope<Stamped>>) -> Vec<Envelope<Stamped>> {
        let mut claimed = Vec::with_capacity(batch.len());
        for mut env in batch.drain(..) {
            let key: DedupKey = (env.item.sender.clone(), env.item.client_msg_id.clone());
            if let Claim::New = self.dedup.claim(key, env.item.ack_info(), &mut env.ack) {
                claimed.push(env);
            }
        }
        // Only keys the index may have seen stored are worth a history query.
        let keys: Vec<DedupKey> = claimed
            .iter()
            .map(|e| (e.item.sender.clone(), e.item.client_msg_id.clone()))
            .filter(|k| self.dedup.maybe_stored(k))
            .collect();
        if keys.is_empty() {
            return claimed;
        }
        let found = loop {
            match self.store.find_sent(&keys).await {
                Ok(f) => break f,
                Err(e) => {
                    self.errors.increment(1);
                    tracing::error!(error = %e, "resend check failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        if found.is_empty() {
            return claimed;
        }
        let mut fresh = Vec::with_capacity(claimed.len());
        for env in claimed {
            let key: DedupKey = (env.item.sender.clone(), env.item.client_msg_id.clone());
            match found.get(&key) {
                Some(first) => {
                    // Stored long ago: answer this resend, and any that queued
                    // behind it, with the stored message's ids.
                    let mut ack = env.ack;
                    let mut me = ack.take();
                    self.dedup.mark_durable(&key, Some(first.clone()));
                    self.dedup.claim(key, first.clone(), &mut me);
                    ack.release();
                }
                None => fresh.push(env),
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
