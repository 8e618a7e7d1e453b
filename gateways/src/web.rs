//! The two pages the API serves to a browser: `/console` for operators (the
//! pipeline as a graph with live rates, the processes, a user and group
//! lookup) and `/app`, a chat client on PROTOCOL.md. Plain HTML, CSS and
//! JavaScript from `gateways/web/`, compiled into the binary, so there is
//! nothing to build or install besides imflow.
//!
//! The pages themselves are public and hold no data: the console asks for
//! the admin secret and sends it with each `/admin/…` call; the chat page
//! asks for a user token and speaks the same WebSocket and REST API as any
//! other client.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::future::BoxFuture;
use serde::Serialize;
use utoipa::ToSchema;

use crate::rest::RestState;

/// What the console shows of the whole deployment, as JSON: the pipeline
/// compiled from the file the process serves, and a reading of every
/// process's metrics. The binary makes it (it knows the config, etcd and
/// how to read `/metrics`); the API only serves it.
pub type Overview = Arc<dyn Fn() -> BoxFuture<'static, serde_json::Value> + Send + Sync>;

/// Where the chat page finds the WebSocket gateway.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AppSettings {
    /// The gateway's URL as configured (`web.ws_url`), e.g.
    /// `wss://im.example.com/ws`; null when not configured.
    pub ws_url: Option<String>,
    /// Without `ws_url`, the page connects to its own host at this port.
    pub ws_port: u16,
}

/// The pages and their assets (not API operations, so not in the OpenAPI
/// document).
pub(crate) fn routes() -> Router<RestState> {
    Router::new()
        .route("/console", get(|| async { asset("console.html") }))
        .route("/app", get(|| async { asset("app.html") }))
        .route("/app/settings", get(app_settings))
        .route(
            "/web/{file}",
            get(|axum::extract::Path(file): axum::extract::Path<String>| async move {
                asset(&file)
            }),
        )
}

/// The files of `gateways/web/`, by name, with their content type.
fn file(name: &str) -> Option<(&'static str, &'static str)> {
    Some(match name {
        "console.html" => (
            include_str!("../web/console.html"),
            "text/html; charset=utf-8",
        ),
        "app.html" => (include_str!("../web/app.html"), "text/html; charset=utf-8"),
        "style.css" => (include_str!("../web/style.css"), "text/css; charset=utf-8"),
        "common.js" => (
            include_str!("../web/common.js"),
            "text/javascript; charset=utf-8",
        ),
        "console.js" => (
            include_str!("../web/console.js"),
            "text/javascript; charset=utf-8",
        ),
        "app.js" => (
            include_str!("../web/app.js"),
            "text/javascript; charset=utf-8",
        ),
        "icon.svg" => (
            include_str!("../web/icon.svg"),
            "image/svg+xml; charset=utf-8",
        ),
        _ => return None,
    })
}

/// Scripts and styles only from this origin (no inline script, so an
/// injected message text can never run); sockets to any gateway, since
/// the WebSocket port differs from the page's.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: https:; connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

fn asset(name: &str) -> Response {
    let Some((body, mime)) = file(name) else {
        return (StatusCode::NOT_FOUND, "no such file").into_response();
    };
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    // A new binary may ship new pages: the browser checks each time.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

async fn app_settings(State(s): State<RestState>) -> Json<AppSettings> {
    Json((*s.app).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_names_only_files_that_are_served() {
        for page in ["console.html", "app.html"] {
            let (html, _) = file(page).expect("page");
            for part in html.split("/web/").skip(1) {
                let name: String = part
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
                    .collect();
                assert!(
                    file(&name).is_some(),
                    "{page} links /web/{name}, not served"
                );
            }
        }
    }

    #[test]
    fn an_unknown_file_is_not_found_and_pages_carry_the_policy() {
        assert_eq!(asset("../Cargo.toml").status(), StatusCode::NOT_FOUND);
        let r = asset("app.html");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_SECURITY_POLICY], CSP);
    }
}
