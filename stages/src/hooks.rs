//! What the HTTP hook kinds (`webhook`, `before-send`, `offline-push`)
//! share: the receiver's URL checked at validation, the HMAC key (written
//! in the pipeline or read from the environment), signed POSTs, what an
//! answer other than 2xx means, and posting again until a receiver takes
//! it.
//!
//! A POST carries `X-Imflow-Timestamp: MS` and `X-Imflow-Signature:
//! sha256=HEX`, the HMAC-SHA256 of `MS.BODY` under the key, so a receiver
//! checks who sent it and can refuse an old one (a replay).

use std::future::Future;
use std::time::Duration;

use hmac::{Hmac, Mac};
use imflow_runtime::registry::OptionError;
use imflow_runtime::{Backoff, BuildError, CancellationToken, Retrying};
use sha2::Sha256;

use crate::model::now_ms;
use crate::store::{DeadLetter, DeadLetters};

/// Check a hook's `url`, `secret` and `secret_env` options.
pub(crate) fn endpoint_problems(
    url: &str,
    secret: &Option<String>,
    secret_env: &Option<String>,
) -> Vec<OptionError> {
    let mut bad = Vec::new();
    let mut say = |field: &str, message: String| {
        bad.push(OptionError {
            field: field.into(),
            message,
        })
    };
    if let Some(why) = url_problem(url) {
        say("url", why);
    }
    match (secret, secret_env) {
        (Some(_), Some(_)) => say("secret", "give `secret` or `secret_env`, not both".into()),
        (None, None) => say(
            "secret",
            "missing: give `secret`, or `secret_env` naming the variable that holds it".into(),
        ),
        (Some(s), None) if s.len() < 16 => {
            say("secret", "too short: use at least 16 characters".into())
        }
        _ => {}
    }
    bad
}

/// What is wrong with a receiver's URL, if anything.
pub(crate) fn url_problem(url: &str) -> Option<String> {
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => None,
        Ok(u) => Some(format!("scheme `{}`: use http or https", u.scheme())),
        Err(e) => Some(format!("`{url}` is not a URL: {e}")),
    }
}

/// Keep `letters` in `dead`, retrying until they are stored: what a sink
/// gave up on is never released unseen.
pub(crate) async fn keep_dead(
    dead: &dyn DeadLetters,
    letters: &[DeadLetter],
    errors: &metrics::Counter,
) {
    let mut retrying =
        Retrying::new("keeping dead letters", Duration::from_secs(5)).counting(errors);
    while let Err(e) = dead.put(letters).await {
        retrying.failed(e).await;
    }
}

/// A receiver of signed POSTs.
pub(crate) struct Endpoint {
    pub(crate) url: String,
    pub(crate) timeout: Duration,
    http: reqwest::Client,
    secret: Vec<u8>,
}

/// Why a POST did not get a 2xx.
pub(crate) struct Refused {
    pub(crate) why: String,
    /// The receiver will not take it however often it is sent: a 4xx
    /// other than 408 (timeout) and 429 (too many requests).
    pub(crate) for_good: bool,
    /// The HTTP status, when there was an answer.
    pub(crate) status: Option<u16>,
}

impl Endpoint {
    /// The endpoint of stage `stage`; a `secret_env` that is not set is an
    /// error naming the variable.
    pub(crate) fn open(
        stage: &str,
        url: &str,
        secret: &Option<String>,
        secret_env: &Option<String>,
        timeout_ms: u64,
    ) -> Result<Self, BuildError> {
        let secret = match (secret, secret_env) {
            (Some(s), _) => s.clone(),
            (None, Some(var)) => std::env::var(var).map_err(|_| {
                BuildError::stage(
                    stage,
                    format!("options.secret_env: the environment variable {var} is not set; set it to the hook's HMAC key"),
                )
            })?,
            (None, None) => return Err(BuildError::stage(stage, "options.secret: missing")),
        };
        let timeout = Duration::from_millis(timeout_ms.max(1));
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| BuildError::stage(stage, format!("HTTP client: {e}")))?;
        Ok(Endpoint {
            url: url.to_string(),
            timeout,
            http,
            secret: secret.into_bytes(),
        })
    }

    /// POST `body` (JSON), signed; the response if it is a 2xx.
    pub(crate) async fn post(&self, body: String) -> Result<reqwest::Response, Refused> {
        let timestamp = now_ms().to_string();
        let signature = format!("sha256={}", sign(&self.secret, &timestamp, &body));
        let request = self
            .http
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("X-Imflow-Timestamp", &timestamp)
            .header("X-Imflow-Signature", signature)
            .body(body);
        answer(request, &self.url, self.timeout).await
    }
}

