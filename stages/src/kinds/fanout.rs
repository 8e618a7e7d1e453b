//! `fanout`: turns a message into its recipients: both users of a single
//! chat, or every member of the group. The sender is among them, so its other
//! devices (and the sending one, which learns the seq this way) get it too.

use std::sync::Arc;

use imflow_runtime::{
    BuildContext, BuildError, Envelope, Input, Output, PortType, RoleId, StageKind, StageTask,
};
use serde::Deserialize;

use crate::model::{notification, Delivery, Sequenced, Target};
use crate::roles::DIRECTORY;
use crate::store::Directory;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Options {}

pub struct Fanout;

impl StageKind for Fanout {
    fn kind(&self) -> &'static str {
        "fanout"
    }
    fn input(&self) -> Option<PortType> {
        super::sequenced()
    }
    fn output(&self) -> Option<PortType> {
        super::delivery()
    }
    fn check_options(
        &self,
        options: &serde_yaml::Value,
    ) -> Vec<imflow_runtime::registry::OptionError> {
        super::check::<Options>(options)
    }
    fn needs(&self) -> Vec<RoleId> {
        vec![DIRECTORY.id()]
    }
    fn build(&self, cx: &mut BuildContext<'_>) -> Result<Vec<StageTask>, BuildError> {
        let directory = cx.resource(&DIRECTORY)?;
        let out = cx.output::<Delivery>()?;
        let errors = cx.error_counter();
        cx.each_input(|input| run(input, out.clone(), directory.clone(), errors.clone()))
    }
}

async fn run(
    mut input: Input<Sequenced>,
    out: Output<Delivery>,
    directory: Arc<dyn Directory>,
    errors: metrics::Counter,
) -> imflow_runtime::registry::StageResult {
    let mut batch: Vec<Envelope<Sequenced>> = Vec::with_capacity(256);
    while input.recv_batch(&mut batch, 256).await {
        for env in batch.drain(..) {
            let Envelope { key, item, ack } = env;
            let recipients: Arc<[Arc<str>]> = match &item.msg.target {
                Target::User(r) if *r == item.msg.sender => Arc::from(vec![r.clone()]),
                Target::User(r) => Arc::from(vec![item.msg.sender.clone(), r.clone()]),
                Target::Group(g) => match group_readers(&*directory, g, &item).await {
                    Ok(Some(readers)) => readers,
                    Ok(None) => Arc::from(Vec::new()),
                    Err(e) => {
                        // The message is stored; members still get it by sync.
                        errors.increment(1);
                        tracing::error!(error = %e, group = %g, "group lookup failed; push skipped");
                        Arc::from(vec![item.msg.sender.clone()])
                    }
                },
            };
            let delivery = Delivery {
                conversation_id: item.msg.conversation_id,
                seq: item.seq,
                body: item.body,
                recipients,
            };
            if out.send(Envelope::new(key, delivery, ack)).await.is_err() {
                return Err("downstream of fanout stopped".into());
            }
        }
    }
    Ok(())
}

/// Who gets a group message: the members who may read its seq, and for a
/// notification about members (added, removed, left) the users it names,
/// who learn of it whatever their membership now. A snapshot with a member
/// still waiting for the seq that added them is read again from the store:
/// `persist-mongo` recorded it before this message came here.
async fn group_readers(
    directory: &dyn Directory,
    group_id: &str,
    item: &Sequenced,
) -> crate::error::Result<Option<Arc<[Arc<str>]>>> {
    let mut group = directory.group(group_id).await?;
    if group.as_ref().is_some_and(|g| g.has_pending()) {
        group = directory.group_fresh(group_id).await?;
    }
    let Some(group) = group else { return Ok(None) };
    let readers = group.readers(item.seq);
    let named = named_users(item);
    if named.is_empty() {
        return Ok(Some(readers));
    }
    let mut all: Vec<Arc<str>> = readers.to_vec();
    for u in named {
        if !all.iter().any(|r| **r == *u) {
            all.push(u.into());
        }
    }
    Ok(Some(all.into()))
}

/// The users a membership notification names.
pub(crate) fn named_users(item: &Sequenced) -> Vec<String> {
    let field = match item.msg.content_type {
        notification::GROUP_CREATED => "members",
        notification::MEMBERS_ADDED | notification::MEMBERS_REMOVED => "user_ids",
        notification::MEMBER_LEFT => "user_id",
        _ => return Vec::new(),
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&item.msg.content) else {
        return Vec::new();
    };
    match &v[field] {
        serde_json::Value::String(u) => vec![u.clone()],
        serde_json::Value::Array(list) => list
            .iter()
            .filter_map(|u| u.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}
