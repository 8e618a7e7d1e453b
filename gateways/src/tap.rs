//! `GET /tap?conversation=ID`: the messages of one conversation as they
//! reach and leave each stage of this process (`imflow_runtime::tap`), one
//! JSON line each, for as long as the caller reads. Served on the API
//! (admin secret) and on a cluster process's internal port (cluster
//! secret); `imflow tap` reads every process's and merges them.

use std::convert::Infallible;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

/// The query of `/tap`.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TapQuery {
    /// The conversation to follow.
    pub conversation: String,
}

/// The stream of `conversation`'s sightings in this process.
pub fn follow(conversation: String) -> Response {
    let key = imflow_stages::model::partition_key(&conversation);
    let tap = imflow_runtime::tap::tap(key);
    let lines =
        futures::stream::unfold((tap, conversation), |(mut tap, conversation)| async move {
            loop {
                let ev = tap.events.recv().await?;
                // Another conversation of the same key (a hash collision).
                if !of(&ev.item, &conversation) {
                    continue;
                }
                let mut line = serde_json::to_string(&ev).unwrap_or_default();
                line.push('\n');
                return Some((Ok::<_, Infallible>(line), (tap, conversation)));
            }
        });
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response()
}

/// Whether an edge item (stamped, sequenced or delivery) is of `conversation`.
fn of(item: &Value, conversation: &str) -> bool {
    item["conversation_id"] == conversation || item["msg"]["conversation_id"] == conversation
}
