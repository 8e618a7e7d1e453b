//! Live reload as the doors see it: what a reload reports, and the handle
//! through which `POST /reload` (the API, admin secret) and the internal
//! port's `/reload` (cluster secret) ask the process to do one. The
//! binary does the work (it owns the running pipeline).

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What one process did with a reload.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ReloadReport {
    /// The process (`imflow` for a standalone server, else `ROLE#INDEX`).
    pub process: String,
    /// The pipeline file read.
    pub pipeline: String,
    /// The running pipeline is now the file's (false when refused, or when
    /// nothing this process runs had changed).
    pub reloaded: bool,
    /// Why the reload was refused, every problem at once; the running
    /// pipeline was not touched (empty when it was not refused).
    pub errors: Vec<String>,
    /// Stages started, stopped after draining, and rebuilt with their new
    /// options or edges.
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    /// Config settings that changed in the file but apply only after a
    /// restart of this process (listen addresses, stores, secrets, …).
    pub restart_needed: Vec<String>,
    /// How long sends waited at the door while the pipeline was swapped.
    pub paused_ms: u64,
    /// Every item queued in the old pipeline was finished before the new
    /// one started (false: the shutdown deadline cut the drain short, and
    /// the unfinished sends were answered `unavailable`).
    pub drained: bool,
}

impl ReloadReport {
    pub fn refused(&self) -> bool {
        !self.errors.is_empty()
    }
}

/// Asks the process for a reload and resolves with its report.
pub type Reloader = Arc<dyn Fn() -> BoxFuture<'static, ReloadReport> + Send + Sync>;

/// 200 with the report, or 422 with it when the reload was refused.
pub(crate) async fn answer(reloader: Option<&Reloader>) -> Response {
    let Some(reload) = reloader else {
        return (StatusCode::NOT_FOUND, "this process cannot reload").into_response();
    };
    let report = reload().await;
    let status = if report.refused() {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    (status, Json(report)).into_response()
}
