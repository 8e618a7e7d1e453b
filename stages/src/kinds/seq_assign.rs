//! `seq-assign`: gives each message the next seq of its conversation and
//! drops resends.
//!
//! Each task owns the conversations of its partition, so counters need no
//! lock. A counter starts from the history's max the first time the task
//! meets the conversation (see `store::Sequencer`), which keeps seqs
//! gap-free across restarts and whatever a cache says; a seq that turns out
//! to be taken is refused by the history and given again by `persist-mongo`.
//! The task's memory of conversations is bounded (`remember`).

use std::sync::Arc;
use std::time::Duration;

use imflow_runtime::{
    BuildContext, BuildError, Envelope, Input, Output, PortType, Retrying,
    RoleId, StageKind, StageTask,
};
use serde::Deserialize;

use crate::dedup::Claim;
use crate::model::{Sequenced, Stamped};
use crate::roles::{RESENDS, SEQUENCER};
use crate::store::{seq_memory, SeqMemory, Sequencer};
use crate::Resends;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Options {
    /// Most messages handled per batch.
    max_batch: usize,
    /// Conversations each partition task remembers the last seq of; one it
    /// forgot costs a history read when it comes back.
    remember: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_batch: 512,
            remember: 65_536,
        }
    }
}

pub struct SeqAssign;

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
    fn needs(&self) -> Vec<RoleId> {
        vec![SEQUENCER.id(), RESENDS.id()]
    }
    fn build(&self, cx: &mut BuildContext<'_>) -> Result<Vec<StageTask>, BuildError> {
        let opts: Options = super::options(cx)?;
        let sequencer = cx.resource(&SEQUENCER)?;
        let resends = cx.resource(&RESENDS)?;
        let out = cx.output::<Sequenced>()?;
        let errors = cx.error_counter();
        cx.each_input(|input| {
            Partition {
                input,
                out: out.clone(),
                sequencer: sequencer.clone(),
                resends: resends.clone(),
                last: seq_memory(opts.remember),
                max_batch: opts.max_batch.max(1),
                errors: errors.clone(),
            }
            .run()
        })
    }
}

struct Partition {
    input: Input<Stamped>,
    out: Output<Sequenced>,
    sequencer: Arc<dyn Sequencer>,
    resends: Resends,
    /// Last seq this task gave out per conversation.
    last: SeqMemory,
    max_batch: usize,
    errors: metrics::Counter,
}

impl Partition {
    async fn run(mut self) -> imflow_runtime::registry::StageResult {
        let mut batch = Vec::with_capacity(self.max_batch);
        while self.input.recv_batch(&mut batch, self.max_batch).await {
            let fresh = self.drop_repeats(&mut batch);
            let seqs = self.assign(&fresh).await;
            for (env, seq) in fresh.into_iter().zip(seqs) {
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

    /// With an in-process resend index, claim each message's (sender,
    /// client_msg_id); repeats are settled by the index and dropped here.
    /// (With Redis, ingest claimed them before they entered the pipeline.)
    fn drop_repeats(&mut self, batch: &mut Vec<Envelope<Stamped>>) -> Vec<Envelope<Stamped>> {
        let Resends::Local(index) = &self.resends else {
            return std::mem::take(batch);
        };
        let mut fresh = Vec::with_capacity(batch.len());
        for mut env in batch.drain(..) {
            if let Claim::New = index.claim(&env.item, &mut env.ack) {
                fresh.push(env);
            }
        }
        fresh
    }

    /// Seqs for the batch; a failing sequencer is retried, never skipped
    /// (no seq may be given twice or left out).
    async fn assign(&mut self, batch: &[Envelope<Stamped>]) -> Vec<u64> {
        if batch.is_empty() {
            return Vec::new();
        }
        let ids: Vec<(Arc<str>, Arc<str>)> = batch
            .iter()
            .map(|e| (e.item.conversation_id.clone(), e.item.server_msg_id.clone()))
            .collect();
        let mut retrying =
            Retrying::new("assigning seqs", Duration::from_secs(2)).counting(&self.errors);
        loop {
            match self.sequencer.assign(&mut self.last, &ids).await {
                Ok(seqs) => return seqs,
                Err(e) => retrying.failed(e).await,
            }
        }
    }
}
