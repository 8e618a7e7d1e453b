//! `before-send`: asks an operator's URL about each message before it gets
//! its seq, on the sender's ack path: the receiver allows it, denies it (the
//! sender gets `forbidden` with the receiver's reason, and nothing is
//! stored), or modifies its content. Place it between `ingest` and
//! `seq-assign`, in `ingest`'s process group (with an in-memory edge), so
//! the sender's answer waits for the decision.
//!
//! The POST (signed as in `crate::hooks`) is
//! `{"event": "message.before_send", "stage": NAME, "message": {...}}`; the
//! receiver answers 2xx with `{"action": "allow"}` (or an empty body),
//! `{"action": "deny", "reason": "..."}`, or `{"action": "modify",
//! "content": {...}}` (checked like a client's content). A receiver that
//! does not answer within `timeout_ms`, answers something else, or is away,
//! is a failure: `on_failure: allow` lets the message through (fail-open, the
//! default, as OpenIM's callbacks do), `deny` refuses it with `unavailable`
//! (fail-closed: the sender may send it again).
//!
//! Messages of a partition are asked about side by side (up to
//! `concurrency`) and go on in their order.

use std::sync::Arc;

use imflow_runtime::registry::{decode_options, OptionError, StageResult};
use imflow_runtime::{
    BuildContext, BuildError, Envelope, Input, Output, PortType, StageKind, StageTask,
};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::hooks::{endpoint_problems, Endpoint};
use crate::model::{check_content, notification, Stamped, Target};

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
enum OnFailure {
    #[default]
    Allow,
    Deny,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    url: String,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    secret_env: Option<String>,
    /// How long the sender's answer may wait for the receiver.
    #[serde(default = "one_second")]
    timeout_ms: u64,
    #[serde(default)]
    on_failure: OnFailure,
    /// Most messages of one partition asked about at once.
    #[serde(default = "sixty_four")]
    concurrency: usize,
}

fn one_second() -> u64 {
    1_000
}
fn sixty_four() -> usize {
    64
}

pub struct BeforeSend;

impl StageKind for BeforeSend {
    fn kind(&self) -> &'static str {
        "before-send"
    }
    fn input(&self) -> Option<PortType> {
        super::stamped()
    }
    fn output(&self) -> Option<PortType> {
        super::stamped()
    }
    fn check_options(&self, options: &serde_yaml::Value) -> Vec<OptionError> {
        let o = match decode_options::<Options>(options) {
            Ok(o) => o,
            Err(e) => return vec![e],
        };
        let mut bad = endpoint_problems(&o.url, &o.secret, &o.secret_env);
        if !(1..=30_000).contains(&o.timeout_ms) {
            bad.push(OptionError {
                field: "timeout_ms".into(),
                message: "must be 1 to 30000: senders wait this long at most".into(),
            });
        }
        if !(1..=1024).contains(&o.concurrency) {
            bad.push(OptionError {
                field: "concurrency".into(),
                message: "must be 1 to 1024".into(),
            });
        }
        bad
    }
    fn build(&self, cx: &mut BuildContext<'_>) -> Result<Vec<StageTask>, BuildError> {
        if cx.reads_kafka() {
            // Behind Kafka the sender was answered already: a deny would
            // drop a message its sender saw acked.
            return Err(BuildError::stage(
                cx.name,
                "its input is a Kafka topic, where senders are already answered; read `ingest` through an in-memory edge (no `topic`) and place it in ingest's process group",
            ));
        }
        let opts: Options = super::options(cx)?;
        let endpoint = Endpoint::open(
            cx.name,
            &opts.url,
            &opts.secret,
            &opts.secret_env,
            opts.timeout_ms,
        )?;
        let stage = cx.name.to_string();
        let hook = Arc::new(Hook {
            decided: Decided::of(&stage),
            stage,
            endpoint,
            on_failure: opts.on_failure,
            errors: cx.error_counter(),
        });
        let out = cx.output::<Stamped>()?;
        let concurrency = opts.concurrency;
        cx.each_input(|input| run(input, out.clone(), hook.clone(), concurrency))
    }
}

struct Hook {
    stage: String,
    endpoint: Endpoint,
    on_failure: OnFailure,
    errors: metrics::Counter,
    decided: Decided,
}

/// `imflow_before_send_total{stage, verdict}`.
struct Decided {
    allowed: metrics::Counter,
    denied: metrics::Counter,
    modified: metrics::Counter,
    failed_open: metrics::Counter,
    failed_closed: metrics::Counter,
    latency: metrics::Histogram,
}

impl Decided {
    fn of(stage: &str) -> Self {
        let c = |verdict: &'static str| {
            metrics::counter!("imflow_before_send_total", "stage" => stage.to_string(), "verdict" => verdict)
        };
        Decided {
            allowed: c("allow"),
            denied: c("deny"),
            modified: c("modify"),
            failed_open: c("failed-open"),
            failed_closed: c("failed-closed"),
            latency: metrics::histogram!("imflow_before_send_seconds", "stage" => stage.to_string()),
        }
    }
}

/// What became of one message.
#[derive(Debug, PartialEq)]
enum Verdict {
    Allow,
    Deny(String),
    Modify(String),
    /// The receiver could not be asked, or answered nonsense.
    Failed(String),
}

