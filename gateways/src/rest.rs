//! The REST API (default port 10002), on axum.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use imflow_stages::model::{ErrorCode, ImError, SendRequest};

use crate::api::{http_status, Api, SyncOptions};
use crate::auth::{token_from, Identity};

/// What the REST router shares between requests.
#[derive(Clone)]
pub struct RestState {
    pub api: Arc<Api>,
    /// Renders `/metrics` (Prometheus text).
    pub metrics: Arc<dyn Fn() -> String + Send + Sync>,
    /// Cancelled while the server drains: `/healthz` then answers 503.
    pub draining: CancellationToken,
    /// Requests per user.
    pub per_user: Arc<UserRate>,
}

/// A rate limit per user of the REST API.
pub type UserRate = governor::DefaultKeyedRateLimiter<Arc<str>>;

/// The per-user limiter for `limits`.
pub fn user_rate(limits: &crate::http::HttpLimits) -> Arc<UserRate> {
    use std::num::NonZeroU32;
    let per_sec = NonZeroU32::new(limits.rate_limit_per_sec.max(1)).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(limits.rate_limit_burst.max(1)).unwrap_or(NonZeroU32::MIN);
    let limiter = Arc::new(governor::RateLimiter::keyed(
        governor::Quota::per_second(per_sec).allow_burst(burst),
    ));
    // Forget users who have not called for a while, so the table stays the
    // size of the active users.
    let weak = Arc::downgrade(&limiter);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            tick.tick().await;
            let Some(l) = weak.upgrade() else { return };
            l.retain_recent();
            l.shrink_to_fit();
        }
    });
    limiter
}

/// An error response: the status that fits and `{"code", "message"}`.
pub struct ApiError(pub ImError);

impl From<ImError> for ApiError {
    fn from(e: ImError) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(http_status(self.0.code)).unwrap_or(StatusCode::BAD_REQUEST);
        (
            status,
            Json(json!({"code": self.0.code.as_str(), "message": self.0.message})),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// A user call: the bearer token's identity.
pub struct Caller(pub Identity);

impl FromRequestParts<RestState> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut Parts,
        state: &RestState,
    ) -> Result<Self, Self::Rejection> {
        let auth = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let token = token_from(auth, None)
            .ok_or_else(|| ImError::new(ErrorCode::Unauthorized, "missing bearer token"))?;
        let who = state.api.auth.verify(&token).await?;
        if state.per_user.check_key(&who.user_id).is_err() {
            return Err(
                ImError::new(ErrorCode::RateLimited, "too many requests; slow down").into(),
            );
        }
        Ok(Caller(who))
    }
}

/// An admin call: the right `X-Admin-Secret`.
pub struct Admin;

impl FromRequestParts<RestState> for Admin {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut Parts,
        state: &RestState,
    ) -> Result<Self, Self::Rejection> {
        let secret = parts
            .headers
            .get("x-admin-secret")
            .and_then(|v| v.to_str().ok());
        if state.api.auth.is_admin(secret) {
            Ok(Admin)
        } else {
            Err(ImError::new(ErrorCode::Unauthorized, "missing or wrong X-Admin-Secret").into())
        }
    }
}

/// Parse a JSON body ourselves so malformed input gets the protocol's
/// `bad_request` shape rather than the framework's plain text.
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ImError::bad_request(format!("request body: {e}")).into())
}

