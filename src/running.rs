//! The life of a server after start-up, shared by the all-in-one server
//! (`Server`) and one cluster process (`ProcessServer`): serve until told
//! to stop or until a stage fails, then stop in order.

use std::sync::Arc;
use std::time::Duration;

use imflow_gateways::connections::Connections;
use imflow_gateways::http::HttpLimits;
use imflow_runtime::RunningTopology;

use crate::reload::{Pipeline, Requests};
use imflow_stages::Backends;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Not ready before the consumers consume: a message sent earlier would
/// wait in Kafka for the group to settle.
pub(crate) async fn wait_for_consumers(topology: &RunningTopology) {
    if tokio::time::timeout(Duration::from_secs(30), topology.ready())
        .await
        .is_err()
    {
        tracing::warn!("some kafka consumers have no partitions after 30 s; serving anyway (more consumers than partitions?)");
    }
}

/// Serve `app` on `listener` until `stop`, under the config's HTTP limits.
pub(crate) fn serve_http(
    listener: TcpListener,
    app: axum::Router,
    stop: CancellationToken,
    limits: &HttpLimits,
) -> JoinHandle<()> {
    imflow_gateways::http::serve(listener, app, stop, limits)
}

/// What a running server stops, in this order.
pub(crate) struct Parts {
    /// Ends once `stop` is cancelled: the etcd announcement, withdrawn
    /// first so that no door sends here any more.
    pub leave: Option<JoinHandle<()>>,
    /// Cancelled next: /healthz says draining.
    pub draining: CancellationToken,
    /// Then no new connections or requests.
    pub accept_stop: CancellationToken,
    /// Then the pipeline drains (ingest stops; what is queued is stored,
    /// acked and pushed) within the config's deadline. Until then it is
    /// reloaded on each request of `reloads`.
    pub pipeline: Pipeline,
    pub reloads: Requests,
    /// Then the connections close, the listeners end, the stores close.
    pub conns: Arc<Connections>,
    pub tracker: TaskTracker,
    pub servers: Vec<JoinHandle<()>>,
    pub backends: Backends,
}

/// A server past start-up.
pub(crate) struct Running {
    stop: CancellationToken,
    done: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Serve until `stop` is cancelled or a stage fails, then stop `parts`.
    pub(crate) fn start(stop: CancellationToken, mut p: Parts) -> Running {
        let signal = stop.clone();
        let done = tokio::spawn(async move {
            let failure = loop {
                tokio::select! {
                    _ = signal.cancelled() => break None,
                    (stage, why) = p.pipeline.failed() => break Some(format!("stage `{stage}` failed: {why}")),
                    Some(answer) = p.reloads.recv() => {
                        let report = p.pipeline.reload().await;
                        crate::reload::log(&report);
                        let _ = answer.send(report);
                    }
                }
            };
            if let Some(f) = &failure {
                tracing::error!(error = %f, "pipeline failed; shutting down");
            }
            signal.cancel();
            if let Some(leave) = p.leave {
                let _ = leave.await;
            }
            p.draining.cancel();
            p.accept_stop.cancel();
            let drained = p.pipeline.shutdown().await;
            p.conns.close_all();
            p.tracker.close();
            let _ = tokio::time::timeout(Duration::from_secs(2), p.tracker.wait()).await;
            for s in p.servers {
                let _ = tokio::time::timeout(Duration::from_secs(2), s).await;
            }
            p.backends.close().await;
            tracing::info!(drained, "imflow stopped");
            match failure {
                Some(f) => Err(anyhow::anyhow!(f)),
                None => Ok(()),
            }
        });
        Running { stop, done }
    }

    /// Wait until the server stops on its own (a pipeline failure).
    pub(crate) async fn wait(&mut self) -> anyhow::Result<()> {
        (&mut self.done).await?
    }

    /// Graceful shutdown.
    pub(crate) async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.done.await?
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.done.is_finished()
    }
}
