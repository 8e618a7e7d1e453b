//! `persist-mongo`: writes the durable history in batches, idempotently, and
//! only then marks each message durable (the client's "ack" frame). The
//! message goes on downstream with the same ack, so with Kafka edges its
//! input offset commits only once what it became downstream is durable too
//! (the `ms2ps_chat` write): a crash between the two replays it rather than
//! losing its push. The history is MongoDB in cluster mode and the embedded
//! store in standalone mode. A single chat's first message also makes the
//! chat appear in both users' conversation lists, before the ack.
//!
//! A failed commit is retried, never skipped: skipping would leave a hole in
//! the conversation's seqs. While it retries, backpressure stops the senders.
//! A seq the history finds taken by another message (a counter that was
//! behind) is never taken as done: the message gets a new seq from the
//! sequencer and is committed again.

use std::sync::Arc;
use std::time::Duration;

use imflow_runtime::CancellationToken;
use imflow_runtime::{
    BuildContext, BuildError, Envelope, Input, Output, PortType, Retrying,
    RoleId, StageKind, StageTask,
};
use serde::Deserialize;

use crate::model::{notification, Sequenced, Target};
use crate::roles::{DIRECTORY, HISTORY, RESENDS, SEQUENCER};
use crate::store::{Directory, History, Sequencer};
use crate::Resends;

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

pub struct PersistMongo;

#[derive(Clone)]
struct Stores {
    history: Arc<dyn History>,
    directory: Arc<dyn Directory>,
    sequencer: Arc<dyn Sequencer>,
    resends: Resends,
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
    fn needs(&self) -> Vec<RoleId> {
        vec![HISTORY.id(), DIRECTORY.id(), SEQUENCER.id(), RESENDS.id()]
    }
    fn build(&self, cx: &mut BuildContext<'_>) -> Result<Vec<StageTask>, BuildError> {
        let opts: Options = super::options(cx)?;
        let stores = Stores {
            history: cx.resource(&HISTORY)?,
            directory: cx.resource(&DIRECTORY)?,
            sequencer: cx.resource(&SEQUENCER)?,
            resends: cx.resource(&RESENDS)?,
        };
        let out = cx.output::<Sequenced>()?;
        let errors = cx.error_counter();
        let shutdown = cx.shutdown.clone();
        cx.each_input(|input| {
            run(
                input,
                out.clone(),
                stores.clone(),
                opts.max_batch.max(1),
                errors.clone(),
                shutdown.clone(),
            )
        })
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
    let reassigned = metrics::counter!("imflow_seq_reassigned_total");
    while input.recv_batch(&mut batch, max_batch).await {
        let mut retrying =
            Retrying::new("history commit", Duration::from_secs(5)).counting(&errors);
        // Positions in `batch` still to store.
        let mut todo: Vec<usize> = (0..batch.len()).collect();
        let mut moved = false;
        while !todo.is_empty() {
            let items: Vec<Sequenced> = todo.iter().map(|&i| batch[i].item.clone()).collect();
            let result = match stores.history.commit(items).await {
                Ok(taken) if taken.is_empty() => Ok(Vec::new()),
                Ok(taken) => {
                    let again: Vec<usize> =
                        taken.iter().filter_map(|&t| todo.get(t).copied()).collect();
                    reassign(&stores, &mut batch, &again)
                        .await
                        .map(|()| again)
                        .map_err(|e| format!("reassigning taken seqs: {e}"))
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(again) => {
                    if !again.is_empty() {
                        reassigned.increment(again.len() as u64);
                        moved = true;
                    }
                    todo = again;
                    retrying.reset();
                }
                Err(e) => {
                    if shutdown.is_cancelled() && retrying.at_cap() {
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
                    retrying.failed(e).await;
                }
            }
        }
        let mut up_to: std::collections::HashMap<Arc<str>, u64> = Default::default();
        for env in &batch {
            let s = up_to
                .entry(env.item.msg.conversation_id.clone())
                .or_default();
            *s = (*s).max(env.item.seq);
        }
        let up_to: Vec<(Arc<str>, u64)> = up_to.into_iter().collect();
        let opened: Vec<Arc<str>> = batch
            .iter()
            .filter(|e| e.item.seq == 1 && matches!(e.item.msg.target, Target::User(_)))
            .map(|e| e.item.msg.conversation_id.clone())
            .collect();
        if !opened.is_empty() {
            let mut retrying = Retrying::new("recording new single chats", Duration::from_secs(5))
                .counting(&errors);
            while let Err(e) = stores.directory.open_single_chats(&opened).await {
                retrying.failed(e).await;
            }
        }
        // Members added by a notification read from its seq on: recorded
        // before it goes on, so fanout and `pull` see it.
        for env in batch.iter().filter(|e| {
            matches!(
                e.item.msg.content_type,
                notification::GROUP_CREATED | notification::MEMBERS_ADDED
            )
        }) {
            let Target::Group(g) = &env.item.msg.target else {
                continue;
            };
            let users = super::fanout::named_users(&env.item);
            let mut retrying =
                Retrying::new("recording new members' first seq", Duration::from_secs(5))
                    .counting(&errors);
            while let Err(e) = stores.directory.set_min_seq(g, &users, env.item.seq).await {
                retrying.failed(e).await;
            }
        }
        if moved {
            // A message that got a new seq goes after the others of its
            // conversation: downstream (the hot cache, pushes) sees seq order.
            batch.sort_by_key(|e| e.item.seq);
        }
        for env in batch.drain(..) {
            if let Resends::Local(index) = &stores.resends {
                index.mark_durable(&env.item.msg);
            }
            env.ack.durable();
            if out.send(env).await.is_err() {
                return Err("downstream of persist-mongo stopped".into());
            }
        }
        // After the acks: bookkeeping, off the path a client waits on.
        if let Err(e) = stores.sequencer.stored(&up_to).await {
            // What stays listed in flight is at or below the history's max
            // now, which never counts as in flight.
            tracing::warn!(error = %e, "recording stored seqs failed");
        }
    }
    Ok(())
}

/// Give new seqs to the messages at `positions` of `batch` (their seqs were
/// taken in the history), above what the history holds now.
async fn reassign(
    stores: &Stores,
    batch: &mut [Envelope<Sequenced>],
    positions: &[usize],
) -> crate::error::Result<()> {
    let mut by_conv: Vec<(Arc<str>, Vec<usize>)> = Vec::new();
    for &i in positions {
        let c = &batch[i].item.msg.conversation_id;
        match by_conv.iter_mut().find(|(k, _)| k == c) {
            Some((_, v)) => v.push(i),
            None => by_conv.push((c.clone(), vec![i])),
        }
    }
    let convs: Vec<Arc<str>> = by_conv.iter().map(|(c, _)| c.clone()).collect();
    let stored = stores.history.max_seqs(&convs).await?;
    for (conv, idx) in by_conv {
        let taken: Vec<(Arc<str>, u64)> = idx
            .iter()
            .map(|&i| (batch[i].item.msg.server_msg_id.clone(), batch[i].item.seq))
            .collect();
        let max = stored.get(&conv).copied().unwrap_or(0);
        let seqs = stores.sequencer.reassign(&conv, &taken, max).await?;
        for (&i, seq) in idx.iter().zip(seqs) {
            let item = &mut batch[i].item;
            tracing::warn!(conversation = %conv, server_msg_id = %item.msg.server_msg_id, taken = item.seq, seq, "seq already taken in the history (a counter was behind it); given a new one");
            item.seq = seq;
            item.body = item.msg.render(seq).into();
        }
    }
    Ok(())
}
