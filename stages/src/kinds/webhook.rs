//! `webhook`: POSTs every stored message to an operator's URL (an "after
//! send" callback), signed, at least once, in each conversation's order.
//!
//! Each input partition is one task that posts its items in order, in
//! batches of up to `batch`; an item's ack is released (with Kafka edges:
//! its offset may commit) only once the receiver answered 2xx, or once the
//! item is kept as a dead letter. A failed POST is retried with backoff; a
//! batch that failed `max_attempts` times, or that the receiver refused for
//! good (a 4xx other than 408/429), goes to the dead letters (a table in
//! standalone, a Kafka topic with Kafka edges) and the partition moves on.
//! While a receiver is away its partitions wait. With a Kafka edge nothing
//! else waits, and what was not delivered when the server stops is sent
//! after the next start. With an in-memory edge (standalone) the guarantee
//! is weaker: once the edge's `capacity` is full, the stage feeding it
//! waits, and with it every ack and push of the server; and what is queued
//! when the server stops or crashes is not sent.
//!
//! The signature is HMAC-SHA256 over `TIMESTAMP.BODY` with the configured
//! secret, sent as `X-Imflow-Signature: sha256=HEX` beside
//! `X-Imflow-Timestamp: TIMESTAMP` (ms), so a receiver can refuse a replay.

use std::sync::Arc;
use std::time::{Duration, Instant};

use imflow_runtime::registry::{OptionError, StageResult};
use imflow_runtime::{
    BuildContext, BuildError, CancellationToken, Envelope, Input, PortType, RoleId,
    StageKind, StageTask,
};
use serde::Deserialize;

use crate::hooks::{endpoint_problems, keep_dead, until_taken, Endpoint, Outcome, Patience};
use crate::model::{now_ms, Sequenced};
use crate::roles::DEAD_LETTERS;
use crate::store::{DeadLetter, DeadLetters};

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct Options {
    /// Where to POST (http or https).
    url: String,
    /// The HMAC key, written here...
    #[serde(default)]
    secret: Option<String>,
    /// ...or read from this environment variable at start (one of the two).
    #[serde(default)]
    secret_env: Option<String>,
    /// Most messages per POST.
    #[serde(default = "one")]
    batch: usize,
    /// How long one POST may take.
    #[serde(default = "crate::hooks::default_timeout_ms")]
    timeout_ms: u64,
    /// POSTs of one batch before it becomes a dead letter.
    #[serde(default = "ten")]
    max_attempts: u32,
    /// The first retry's delay; each next one doubles, up to `retry_cap_ms`.
    #[serde(default = "two_hundred")]
    retry_first_ms: u64,
    #[serde(default = "crate::hooks::default_retry_cap_ms")]
    retry_cap_ms: u64,
}

fn one() -> usize {
    1
}
fn ten() -> u32 {
    10
}
fn two_hundred() -> u64 {
    200
}

/// Most messages one POST may carry.
const MAX_BATCH: usize = 1000;

impl Options {
    fn problems(&self) -> Vec<OptionError> {
        let mut bad = endpoint_problems(&self.url, &self.secret, &self.secret_env);
        let mut say = |field: &str, message: String| {
            bad.push(OptionError {
                field: field.into(),
                message,
            })
        };
        if !(1..=MAX_BATCH).contains(&self.batch) {
            say("batch", format!("must be 1 to {MAX_BATCH}"));
        }
        if self.max_attempts == 0 {
            say("max_attempts", "must be at least 1".into());
        }
        if self.timeout_ms == 0 {
            say("timeout_ms", "must be at least 1".into());
        }
        bad
    }
}

pub struct Webhook;

impl StageKind for Webhook {
    fn kind(&self) -> &'static str {
        "webhook"
    }
    fn input(&self) -> Option<PortType> {
        super::sequenced()
    }
    fn output(&self) -> Option<PortType> {
        None
    }
    fn check_options(&self, options: &serde_yaml::Value) -> Vec<OptionError> {
        super::check_with(options, |o: Options| o.problems())
    }
    fn needs(&self) -> Vec<RoleId> {
        vec![DEAD_LETTERS.id()]
    }
    fn build(&self, cx: &mut BuildContext<'_>) -> Result<Vec<StageTask>, BuildError> {
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
            metrics: Metrics::of(&stage),
            stage,
            endpoint,
            dead: cx.resource(&DEAD_LETTERS)?,
            errors: cx.error_counter(),
            shutdown: cx.shutdown.clone(),
            patience: Patience {
                max_attempts: opts.max_attempts,
                first: Duration::from_millis(opts.retry_first_ms),
                cap: Duration::from_millis(opts.retry_cap_ms),
            },
            opts,
        });
        cx.each_input(|input| run(input, hook.clone()))
    }
}