/// Send `request` (to `url`, bounded by `timeout`); the response if it is a
/// 2xx, else why not and whether sending it again can help.
pub(crate) async fn answer(
    request: reqwest::RequestBuilder,
    url: &str,
    timeout: Duration,
) -> Result<reqwest::Response, Refused> {
    let response = request.send().await.map_err(|e| Refused {
        why: if e.is_timeout() {
            format!("no answer within {} ms", timeout.as_millis())
        } else {
            format!("cannot reach {url}: {e}")
        },
        for_good: false,
        status: None,
    })?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    Err(Refused {
        why: format!("HTTP {status}"),
        for_good: status.is_client_error()
            && status != reqwest::StatusCode::REQUEST_TIMEOUT
            && status != reqwest::StatusCode::TOO_MANY_REQUESTS,
        status: Some(status.as_u16()),
    })
}

/// A POST's deadline when a stage names none (ms).
pub(crate) fn default_timeout_ms() -> u64 {
    5_000
}

/// The longest wait between two retries when a stage names none (ms).
pub(crate) fn default_retry_cap_ms() -> u64 {
    30_000
}

/// How long a sink keeps posting one thing before it gives up on it.
#[derive(Clone)]
pub(crate) struct Patience {
    pub(crate) max_attempts: u32,
    pub(crate) first: Duration,
    pub(crate) cap: Duration,
}

/// How [`until_taken`] ended.
pub(crate) enum Outcome {
    Taken,
    /// Refused `attempts` times, or once for good: a dead letter now.
    GaveUp {
        why: String,
        attempts: u32,
    },
    /// The server is stopping and it was not taken.
    Stopped,
}

/// Run `post` until it succeeds, with backoff between failures, giving up
/// after `patience.max_attempts` or at a refusal for good, and at once
/// when `shutdown` fires. Each failure is logged (naming `stage` and
/// `what`) and counted in `failed`.
pub(crate) async fn until_taken<F, Fut>(
    stage: &str,
    what: &str,
    patience: &Patience,
    shutdown: &CancellationToken,
    failed: &metrics::Counter,
    mut post: F,
) -> Outcome
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), Refused>>,
{
    let mut backoff = Backoff::new(
        patience.first.max(Duration::from_millis(1)),
        patience.cap.max(Duration::from_millis(1)),
    );
    let mut attempts = 0;
    loop {
        attempts += 1;
        let refused = match post().await {
            Ok(()) => return Outcome::Taken,
            Err(r) => r,
        };
        failed.increment(1);
        if refused.for_good || attempts >= patience.max_attempts {
            return Outcome::GaveUp {
                why: refused.why,
                attempts,
            };
        }
        if shutdown.is_cancelled() {
            tracing::warn!(stage, what, error = %refused.why, "not delivered before shutdown");
            return Outcome::Stopped;
        }
        tracing::warn!(stage, what, attempts, error = %refused.why, retry_in_ms = backoff.delay().as_millis() as u64, "POST failed; retrying");
        tokio::select! {
            _ = backoff.wait() => {}
            _ = shutdown.cancelled() => {}
        }
    }
}

/// HMAC-SHA256 of `TIMESTAMP.BODY` under `secret`, in hex: what a receiver
/// computes to check `X-Imflow-Signature`.
pub fn sign(secret: &[u8], timestamp: &str, body: &str) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Computed independently: Python's hmac.new(key, b"TS.BODY", sha256).
        assert_eq!(
            sign(
                b"a-webhook-secret-key",
                "1764230400000",
                r#"{"event":"message.sent"}"#
            ),
            "98d7e197cd19b0da293dd84ebe8af1d784b0fecd6fbcc7456661e0b552400982"
        );
    }
}
