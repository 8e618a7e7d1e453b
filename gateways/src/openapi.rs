//! The REST API's OpenAPI 3.1 document, served at `/openapi.json`. The
//! operations come from the handlers' `#[utoipa::path]` attributes (through
//! the router, see [`crate::rest::router`]); this file adds what every
//! operation shares: the two ways to authenticate and the error shape.

use axum::body::Bytes;
use serde::Serialize;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr, ResponseBuilder};
use utoipa::ToSchema;

use imflow_stages::model::ErrorCode;

/// Every failure's body (PROTOCOL.md: "Failure is the HTTP status that
/// fits, with body {"code", "message"}").
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "imflow REST API",
        description = "The REST door of imflow (PROTOCOL.md, version 2). \
            User calls carry `Authorization: Bearer TOKEN`; admin calls \
            `X-Admin-Secret`. Every failure is the status that fits with an \
            `ErrorBody`.",
    ),
    components(schemas(ErrorBody)),
    tags(
        (name = "auth", description = "Users and tokens (admin)"),
        (name = "messages", description = "Send, pull, revoke"),
        (name = "conversations", description = "The conversation list, read state, settings"),
        (name = "groups", description = "Groups and their administration"),
        (name = "users", description = "Profiles, blocks, devices, presence"),
        (name = "files", description = "Files: upload and download URLs (PROTOCOL v2)"),
        (name = "operations", description = "Health and metrics"),
    )
)]
pub struct ApiDoc;

/// The document as served: `doc` (the routes' operations) with the
/// security schemes and an error response on every operation.
pub fn finish(mut doc: OpenApi) -> Bytes {
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
    );
    components.add_security_scheme(
        "admin_secret",
        SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-Admin-Secret"))),
    );
    let error = ResponseBuilder::new()
        .description("The request failed: see `code`")
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build();
    for item in doc.paths.paths.values_mut() {
        for op in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
        ]
        .into_iter()
        .flatten()
        {
            op.responses
                .responses
                .entry("default".to_string())
                .or_insert_with(|| RefOr::T(error.clone()));
        }
    }
    // A derived document always serialises; an empty one would still serve.
    Bytes::from(doc.to_json().unwrap_or_default())
}
