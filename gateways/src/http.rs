//! Serving HTTP (the REST API and every process's internal port) with the
//! limits a public server needs: a cap on connections, a deadline for a
//! request's head (a client that opens a connection and never finishes its
//! headers — slowloris — is cut off) and for its body, and a graceful stop
//! that lets requests in progress finish.

use std::sync::Arc;
use std::time::Duration;

use axum::response::IntoResponse;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Limits of one HTTP listener (`rest:` in the config).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpLimits {
    /// Open connections at most; beyond it new ones are closed at once.
    pub max_connections: usize,
    /// A request's head (request line and headers) must arrive within
    /// this long, and an idle kept-alive connection closes after it (s).
    pub header_timeout_secs: u64,
    /// A request (its body included) must be answered within this long (s).
    pub request_timeout_secs: u64,
    /// Requests per second per user (sustained), for user calls.
    pub rate_limit_per_sec: u32,
    /// Requests a user may make in a burst above the rate.
    pub rate_limit_burst: u32,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 10_000,
            header_timeout_secs: 10,
            request_timeout_secs: 30,
            rate_limit_per_sec: 50,
            rate_limit_burst: 100,
        }
    }
}

/// Serve `app` on `listener` under `limits` until `stop`; then stop taking
/// connections and give those open a few seconds to finish.
pub fn serve(
    listener: TcpListener,
    app: Router,
    stop: CancellationToken,
    limits: &HttpLimits,
) -> JoinHandle<()> {
    let timeout = Duration::from_secs(limits.request_timeout_secs.max(1));
    // A reload drains the pipeline before it answers and is bounded by the
    // shutdown deadline instead: a 408 there would tell `imflow reload` to
    // move on to the next process while this one is still swapping.
    let app = app.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| async move {
            if req.uri().path() == "/reload" {
                return next.run(req).await;
            }
            match tokio::time::timeout(timeout, next.run(req)).await {
                Ok(r) => r,
                Err(_) => axum::http::StatusCode::REQUEST_TIMEOUT.into_response(),
            }
        },
    ));
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let head_deadline = Duration::from_secs(limits.header_timeout_secs.max(1));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(head_deadline);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)));
    tokio::spawn(async move {
        let graceful = GracefulShutdown::new();
        let refused = metrics::counter!("imflow_http_connections_refused_total");
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => break,
                a = listener.accept() => a,
            };
            let (stream, _) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                refused.increment(1);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (builder, app, watcher) = (builder.clone(), app.clone(), graceful.watcher());
            tokio::spawn(async move {
                // hyper's head deadline starts with the first byte: a
                // connection that never sends one would hold its slot.
                let mut first = [0u8; 1];
                match tokio::time::timeout(head_deadline, stream.peek(&mut first)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return,
                }
                let conn = builder.serve_connection_with_upgrades(
                    TokioIo::new(stream),
                    TowerToHyperService::new(app),
                );
                let _ = watcher.watch(conn).await;
                drop(slot);
            });
        }
        drop(listener);
        let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
    })
}
