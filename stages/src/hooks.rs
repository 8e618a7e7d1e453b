//! What the HTTP hook kinds (`webhook`, `before-send`) share: the
//! receiver's URL checked at validation, the HMAC key (written in the
//! pipeline or read from the environment), and signed POSTs.
//!
//! A POST carries `X-Imflow-Timestamp: MS` and `X-Imflow-Signature:
//! sha256=HEX`, the HMAC-SHA256 of `MS.BODY` under the key, so a receiver
//! checks who sent it and can refuse an old one (a replay).

use std::time::Duration;

use hmac::{Hmac, Mac};
use imflow_runtime::registry::OptionError;
use imflow_runtime::BuildError;
use sha2::Sha256;

use crate::model::now_ms;

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
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => {}
        Ok(u) => say("url", format!("scheme `{}`: use http or https", u.scheme())),
        Err(e) => say("url", format!("`{url}` is not a URL: {e}")),
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
        let response = self
            .http
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("X-Imflow-Timestamp", &timestamp)
            .header("X-Imflow-Signature", signature)
            .body(body)
            .send()
            .await
            .map_err(|e| Refused {
                why: if e.is_timeout() {
                    format!("no answer within {} ms", self.timeout.as_millis())
                } else {
                    format!("cannot reach {}: {e}", self.url)
                },
                for_good: false,
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
        })
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