/// The receiver's answer. (A struct, not a tagged enum: serde cannot keep
/// `content` raw inside a tagged enum.)
#[derive(Deserialize)]
struct Answer {
    action: String,
    #[serde(default)]
    reason: String,
    content: Option<Box<RawValue>>,
}

async fn run(
    mut input: Input<Stamped>,
    out: Output<Stamped>,
    hook: Arc<Hook>,
    concurrency: usize,
) -> StageResult {
    let mut batch: Vec<Envelope<Stamped>> = Vec::with_capacity(concurrency);
    while input.recv_batch(&mut batch, concurrency).await {
        let verdicts =
            futures::future::join_all(batch.iter().map(|env| hook.ask(&env.item))).await;
        for (mut env, verdict) in batch.drain(..).zip(verdicts) {
            let verdict = match verdict {
                Verdict::Failed(why) => {
                    hook.errors.increment(1);
                    tracing::warn!(stage = %hook.stage, error = %why, server_msg_id = %env.item.server_msg_id, "before-send receiver failed");
                    match hook.on_failure {
                        OnFailure::Allow => {
                            hook.decided.failed_open.increment(1);
                            Verdict::Allow
                        }
                        OnFailure::Deny => {
                            hook.decided.failed_closed.increment(1);
                            env.ack.fail(format!("before-send: {why}"));
                            env.ack.release();
                            continue;
                        }
                    }
                }
                v => v,
            };
            match verdict {
                Verdict::Deny(reason) => {
                    hook.decided.denied.increment(1);
                    env.ack.refuse(reason);
                    env.ack.release();
                    continue;
                }
                Verdict::Modify(content) => {
                    hook.decided.modified.increment(1);
                    env.item.content = content.into();
                }
                _ => hook.decided.allowed.increment(1),
            }
            if out.send(env).await.is_err() {
                return Err("downstream of before-send stopped".into());
            }
        }
    }
    Ok(())
}

impl Hook {
    async fn ask(&self, msg: &Stamped) -> Verdict {
        // Server notifications (group changes, revokes) are the server's own.
        if notification::is(msg.content_type) {
            return Verdict::Allow;
        }
        let started = std::time::Instant::now();
        let verdict = match self.endpoint.post(self.body(msg)).await {
            Err(refused) => Verdict::Failed(refused.why),
            Ok(response) => match response.bytes().await {
                Err(e) => Verdict::Failed(format!("reading the answer: {e}")),
                Ok(body) => decide(&body, msg.content_type),
            },
        };
        self.decided
            .latency
            .record(started.elapsed().as_secs_f64());
        verdict
    }

    fn body(&self, msg: &Stamped) -> String {
        let (recv_id, group_id) = match &msg.target {
            Target::User(u) => (Some(&**u), None),
            Target::Group(g) => (None, Some(&**g)),
        };
        let content: serde_json::Value =
            serde_json::from_str(&msg.content).unwrap_or(serde_json::Value::Null);
        serde_json::json!({
            "event": "message.before_send",
            "stage": self.stage,
            "message": {
                "conversation_id": &*msg.conversation_id,
                "server_msg_id": &*msg.server_msg_id,
                "client_msg_id": &*msg.client_msg_id,
                "send_id": &*msg.sender,
                "recv_id": recv_id,
                "group_id": group_id,
                "content_type": msg.content_type,
                "content": content,
                "send_time": msg.send_time,
            }
        })
        .to_string()
    }
}

/// The verdict in a receiver's 2xx answer.
fn decide(body: &[u8], content_type: i64) -> Verdict {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Verdict::Allow;
    }
    let answer = match serde_json::from_slice::<Answer>(body) {
        Ok(a) => a,
        Err(e) => return Verdict::Failed(format!("answer is not JSON with an action: {e}")),
    };
    match (answer.action.as_str(), answer.content) {
        ("allow", _) => Verdict::Allow,
        ("deny", _) if answer.reason.is_empty() => {
            Verdict::Deny("refused by the server's policy".into())
        }
        ("deny", _) => Verdict::Deny(answer.reason),
        ("modify", Some(content)) => match check_content(content_type, &content) {
            Ok(()) => Verdict::Modify(content.get().to_string()),
            Err(e) => Verdict::Failed(format!("modified content refused: {}", e.message)),
        },
        ("modify", None) => Verdict::Failed("modify without content".into()),
        (other, _) => Verdict::Failed(format!(
            "action `{other}`: the answer must be allow, deny or modify"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_become_verdicts() {
        assert_eq!(decide(b"", 101), Verdict::Allow);
        assert_eq!(decide(br#"{"action":"allow"}"#, 101), Verdict::Allow);
        assert_eq!(
            decide(br#"{"action":"deny","reason":"no links"}"#, 101),
            Verdict::Deny("no links".into())
        );
        assert_eq!(
            decide(br#"{"action":"modify","content":{"text":"hi"}}"#, 101),
            Verdict::Modify(r#"{"text":"hi"}"#.into())
        );
        // A modification must still be valid content of its type.
        assert!(matches!(
            decide(br#"{"action":"modify","content":{"no_text":1}}"#, 101),
            Verdict::Failed(_)
        ));
        assert!(matches!(decide(b"yes", 101), Verdict::Failed(_)));
        assert!(matches!(
            decide(br#"{"action":"shrug"}"#, 101),
            Verdict::Failed(_)
        ));
    }
}