pub fn router(state: RestState) -> Router {
    Router::new()
        .route("/auth/register", post(register))
        .route("/auth/token", post(token))
        .route("/auth/logout", post(logout))
        .route("/groups", post(create_group))
        .route("/groups/{group_id}/members", post(add_members).get(members))
        .route(
            "/groups/{group_id}/members/{user_id}",
            delete(remove_member),
        )
        .route("/groups/{group_id}/members/{user_id}/role", put(set_role))
        .route(
            "/groups/{group_id}",
            get(group_info).put(update_group).delete(dismiss_group),
        )
        .route("/groups/{group_id}/mute", post(mute_group))
        .route(
            "/groups/{group_id}/members/{user_id}/mute",
            post(mute_member),
        )
        .route("/groups/{group_id}/transfer", post(transfer_group))
        .route("/users/me", get(my_profile).put(update_me))
        .route("/users/me/groups", get(my_groups))
        .route("/users/me/blocks", get(blocks))
        .route("/users/me/blocks/{user_id}", put(block).delete(unblock))
        .route("/users/me/devices/{platform}", put(set_device))
        .route("/users/{user_id}", get(user_profile))
        .route("/users/{user_id}/presence", get(presence))
        .route("/msg/send", post(send))
        .route("/conversations", get(conversations))
        .route("/conversations/{conversation_id}/messages", get(messages))
        .route(
            "/conversations/{conversation_id}/messages/{seq}/revoke",
            post(revoke),
        )
        .route("/conversations/{conversation_id}/read", post(read))
        .route(
            "/conversations/{conversation_id}/settings",
            put(conversation_settings),
        )
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError(ImError::not_found("no such endpoint")) })
        .layer(axum::extract::DefaultBodyLimit::max(1024 * 1024))
        .with_state(state)
}

#[derive(Deserialize)]
struct RegisterUser {
    user_id: String,
    #[serde(default)]
    nickname: Option<String>,
}

#[derive(Deserialize)]
struct RegisterBody {
    users: Vec<RegisterUser>,
}

async fn register(_: Admin, State(s): State<RestState>, bytes: Bytes) -> ApiResult<Json<Value>> {
    let b: RegisterBody = body(&bytes)?;
    let n = s
        .api
        .register(
            b.users
                .into_iter()
                .map(|u| (u.user_id, u.nickname))
                .collect(),
        )
        .await?;
    Ok(Json(json!({"registered": n})))
}

#[derive(Deserialize)]
struct TokenBody {
    user_id: String,
    platform: i64,
}

async fn token(_: Admin, State(s): State<RestState>, bytes: Bytes) -> ApiResult<Json<Value>> {
    let b: TokenBody = body(&bytes)?;
    let (token, expires_at) = s.api.token(&b.user_id, b.platform).await?;
    Ok(Json(json!({"token": token, "expires_at": expires_at})))
}

#[derive(Deserialize)]
struct LogoutBody {
    user_id: String,
    #[serde(default)]
    platform: Option<i64>,
}

