//! `imflow-bench receive-webhooks`: a webhook receiver for benchmarks. It
//! takes every POST, checks its signature as a real receiver would, counts
//! the messages, and measures each message's delay from its `send_time` to
//! its arrival here (send, store and the webhook's POST together). Progress
//! every second on stderr; a summary (JSON) on stdout when interrupted.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;

use crate::report::Latency;

#[derive(Default)]
struct Counts {
    posts: u64,
    messages: u64,
    forged: u64,
    /// µs from `send_time` to arrival, per message.
    delay: Option<hdrhistogram::Histogram<u64>>,
}

struct Receiver {
    secret: Option<Vec<u8>>,
    counts: Mutex<Counts>,
}

#[derive(Serialize)]
pub struct Summary {
    pub posts: u64,
    pub messages: u64,
    pub bad_signatures: u64,
    /// From the message's `send_time` to its arrival here.
    pub delay_ms: Option<Latency>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Whether `signature` is `sha256=HMAC(secret, timestamp.body)`.
fn signed(secret: &[u8], timestamp: &str, body: &[u8], signature: &str) -> bool {
    let Some(hex_sig) = signature.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(expected) = hex::decode(hex_sig) else {
        return false;
    };
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(secret) else {
        return false;
    };
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

async fn receive(State(r): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
    let arrived = now_ms();
    let genuine = r.secret.as_ref().is_none_or(|s| {
        signed(
            s,
            header("x-imflow-timestamp"),
            &body,
            header("x-imflow-signature"),
        )
    });
    let sent: Vec<i64> = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            v["messages"]
                .as_array()
                .map(|m| m.iter().filter_map(|m| m["send_time"].as_i64()).collect())
        })
        .unwrap_or_default();
    let Ok(mut c) = r.counts.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR;
    };
    c.posts += 1;
    if !genuine {
        c.forged += 1;
        return StatusCode::UNAUTHORIZED;
    }
    c.messages += sent.len() as u64;
    if let Some(h) = c.delay.as_mut() {
        for t in sent {
            // µs, as the other latencies (send_time has ms precision).
            let _ = h.record((arrived - t).max(0) as u64 * 1000);
        }
    }
    StatusCode::OK
}

/// Serve on `listen` until Ctrl-C; returns the summary.
pub async fn serve(listen: SocketAddr, secret: Option<String>) -> anyhow::Result<Summary> {
    let r = Arc::new(Receiver {
        secret: secret.map(String::into_bytes),
        counts: Mutex::new(Counts {
            delay: hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3).ok(),
            ..Default::default()
        }),
    });
    let app = axum::Router::new()
        .fallback(axum::routing::post(receive))
        .with_state(r.clone());
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("--listen {listen}: {e}"))?;
    eprintln!("receiving webhooks on http://{listen}/ (Ctrl-C to stop)");
    let progress = {
        let r = r.clone();
        tokio::spawn(async move {
            let mut last = 0;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let (messages, posts, forged) = match r.counts.lock() {
                    Ok(c) => (c.messages, c.posts, c.forged),
                    Err(_) => return,
                };
                if messages != last {
                    eprintln!(
                        "  {messages} messages ({}/s), {posts} POSTs, {forged} bad signatures",
                        messages - last
                    );
                    last = messages;
                }
            }
        })
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    progress.abort();
    let c = r
        .counts
        .lock()
        .map_err(|_| anyhow::anyhow!("counts poisoned"))?;
    Ok(Summary {
        posts: c.posts,
        messages: c.messages,
        bad_signatures: c.forged,
        delay_ms: c
            .delay
            .as_ref()
            .filter(|h| !h.is_empty())
            .map(Latency::of_us),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_signature_is_checked_against_timestamp_dot_body() {
        // The same vector as imflow's own signer (computed with Python).
        let sig = "sha256=98d7e197cd19b0da293dd84ebe8af1d784b0fecd6fbcc7456661e0b552400982";
        let body = br#"{"event":"message.sent"}"#;
        assert!(super::signed(
            b"a-webhook-secret-key",
            "1764230400000",
            body,
            sig
        ));
        assert!(!super::signed(
            b"another-key-entirely",
            "1764230400000",
            body,
            sig
        ));
        assert!(!super::signed(
            b"a-webhook-secret-key",
            "1764230400001",
            body,
            sig
        ));
    }
}