struct Hook {
    stage: String,
    opts: Options,
    endpoint: Endpoint,
    dead: Arc<dyn DeadLetters>,
    errors: metrics::Counter,
    metrics: Metrics,
    shutdown: CancellationToken,
    patience: Patience,
}

struct Metrics {
    sent: metrics::Counter,
    failed: metrics::Counter,
    dead_lettered: metrics::Counter,
    latency: metrics::Histogram,
}

impl Metrics {
    fn of(stage: &str) -> Self {
        let stage = stage.to_string();
        Metrics {
            sent: metrics::counter!("imflow_webhook_sent_total", "stage" => stage.clone()),
            failed: metrics::counter!("imflow_webhook_failed_posts_total", "stage" => stage.clone()),
            dead_lettered: metrics::counter!("imflow_webhook_dead_lettered_total", "stage" => stage.clone()),
            latency: metrics::histogram!("imflow_webhook_post_seconds", "stage" => stage),
        }
    }
}

async fn run(mut input: Input<Sequenced>, hook: Arc<Hook>) -> StageResult {
    let mut batch: Vec<Envelope<Sequenced>> = Vec::with_capacity(hook.opts.batch);
    while input.recv_batch(&mut batch, hook.opts.batch).await {
        let taken = hook.deliver(&batch).await;
        for env in batch.drain(..) {
            if !taken {
                // With Kafka edges the offset stays: the next start sends it.
                env.ack.fail("the server stopped before the receiver took it");
            }
            env.ack.release();
        }
    }
    Ok(())
}

impl Hook {
    /// POST `batch` until the receiver takes it or it is a dead letter
    /// (`true`), or the server is stopping and it failed (`false`).
    async fn deliver(&self, batch: &[Envelope<Sequenced>]) -> bool {
        let body = self.body(batch);
        let outcome = until_taken(
            &self.stage,
            "webhook",
            &self.patience,
            &self.shutdown,
            &self.metrics.failed,
            || async {
                let started = Instant::now();
                let result = self.endpoint.post(body.clone()).await;
                self.metrics.latency.record(started.elapsed().as_secs_f64());
                if result.is_err() {
                    self.errors.increment(1);
                }
                result.map(drop)
            },
        )
        .await;
        match outcome {
            Outcome::Taken => {
                self.metrics.sent.increment(batch.len() as u64);
                true
            }
            Outcome::GaveUp { why, attempts } => {
                tracing::warn!(stage = %self.stage, attempts, error = %why, messages = batch.len(), to = %self.dead.place(), "webhook gave up; kept as dead letters");
                self.bury(batch, &why, attempts).await;
                true
            }
            Outcome::Stopped => false,
        }
    }

    /// The JSON body: the messages exactly as clients get them.
    fn body(&self, batch: &[Envelope<Sequenced>]) -> String {
        let messages: Vec<&str> = batch.iter().map(|e| &*e.item.body).collect();
        format!(
            r#"{{"event":"message.sent","stage":{},"messages":[{}]}}"#,
            serde_json::Value::from(self.stage.as_str()),
            messages.join(",")
        )
    }

    /// Keep `batch` as dead letters, retrying until the store has them:
    /// an item is never released unseen.
    async fn bury(&self, batch: &[Envelope<Sequenced>], why: &str, attempts: u32) {
        let at_ms = now_ms();
        let letters: Vec<DeadLetter> = batch
            .iter()
            .map(|e| DeadLetter {
                stage: self.stage.clone(),
                conversation_id: e.item.msg.conversation_id.to_string(),
                seq: e.item.seq,
                server_msg_id: e.item.msg.server_msg_id.to_string(),
                body: e.item.body.to_string(),
                error: why.to_string(),
                attempts,
                at_ms,
            })
            .collect();
        keep_dead(&*self.dead, &letters, &self.errors).await;
        self.metrics.dead_lettered.increment(letters.len() as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(yaml: &str) -> Vec<String> {
        let v: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
        Webhook
            .check_options(&v)
            .into_iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect()
    }

    #[test]
    fn options_are_checked_field_by_field() {
        assert!(problems("{url: 'https://hooks.example.com/x', secret_env: HOOK}").is_empty());
        let bad = problems("{url: 'ftp://x', batch: 0, max_attempts: 0}");
        assert_eq!(bad.len(), 4, "{bad:?}");
        assert!(bad[0].starts_with("url: scheme `ftp`"), "{bad:?}");
        assert!(bad[1].starts_with("secret: missing"), "{bad:?}");
        assert!(bad[2].starts_with("batch: must be 1 to 1000"), "{bad:?}");
        assert!(bad[3].starts_with("max_attempts"), "{bad:?}");
        let short = problems("{url: 'http://x', secret: abc}");
        assert_eq!(short, ["secret: too short: use at least 16 characters"]);
        let typo = problems("{url: 'http://x', secret_env: A, retries: 3}");
        assert!(typo[0].contains("unknown field `retries`"), "{typo:?}");
    }
}