async fn logout(_: Admin, State(s): State<RestState>, bytes: Bytes) -> ApiResult<Json<Value>> {
    let b: LogoutBody = body(&bytes)?;
    s.api.logout(&b.user_id, b.platform).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct CreateGroupBody {
    #[serde(default)]
    group_id: Option<String>,
    name: String,
    #[serde(default)]
    members: Vec<String>,
}

async fn create_group(
    Caller(me): Caller,
    State(s): State<RestState>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let b: CreateGroupBody = body(&bytes)?;
    let id = s
        .api
        .create_group(&me.user_id, b.group_id, b.name, b.members)
        .await?;
    Ok((StatusCode::CREATED, Json(json!({"group_id": id}))).into_response())
}

#[derive(Deserialize)]
struct AddMembersBody {
    user_ids: Vec<String>,
}

async fn add_members(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path(group_id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<Value>> {
    let b: AddMembersBody = body(&bytes)?;
    let added = s
        .api
        .add_members(&me.user_id, &group_id, b.user_ids)
        .await?;
    Ok(Json(json!({"added": added})))
}

async fn remove_member(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path((group_id, user_id)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    s.api
        .remove_member(&me.user_id, &group_id, &user_id)
        .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct RoleBody {
    role: String,
}

async fn set_role(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path((group_id, user_id)): Path<(String, String)>,
    bytes: Bytes,
) -> ApiResult<Json<Value>> {
    let b: RoleBody = body(&bytes)?;
    s.api
        .set_role(&me.user_id, &group_id, &user_id, &b.role)
        .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct Page {
    offset: Option<String>,
    limit: Option<String>,
}

fn number<T: std::str::FromStr>(name: &str, v: Option<&str>, default: T) -> Result<T, ApiError> {
    match v {
        None | Some("") => Ok(default),
        Some(s) => s.parse().map_err(|_| {
            ImError::bad_request(format!("{name} must be a non-negative integer")).into()
        }),
    }
}

async fn members(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path(group_id): Path<String>,
    Query(p): Query<Page>,
) -> ApiResult<Json<Value>> {
    let offset = number("offset", p.offset.as_deref(), 0usize)?;
    let limit = number("limit", p.limit.as_deref(), 100usize)?;
    let (page, total) = s.api.members(&me.user_id, &group_id, offset, limit).await?;
    let list: Vec<Value> = page
        .into_iter()
        .map(|(u, r)| json!({"user_id": &*u, "role": r.as_str()}))
        .collect();
    Ok(Json(json!({"members": list, "total": total})))
}

async fn send(
    Caller(me): Caller,
    State(s): State<RestState>,
    bytes: Bytes,
) -> ApiResult<Json<Value>> {
    let req: SendRequest = body(&bytes)?;
    let info = s.api.send(&me.user_id, req).await?.wait().await?;
    Ok(Json(json!({
        "server_msg_id": info.server_msg_id,
        "conversation_id": info.conversation_id,
        "send_time": info.send_time,
    })))
}

#[derive(Deserialize)]
struct SyncQuery {
    since: Option<String>,
    limit: Option<String>,
}

async fn conversations(
    Caller(me): Caller,
    State(s): State<RestState>,
    Query(q): Query<SyncQuery>,
) -> ApiResult<Json<Value>> {
    let since = match q.since.as_deref() {
        None | Some("") => None,
        Some(v) => Some(
            v.parse::<i64>()
                .map_err(|_| ImError::bad_request("since must be a time in ms"))?,
        ),
    };
    let limit = match q.limit.as_deref() {
        None | Some("") => None,
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| ImError::bad_request("limit must be 1 to 1000"))?,
        ),
    };
    let r = s
        .api
        .sync(&me.user_id, SyncOptions { since, limit })
        .await?;
    Ok(Json(
        json!({"conversations": r.conversations, "more": r.more}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsBody {
    #[serde(default)]
    pinned: Option<bool>,
    #[serde(default)]
    muted: Option<bool>,
}

async fn conversation_settings(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path(conversation_id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<Value>> {
    let b: SettingsBody = body(&bytes)?;
    s.api
        .conversation_settings(&me.user_id, &conversation_id, b.pinned, b.muted)
        .await?;
    Ok(Json(json!({})))
}

async fn revoke(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path((conversation_id, seq)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let seq = number("seq", Some(&seq), 0u64)?;
    s.api.revoke(&me.user_id, &conversation_id, seq).await?;
    Ok(Json(json!({})))
}

async fn group_info(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path(group_id): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(s.api.group_info(&me.user_id, &group_id).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupEdit {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    notice: Option<String>,
    #[serde(default)]
    avatar_url: Option<String>,
}

async fn update_group(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path(group_id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<Value>> {
    let b: GroupEdit = body(&bytes)?;
    let changes = imflow_stages::store::GroupChanges {
        name: b.name,
        notice: b.notice,
        avatar_url: b.avatar_url,
    };
    s.api.update_group(&me.user_id, &group_id, changes).await?;
    Ok(Json(json!({})))
}

async fn dismiss_group(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path(group_id): Path<String>,
) -> ApiResult<Json<Value>> {
    s.api.dismiss_group(&me.user_id, &group_id).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct MuteBody {
    muted: bool,
}

async fn mute_group(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path(group_id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<Value>> {
    let b: MuteBody = body(&bytes)?;
    s.api.mute_group(&me.user_id, &group_id, b.muted).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct MuteMemberBody {
    seconds: u64,
}

async fn mute_member(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path((group_id, user_id)): Path<(String, String)>,
    bytes: Bytes,
) -> ApiResult<Json<Value>> {
    let b: MuteMemberBody = body(&bytes)?;
    s.api
        .mute_member(&me.user_id, &group_id, &user_id, b.seconds)
        .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct TransferBody {
    user_id: String,
}

async fn transfer_group(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path(group_id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<Value>> {
    let b: TransferBody = body(&bytes)?;
    s.api
        .transfer_group(&me.user_id, &group_id, &b.user_id)
        .await?;
    Ok(Json(json!({})))
}

async fn my_groups(Caller(me): Caller, State(s): State<RestState>) -> ApiResult<Json<Value>> {
    Ok(Json(json!({"groups": s.api.my_groups(&me.user_id).await?})))
}

async fn user_profile(
    Caller(_): Caller,
    State(s): State<RestState>,
    Path(user_id): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(json!(s.api.profile(&user_id).await?)))
}

async fn my_profile(Caller(me): Caller, State(s): State<RestState>) -> ApiResult<Json<Value>> {
    Ok(Json(json!(s.api.profile(&me.user_id).await?)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileEdit {
    #[serde(default)]
    nickname: Option<String>,
    #[serde(default)]
    avatar_url: Option<String>,
}

async fn update_me(
    Caller(me): Caller,
    State(s): State<RestState>,
    bytes: Bytes,
) -> ApiResult<Json<Value>> {
    let b: ProfileEdit = body(&bytes)?;
    s.api
        .update_profile(&me.user_id, b.nickname, b.avatar_url)
        .await?;
    Ok(Json(json!({})))
}

async fn blocks(Caller(me): Caller, State(s): State<RestState>) -> ApiResult<Json<Value>> {
    Ok(Json(json!({"user_ids": s.api.blocks(&me.user_id).await?})))
}

async fn block(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path(user_id): Path<String>,
) -> ApiResult<Json<Value>> {
    s.api.block(&me.user_id, &user_id, true).await?;
    Ok(Json(json!({})))
}

async fn unblock(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path(user_id): Path<String>,
) -> ApiResult<Json<Value>> {
    s.api.block(&me.user_id, &user_id, false).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct DeviceBody {
    push_token: String,
    provider: String,
}

async fn set_device(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path(platform): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<Value>> {
    let platform = number("platform", Some(&platform), 0i64)?;
    let b: DeviceBody = body(&bytes)?;
    s.api
        .set_device(&me.user_id, platform, b.push_token, b.provider)
        .await?;
    Ok(Json(json!({})))
}

async fn presence(
    Caller(_): Caller,
    State(s): State<RestState>,
    Path(user_id): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(json!(s.api.user_presence(&user_id).await?)))
}

#[derive(Deserialize)]
struct Range {
    from_seq: Option<String>,
    to_seq: Option<String>,
}

async fn messages(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path(conversation_id): Path<String>,
    Query(r): Query<Range>,
) -> ApiResult<Response> {
    let (Some(from), Some(to)) = (r.from_seq.as_deref(), r.to_seq.as_deref()) else {
        return Err(ImError::bad_request("from_seq and to_seq are required").into());
    };
    let from = number("from_seq", Some(from), 0u64)?;
    let to = number("to_seq", Some(to), 0u64)?;
    let bodies = s.api.pull(&me.user_id, &conversation_id, from, to).await?;
    let mut out = String::from("{\"conversation_id\":");
    imflow_stages::model::push_json_str(&mut out, &conversation_id);
    imflow_stages::model::close_with_messages(&mut out, &bodies);
    let mut headers = HeaderMap::new();
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    Ok((headers, out).into_response())
}

#[derive(Deserialize)]
struct ReadBody {
    seq: u64,
}

async fn read(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path(conversation_id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<Value>> {
    let b: ReadBody = body(&bytes)?;
    s.api
        .read(&me.user_id, &conversation_id, b.seq, None)
        .await?;
    Ok(Json(json!({})))
}

async fn healthz(State(s): State<RestState>) -> Response {
    if s.draining.is_cancelled() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
            .into_response()
    } else {
        Json(json!({"status": "ok", "connections": s.api.conns.open_count()})).into_response()
    }
}

async fn metrics(State(s): State<RestState>) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    (headers, (s.metrics)()).into_response()
}
