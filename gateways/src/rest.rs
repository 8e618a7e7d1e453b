//! The REST API (default port 10002), on axum.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use imflow_stages::model::{ErrorCode, ImError, Message, SendRequest};
use imflow_stages::store::{ConversationState, Profile};

use crate::api::{http_status, Api, GroupInfo, MyGroup, PresenceState, SyncOptions};
use crate::auth::{token_from, Identity};
use crate::openapi::{ApiDoc, ErrorBody};

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
    /// How `POST /reload` reaches the process's pipeline.
    pub reload: Option<crate::reload::Reloader>,
    /// What `/admin/overview` (the console) reads.
    pub overview: Option<crate::web::Overview>,
    /// Where the chat page (`/app`) finds the gateway.
    pub app: Arc<crate::web::AppSettings>,
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
        let body = ErrorBody {
            code: self.0.code,
            message: self.0.message,
        };
        (status, Json(body)).into_response()
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError(ImError::bad_request(r.body_text()))
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError(ImError::bad_request(r.body_text()))
    }
}

/// axum's `Query`, failing with the protocol's error body (axum's own
/// answers plain text).
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
struct Query<T>(T);

/// axum's `Path`, failing with the protocol's error body.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
struct Path<T>(T);

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

/// The REST router, and the OpenAPI document of every route in it (both
/// from the same list, so the document cannot miss a route).
pub fn router(state: RestState) -> Router {
    use utoipa::OpenApi;
    let (router, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(register))
        .routes(routes!(token))
        .routes(routes!(logout))
        .routes(routes!(create_group))
        .routes(routes!(add_members, members))
        .routes(routes!(remove_member))
        .routes(routes!(set_role))
        .routes(routes!(group_info, update_group, dismiss_group))
        .routes(routes!(mute_group))
        .routes(routes!(mute_member))
        .routes(routes!(transfer_group))
        .routes(routes!(my_profile, update_me))
        .routes(routes!(my_groups))
        .routes(routes!(blocks))
        .routes(routes!(block, unblock))
        .routes(routes!(set_device))
        .routes(routes!(user_profile))
        .routes(routes!(presence))
        .routes(routes!(send))
        .routes(routes!(conversations))
        .routes(routes!(messages))
        .routes(routes!(revoke))
        .routes(routes!(read))
        .routes(routes!(conversation_settings))
        .routes(routes!(create_file))
        .routes(routes!(file_location))
        .routes(routes!(upload_content, download_content))
        .routes(routes!(healthz))
        .routes(routes!(metrics))
        .routes(routes!(tap))
        .routes(routes!(reload))
        .routes(routes!(overview))
        .routes(routes!(user_lookup))
        .routes(routes!(group_lookup))
        .split_for_parts();
    let doc = crate::openapi::finish(doc);
    router
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        doc,
                    )
                }
            }),
        )
        .merge(crate::web::routes())
        .fallback(|| async { ApiError(ImError::not_found("no such endpoint")) })
        .layer(axum::extract::DefaultBodyLimit::max(1024 * 1024))
        .with_state(state)
}

/// `{}`: done, nothing to tell.
#[derive(Serialize, ToSchema)]
pub struct Done {}

const DONE: Json<Done> = Json(Done {});

#[derive(Deserialize, ToSchema)]
struct RegisterUser {
    /// 1 to 64 of `A-Z a-z 0-9 . - @`.
    #[schema(pattern = "^[A-Za-z0-9.@-]{1,64}$")]
    user_id: String,
    #[serde(default)]
    nickname: Option<String>,
}

#[derive(Deserialize, ToSchema)]
struct RegisterBody {
    /// At most 1000.
    users: Vec<RegisterUser>,
}

#[derive(Serialize, ToSchema)]
struct Registered {
    registered: usize,
}

/// Register users; an existing user changes nothing but its nickname.
#[utoipa::path(post, path = "/auth/register", tag = "auth",
    request_body = RegisterBody,
    responses((status = 200, body = Registered)),
    security(("admin_secret" = [])))]
async fn register(
    _: Admin,
    State(s): State<RestState>,
    bytes: Bytes,
) -> ApiResult<Json<Registered>> {
    let b: RegisterBody = body(&bytes)?;
    let registered = s
        .api
        .register(
            b.users
                .into_iter()
                .map(|u| (u.user_id, u.nickname))
                .collect(),
        )
        .await?;
    Ok(Json(Registered { registered }))
}

#[derive(Deserialize, ToSchema)]
struct TokenBody {
    #[schema(pattern = "^[A-Za-z0-9.@-]{1,64}$")]
    user_id: String,
    /// 1 to 9.
    #[schema(minimum = 1, maximum = 9)]
    platform: i64,
}

#[derive(Serialize, ToSchema)]
struct TokenReply {
    token: String,
    /// ms since the Unix epoch.
    expires_at: i64,
}

/// A token for a user on a platform.
#[utoipa::path(post, path = "/auth/token", tag = "auth",
    request_body = TokenBody,
    responses((status = 200, body = TokenReply)),
    security(("admin_secret" = [])))]
async fn token(_: Admin, State(s): State<RestState>, bytes: Bytes) -> ApiResult<Json<TokenReply>> {
    let b: TokenBody = body(&bytes)?;
    let (token, expires_at) = s.api.token(&b.user_id, b.platform).await?;
    Ok(Json(TokenReply { token, expires_at }))
}

#[derive(Deserialize, ToSchema)]
struct LogoutBody {
    #[schema(pattern = "^[A-Za-z0-9.@-]{1,64}$")]
    user_id: String,
    /// Every platform when absent.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 9)]
    platform: Option<i64>,
}

/// Revoke a user's tokens and close those connections.
#[utoipa::path(post, path = "/auth/logout", tag = "auth",
    request_body = LogoutBody,
    responses((status = 200, body = Done)),
    security(("admin_secret" = [])))]
async fn logout(_: Admin, State(s): State<RestState>, bytes: Bytes) -> ApiResult<Json<Done>> {
    let b: LogoutBody = body(&bytes)?;
    s.api.logout(&b.user_id, b.platform).await?;
    Ok(DONE)
}

#[derive(Deserialize, ToSchema)]
struct CreateGroupBody {
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z0-9.@-]{1,64}$")]
    group_id: Option<String>,
    name: String,
    #[serde(default)]
    members: Vec<String>,
}

#[derive(Serialize, ToSchema)]
struct Created {
    group_id: String,
}

/// Create a group; the caller owns it.
#[utoipa::path(post, path = "/groups", tag = "groups",
    request_body = CreateGroupBody,
    responses((status = 201, body = Created)),
    security(("bearer" = [])))]
async fn create_group(
    Caller(me): Caller,
    State(s): State<RestState>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let b: CreateGroupBody = body(&bytes)?;
    let group_id = s
        .api
        .create_group(&me.user_id, b.group_id, b.name, b.members)
        .await?;
    Ok((StatusCode::CREATED, Json(Created { group_id })).into_response())
}

#[derive(Deserialize, ToSchema)]
struct AddMembersBody {
    user_ids: Vec<String>,
}

#[derive(Serialize, ToSchema)]
struct Added {
    added: u64,
}

/// Add members (owner or admin).
#[utoipa::path(post, path = "/groups/{group_id}/members", tag = "groups",
    params(("group_id" = String, Path, pattern = "^[A-Za-z0-9.@-]{1,64}$", example = "team")),
    request_body = AddMembersBody,
    responses((status = 200, body = Added)),
    security(("bearer" = [])))]
async fn add_members(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path(group_id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<Added>> {
    let b: AddMembersBody = body(&bytes)?;
    let added = s
        .api
        .add_members(&me.user_id, &group_id, b.user_ids)
        .await?;
    Ok(Json(Added { added }))
}

/// Remove a member (owner, admin, or the member leaving).
#[utoipa::path(delete, path = "/groups/{group_id}/members/{user_id}", tag = "groups",
    params(("group_id" = String, Path, pattern = "^[A-Za-z0-9.@-]{1,64}$", example = "team"), ("user_id" = String, Path, pattern = "^[A-Za-z0-9.@-]{1,64}$", example = "bob")),
    responses((status = 200, body = Done)),
    security(("bearer" = [])))]
async fn remove_member(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path((group_id, user_id)): Path<(String, String)>,
) -> ApiResult<Json<Done>> {
    s.api
        .remove_member(&me.user_id, &group_id, &user_id)
        .await?;
    Ok(DONE)
}

#[derive(Deserialize, ToSchema)]
struct RoleBody {
    /// `admin` or `member`.
    #[schema(pattern = "^(admin|member)$")]
    role: String,
}

/// Make a member an admin or a member again (owner).
#[utoipa::path(put, path = "/groups/{group_id}/members/{user_id}/role", tag = "groups",
    params(("group_id" = String, Path, pattern = "^[A-Za-z0-9.@-]{1,64}$", example = "team"), ("user_id" = String, Path, pattern = "^[A-Za-z0-9.@-]{1,64}$", example = "bob")),
    request_body = RoleBody,
    responses((status = 200, body = Done)),
    security(("bearer" = [])))]
async fn set_role(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path((group_id, user_id)): Path<(String, String)>,
    bytes: Bytes,
) -> ApiResult<Json<Done>> {
    let b: RoleBody = body(&bytes)?;
    s.api
        .set_role(&me.user_id, &group_id, &user_id, &b.role)
        .await?;
    Ok(DONE)
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

#[derive(Serialize, ToSchema)]
struct MemberEntry {
    user_id: String,
    /// `owner`, `admin` or `member`.
    role: &'static str,
}

fn entries(page: Vec<(Arc<str>, imflow_stages::store::Role)>) -> Vec<MemberEntry> {
    page.into_iter()
        .map(|(u, r)| MemberEntry {
            user_id: u.to_string(),
            role: r.as_str(),
        })
        .collect()
}

#[derive(Serialize, ToSchema)]
struct MembersPage {
    members: Vec<MemberEntry>,
    total: usize,
}

/// A page of the members (members only).
#[utoipa::path(get, path = "/groups/{group_id}/members", tag = "groups",
    params(("group_id" = String, Path, pattern = "^[A-Za-z0-9.@-]{1,64}$", example = "team"),
        ("offset" = Option<u64>, Query), ("limit" = Option<u64>, Query, description = "1 to 1000; 100 when absent")),
    responses((status = 200, body = MembersPage)),
    security(("bearer" = [])))]
async fn members(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path(group_id): Path<String>,
    Query(p): Query<Page>,
) -> ApiResult<Json<MembersPage>> {
    let offset = number("offset", p.offset.as_deref(), 0usize)?;
    let limit = number("limit", p.limit.as_deref(), 100usize)?;
    let (page, total) = s.api.members(&me.user_id, &group_id, offset, limit).await?;
    let members = entries(page);
    Ok(Json(MembersPage { members, total }))
}

#[derive(Serialize, ToSchema)]
struct SendAck {
    server_msg_id: String,
    conversation_id: String,
    send_time: i64,
}

/// Send a message (the WebSocket `send`); the answer is its ack.
#[utoipa::path(post, path = "/msg/send", tag = "messages",
    request_body = SendRequest,
    responses((status = 200, body = SendAck)),
    security(("bearer" = [])))]
async fn send(
    Caller(me): Caller,
    State(s): State<RestState>,
    bytes: Bytes,
) -> ApiResult<Json<SendAck>> {
    let req: SendRequest = body(&bytes)?;
    let info = s.api.send(&me.user_id, req).await?.wait().await?;
    Ok(Json(SendAck {
        server_msg_id: info.server_msg_id.to_string(),
        conversation_id: info.conversation_id.to_string(),
        send_time: info.send_time,
    }))
}

#[derive(Deserialize)]
struct SyncQuery {
    since: Option<String>,
    limit: Option<String>,
}

#[derive(Serialize, ToSchema)]
struct SyncReplyBody {
    conversations: Vec<ConversationState>,
    /// More conversations than `limit` changed since `since`.
    more: bool,
}

/// The caller's conversations (the WebSocket `sync`).
#[utoipa::path(get, path = "/conversations", tag = "conversations",
    params(("since" = Option<i64>, Query, description = "only those changed after this time (ms)"),
        ("limit" = Option<u64>, Query, description = "1 to 1000; 100 when absent")),
    responses((status = 200, body = SyncReplyBody)),
    security(("bearer" = [])))]
async fn conversations(
    Caller(me): Caller,
    State(s): State<RestState>,
    Query(q): Query<SyncQuery>,
) -> ApiResult<Json<SyncReplyBody>> {
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
    Ok(Json(SyncReplyBody {
        conversations: r.conversations,
        more: r.more,
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SettingsBody {
    #[serde(default)]
    pinned: Option<bool>,
    #[serde(default)]
    muted: Option<bool>,
}

/// The caller's settings of a conversation.
#[utoipa::path(put, path = "/conversations/{conversation_id}/settings", tag = "conversations",
    params(("conversation_id" = String, Path, example = "si_alice_bob")),
    request_body = SettingsBody,
    responses((status = 200, body = Done)),
    security(("bearer" = [])))]
async fn conversation_settings(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path(conversation_id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<Done>> {
    let b: SettingsBody = body(&bytes)?;
    s.api
        .conversation_settings(&me.user_id, &conversation_id, b.pinned, b.muted)
        .await?;
    Ok(DONE)
}

/// Revoke a message (its sender, or a group's owner or admin, within the
/// window).
#[utoipa::path(post, path = "/conversations/{conversation_id}/messages/{seq}/revoke", tag = "messages",
    params(("conversation_id" = String, Path, example = "si_alice_bob"), ("seq" = u64, Path, minimum = 0, example = 1)),
    responses((status = 200, body = Done)),
    security(("bearer" = [])))]
async fn revoke(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path((conversation_id, seq)): Path<(String, String)>,
) -> ApiResult<Json<Done>> {
    let seq = number("seq", Some(&seq), 0u64)?;
    s.api.revoke(&me.user_id, &conversation_id, seq).await?;
    Ok(DONE)
}

/// A group's profile (members only).
#[utoipa::path(get, path = "/groups/{group_id}", tag = "groups",
    params(("group_id" = String, Path, pattern = "^[A-Za-z0-9.@-]{1,64}$", example = "team")),
    responses((status = 200, body = GroupInfo)),
    security(("bearer" = [])))]
async fn group_info(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path(group_id): Path<String>,
) -> ApiResult<Json<GroupInfo>> {
    Ok(Json(s.api.group_info(&me.user_id, &group_id).await?))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct GroupEdit {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    notice: Option<String>,
    #[serde(default)]
    avatar_url: Option<String>,
}

/// Edit a group's profile (owner or admin).
#[utoipa::path(put, path = "/groups/{group_id}", tag = "groups",
    params(("group_id" = String, Path, pattern = "^[A-Za-z0-9.@-]{1,64}$", example = "team")),
    request_body = GroupEdit,
    responses((status = 200, body = Done)),
    security(("bearer" = [])))]
async fn update_group(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path(group_id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<Done>> {
    let b: GroupEdit = body(&bytes)?;
    let changes = imflow_stages::store::GroupChanges {
        name: b.name,
        notice: b.notice,
        avatar_url: b.avatar_url,
    };
    s.api.update_group(&me.user_id, &group_id, changes).await?;
    Ok(DONE)
}

/// Dismiss a group (owner).
#[utoipa::path(delete, path = "/groups/{group_id}", tag = "groups",
    params(("group_id" = String, Path, pattern = "^[A-Za-z0-9.@-]{1,64}$", example = "team")),
    responses((status = 200, body = Done)),
    security(("bearer" = [])))]
async fn dismiss_group(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path(group_id): Path<String>,
) -> ApiResult<Json<Done>> {
    s.api.dismiss_group(&me.user_id, &group_id).await?;
    Ok(DONE)
}

#[derive(Deserialize, ToSchema)]
struct MuteBody {
    muted: bool,
}

/// Mute or unmute the whole group (owner or admin).
#[utoipa::path(post, path = "/groups/{group_id}/mute", tag = "groups",
    params(("group_id" = String, Path, pattern = "^[A-Za-z0-9.@-]{1,64}$", example = "team")),
    request_body = MuteBody,
    responses((status = 200, body = Done)),
    security(("bearer" = [])))]
async fn mute_group(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path(group_id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<Done>> {
    let b: MuteBody = body(&bytes)?;
    s.api.mute_group(&me.user_id, &group_id, b.muted).await?;
    Ok(DONE)
}

#[derive(Deserialize, ToSchema)]
struct MuteMemberBody {
    /// 0 lifts the mute.
    seconds: u64,
}

/// Mute one member for a while (owner or admin).
#[utoipa::path(post, path = "/groups/{group_id}/members/{user_id}/mute", tag = "groups",
    params(("group_id" = String, Path, pattern = "^[A-Za-z0-9.@-]{1,64}$", example = "team"), ("user_id" = String, Path, pattern = "^[A-Za-z0-9.@-]{1,64}$", example = "bob")),
    request_body = MuteMemberBody,
    responses((status = 200, body = Done)),
    security(("bearer" = [])))]
async fn mute_member(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path((group_id, user_id)): Path<(String, String)>,
    bytes: Bytes,
) -> ApiResult<Json<Done>> {
    let b: MuteMemberBody = body(&bytes)?;
    s.api
        .mute_member(&me.user_id, &group_id, &user_id, b.seconds)
        .await?;
    Ok(DONE)
}

#[derive(Deserialize, ToSchema)]
struct TransferBody {
    #[schema(pattern = "^[A-Za-z0-9.@-]{1,64}$")]
    user_id: String,
}

/// Hand the group to another member (owner).
#[utoipa::path(post, path = "/groups/{group_id}/transfer", tag = "groups",
    params(("group_id" = String, Path, pattern = "^[A-Za-z0-9.@-]{1,64}$", example = "team")),
    request_body = TransferBody,
    responses((status = 200, body = Done)),
    security(("bearer" = [])))]
async fn transfer_group(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path(group_id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<Done>> {
    let b: TransferBody = body(&bytes)?;
    s.api
        .transfer_group(&me.user_id, &group_id, &b.user_id)
        .await?;
    Ok(DONE)
}

#[derive(Serialize, ToSchema)]
struct MyGroups {
    groups: Vec<MyGroup>,
}

/// The groups the caller is in.
#[utoipa::path(get, path = "/users/me/groups", tag = "users",
    responses((status = 200, body = MyGroups)),
    security(("bearer" = [])))]
async fn my_groups(Caller(me): Caller, State(s): State<RestState>) -> ApiResult<Json<MyGroups>> {
    Ok(Json(MyGroups {
        groups: s.api.my_groups(&me.user_id).await?,
    }))
}

/// A user's profile.
#[utoipa::path(get, path = "/users/{user_id}", tag = "users",
    params(("user_id" = String, Path, pattern = "^[A-Za-z0-9.@-]{1,64}$", example = "bob")),
    responses((status = 200, body = Profile)),
    security(("bearer" = [])))]
async fn user_profile(
    Caller(_): Caller,
    State(s): State<RestState>,
    Path(user_id): Path<String>,
) -> ApiResult<Json<Profile>> {
    Ok(Json(s.api.profile(&user_id).await?))
}

/// The caller's profile.
#[utoipa::path(get, path = "/users/me", tag = "users",
    responses((status = 200, body = Profile)),
    security(("bearer" = [])))]
async fn my_profile(Caller(me): Caller, State(s): State<RestState>) -> ApiResult<Json<Profile>> {
    Ok(Json(s.api.profile(&me.user_id).await?))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct ProfileEdit {
    #[serde(default)]
    nickname: Option<String>,
    #[serde(default)]
    avatar_url: Option<String>,
}

/// Change the caller's nickname or avatar.
#[utoipa::path(put, path = "/users/me", tag = "users",
    request_body = ProfileEdit,
    responses((status = 200, body = Done)),
    security(("bearer" = [])))]
async fn update_me(
    Caller(me): Caller,
    State(s): State<RestState>,
    bytes: Bytes,
) -> ApiResult<Json<Done>> {
    let b: ProfileEdit = body(&bytes)?;
    s.api
        .update_profile(&me.user_id, b.nickname, b.avatar_url)
        .await?;
    Ok(DONE)
}

#[derive(Serialize, ToSchema)]
struct BlockList {
    user_ids: Vec<String>,
}

/// Whom the caller blocks.
#[utoipa::path(get, path = "/users/me/blocks", tag = "users",
    responses((status = 200, body = BlockList)),
    security(("bearer" = [])))]
async fn blocks(Caller(me): Caller, State(s): State<RestState>) -> ApiResult<Json<BlockList>> {
    Ok(Json(BlockList {
        user_ids: s.api.blocks(&me.user_id).await?,
    }))
}

/// Block a user's single-chat messages.
#[utoipa::path(put, path = "/users/me/blocks/{user_id}", tag = "users",
    params(("user_id" = String, Path, pattern = "^[A-Za-z0-9.@-]{1,64}$", example = "bob")),
    responses((status = 200, body = Done)),
    security(("bearer" = [])))]
async fn block(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path(user_id): Path<String>,
) -> ApiResult<Json<Done>> {
    s.api.block(&me.user_id, &user_id, true).await?;
    Ok(DONE)
}

/// Unblock a user.
#[utoipa::path(delete, path = "/users/me/blocks/{user_id}", tag = "users",
    params(("user_id" = String, Path, pattern = "^[A-Za-z0-9.@-]{1,64}$", example = "bob")),
    responses((status = 200, body = Done)),
    security(("bearer" = [])))]
async fn unblock(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path(user_id): Path<String>,
) -> ApiResult<Json<Done>> {
    s.api.block(&me.user_id, &user_id, false).await?;
    Ok(DONE)
}

#[derive(Deserialize, ToSchema)]
struct FileBody {
    /// The file's name as readers will see it (1 to 255 characters).
    name: String,
    /// Its exact size in bytes, at most the server's `max_file_bytes`.
    #[schema(minimum = 1)]
    size: u64,
    /// Its MIME type, e.g. `image/png`.
    content_type: String,
}

/// Declare a file: where to PUT its bytes, and until when. A message
/// (content type 102 to 105) then names it by `file_id`.
#[utoipa::path(post, path = "/files", tag = "files",
    request_body = FileBody,
    responses((status = 200, body = crate::api::NewFile),
              (status = 413, body = ErrorBody, description = "over max_file_bytes")),
    security(("bearer" = [])))]
async fn create_file(
    Caller(me): Caller,
    State(s): State<RestState>,
    bytes: Bytes,
) -> ApiResult<Json<crate::api::NewFile>> {
    let b: FileBody = body(&bytes)?;
    Ok(Json(
        s.api
            .create_file(&me.user_id, b.name, b.size, b.content_type)
            .await?,
    ))
}

/// Where to download a file: a redirect to a short-lived URL, for users
/// who read a conversation in which it was sent (others: 403).
#[utoipa::path(get, path = "/files/{file_id}", tag = "files",
    params(("file_id" = String, Path)),
    responses((status = 302, description = "`Location`: the download URL"),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn file_location(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path(file_id): Path<String>,
) -> ApiResult<Response> {
    let url = s.api.file_location(&me.user_id, &file_id).await?;
    Ok((StatusCode::FOUND, [(axum::http::header::LOCATION, url)]).into_response())
}

/// A signed URL's query (the embedded store's uploads and downloads).
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct Signed {
    /// When the URL stops working (ms).
    expires: i64,
    sig: String,
}

/// Upload a file's bytes to the URL `POST /files` gave (standalone; a
/// cluster's URLs point at its object store). The body must have exactly
/// the declared size.
#[utoipa::path(put, path = "/files/{file_id}/content", tag = "files",
    params(("file_id" = String, Path), Signed),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = Done),
              (status = 403, body = ErrorBody, description = "wrong or expired URL"),
              (status = 409, body = ErrorBody, description = "already uploaded"),
              (status = 413, body = ErrorBody, description = "longer than declared")))]
async fn upload_content(
    State(s): State<RestState>,
    Path(file_id): Path<String>,
    Query(q): Query<Signed>,
    request: axum::extract::Request,
) -> ApiResult<Json<Done>> {
    use imflow_stages::store::files::UploadError;
    let (file, local) = s
        .api
        .signed_file("put", &file_id, q.expires, &q.sig)
        .await?;
    if file.complete {
        return Err(ImError::new(
            ErrorCode::Conflict,
            format!("file {file_id} is already uploaded"),
        )
        .into());
    }
    let body = request.into_body().into_data_stream();
    match local.store(&file, body).await {
        Ok(()) => {}
        Err(UploadError::TooLong(n)) => {
            return Err(ImError::new(
                ErrorCode::PayloadTooLarge,
                format!("the body is longer than the {n} bytes declared"),
            )
            .into())
        }
        Err(UploadError::Store(e)) => return Err(e.to_client().into()),
        Err(UploadError::AlreadyStored) => {
            return Err(ImError::new(
                ErrorCode::Conflict,
                format!("file {file_id} is already uploaded"),
            )
            .into())
        }
        Err(e) => return Err(ImError::bad_request(e.to_string()).into()),
    }
    s.api.file_uploaded(&file_id).await?;
    Ok(DONE)
}

/// Download a file's bytes from the URL `GET /files/{file_id}` redirected
/// to (standalone).
#[utoipa::path(get, path = "/files/{file_id}/content", tag = "files",
    params(("file_id" = String, Path), Signed),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>),
              (status = 403, body = ErrorBody, description = "wrong or expired URL")))]
async fn download_content(
    State(s): State<RestState>,
    Path(file_id): Path<String>,
    Query(q): Query<Signed>,
) -> ApiResult<Response> {
    let (file, local) = s
        .api
        .signed_file("get", &file_id, q.expires, &q.sig)
        .await?;
    let opened = match file.complete {
        true => tokio::fs::File::open(local.path(&file_id)).await.ok(),
        false => None,
    };
    let Some(opened) = opened else {
        return Err(ImError::not_found(format!("file {file_id} is not uploaded")).into());
    };
    let disposition = format!(
        "attachment; filename*=UTF-8''{}",
        percent_encoding::utf8_percent_encode(&file.name, percent_encoding::NON_ALPHANUMERIC)
    );
    let headers = [
        (axum::http::header::CONTENT_TYPE, file.content_type.clone()),
        (axum::http::header::CONTENT_LENGTH, file.size.to_string()),
        (axum::http::header::CONTENT_DISPOSITION, disposition),
    ];
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(opened));
    Ok((headers, body).into_response())
}

#[derive(Deserialize, ToSchema)]
struct DeviceBody {
    #[schema(min_length = 1, max_length = 4096)]
    push_token: String,
    /// `fcm`, `apns` or `webhook`.
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    provider: String,
}

/// Register the caller's device for offline notifications on a platform.
#[utoipa::path(put, path = "/users/me/devices/{platform}", tag = "users",
    params(("platform" = u8, Path, minimum = 1, maximum = 9, example = 1)),
    request_body = DeviceBody,
    responses((status = 200, body = Done)),
    security(("bearer" = [])))]
async fn set_device(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path(platform): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<Done>> {
    let platform = number("platform", Some(&platform), 0i64)?;
    let b: DeviceBody = body(&bytes)?;
    s.api
        .set_device(&me.user_id, platform, b.push_token, b.provider)
        .await?;
    Ok(DONE)
}

/// Whether a user is online, where, and when last seen.
#[utoipa::path(get, path = "/users/{user_id}/presence", tag = "users",
    params(("user_id" = String, Path, pattern = "^[A-Za-z0-9.@-]{1,64}$", example = "bob")),
    responses((status = 200, body = PresenceState)),
    security(("bearer" = [])))]
async fn presence(
    Caller(_): Caller,
    State(s): State<RestState>,
    Path(user_id): Path<String>,
) -> ApiResult<Json<PresenceState>> {
    Ok(Json(s.api.user_presence(&user_id).await?))
}

#[derive(Deserialize)]
struct Range {
    from_seq: Option<String>,
    to_seq: Option<String>,
}

/// What `messages` answers (the WebSocket `pull` reply); written from the
/// pre-rendered message bodies, so this type only describes it.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PullReply {
    pub conversation_id: String,
    pub messages: Vec<Message>,
}

/// Messages `from_seq` to `to_seq` of a conversation (participants).
#[utoipa::path(get, path = "/conversations/{conversation_id}/messages", tag = "messages",
    params(("conversation_id" = String, Path, example = "si_alice_bob"),
        ("from_seq" = u64, Query, minimum = 0, example = 1), ("to_seq" = u64, Query, minimum = 0, example = 10)),
    responses((status = 200, body = PullReply)),
    security(("bearer" = [])))]
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
    Ok(pull_reply(&conversation_id, &bodies))
}

fn pull_reply(conversation_id: &str, bodies: &[Arc<str>]) -> Response {
    let mut out = String::from("{\"conversation_id\":");
    imflow_stages::model::push_json_str(&mut out, conversation_id);
    imflow_stages::model::close_with_messages(&mut out, bodies);
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        out,
    )
        .into_response()
}

#[derive(Deserialize, ToSchema)]
struct ReadBody {
    seq: u64,
}

/// The caller has read a conversation up to `seq`.
#[utoipa::path(post, path = "/conversations/{conversation_id}/read", tag = "conversations",
    params(("conversation_id" = String, Path, example = "si_alice_bob")),
    request_body = ReadBody,
    responses((status = 200, body = Done)),
    security(("bearer" = [])))]
async fn read(
    Caller(me): Caller,
    State(s): State<RestState>,
    Path(conversation_id): Path<String>,
    bytes: Bytes,
) -> ApiResult<Json<Done>> {
    let b: ReadBody = body(&bytes)?;
    s.api
        .read(&me.user_id, &conversation_id, b.seq, None)
        .await?;
    Ok(DONE)
}

#[derive(Serialize, ToSchema)]
struct Health {
    /// `ok`, or `draining` (with 503) while the process stops.
    status: &'static str,
    /// Open WebSocket connections of this process.
    #[serde(skip_serializing_if = "Option::is_none")]
    connections: Option<usize>,
}

/// Whether this process serves.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, body = Health), (status = 503, body = Health)))]
async fn healthz(State(s): State<RestState>) -> Response {
    if s.draining.is_cancelled() {
        let h = Health {
            status: "draining",
            connections: None,
        };
        (StatusCode::SERVICE_UNAVAILABLE, Json(h)).into_response()
    } else {
        let h = Health {
            status: "ok",
            connections: Some(s.api.conns.open_count()),
        };
        Json(h).into_response()
    }
}

/// Follow one conversation's messages through this process's stages:
/// one JSON line per sighting (`{"stage", "event": "in"|"out", "at_us",
/// "item"}`) for as long as the caller reads (`imflow tap`).
#[utoipa::path(get, path = "/tap", tag = "operations",
    params(crate::tap::TapQuery),
    responses((status = 200, content_type = "application/x-ndjson", body = String)),
    security(("admin_secret" = [])))]
async fn tap(_: Admin, Query(q): Query<crate::tap::TapQuery>) -> Response {
    crate::tap::follow(q.conversation)
}

/// Re-read the config and the pipeline file and swap the running pipeline
/// for the file's: stages added start, removed ones drain first, changed
/// ones are rebuilt; sends wait at the door meanwhile and connections stay
/// open. An invalid file is refused (422, every error listed) and the
/// running pipeline keeps serving. The same as `SIGHUP` and `imflow reload`.
#[utoipa::path(post, path = "/reload", tag = "operations",
    responses(
        (status = 200, body = crate::reload::ReloadReport),
        (status = 422, description = "refused; the running pipeline is unchanged", body = crate::reload::ReloadReport)),
    security(("admin_secret" = [])))]
async fn reload(_: Admin, State(s): State<RestState>) -> Response {
    crate::reload::answer(s.reload.as_ref()).await
}

/// This process's metrics, in Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, body = String, content_type = "text/plain")))]
async fn metrics(State(s): State<RestState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        (s.metrics)(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pull_reply_is_the_documented_shape() {
        let m = imflow_stages::model::Stamped {
            conversation_id: "sg_team".into(),
            server_msg_id: "s1".into(),
            client_msg_id: "c1".into(),
            sender: "alice".into(),
            target: imflow_stages::model::Target::Group("team".into()),
            content_type: 110,
            content: "[1,2]".into(),
            send_time: 5,
        };
        let bodies: Vec<Arc<str>> = vec![m.render(1).into(), m.render(2).into()];
        let r = pull_reply("sg_team", &bodies);
        let bytes = futures::executor::block_on(axum::body::to_bytes(r.into_body(), usize::MAX))
            .expect("body");
        let typed: PullReply = serde_json::from_slice(&bytes).expect("the documented shape");
        assert_eq!(typed.messages.len(), 2);
    }
}

// ---- the console's reads (admin) ----

/// The console's reading: the pipeline compiled from the file this
/// process serves (stages, edges, topics) and every process's figures
/// (rates, queues, Kafka lag, CPU), as `imflow top --once --json` shows
/// them.
#[utoipa::path(get, path = "/admin/overview", tag = "operations",
    responses((status = 200, body = Object)),
    security(("admin_secret" = [])))]
async fn overview(_: Admin, State(s): State<RestState>) -> ApiResult<Json<serde_json::Value>> {
    let Some(read) = &s.overview else {
        return Err(ImError::not_found("this process serves no console").into());
    };
    Ok(Json(read().await))
}

#[derive(Serialize, ToSchema)]
struct UserLookup {
    profile: Profile,
    presence: crate::api::PresenceState,
    groups: Vec<MyGroup>,
}

/// A user as an operator sees it: profile, presence and groups.
#[utoipa::path(get, path = "/admin/users/{user_id}", tag = "users",
    params(("user_id" = String, Path, pattern = "^[A-Za-z0-9.@-]{1,64}$", example = "alice")),
    responses((status = 200, body = UserLookup)),
    security(("admin_secret" = [])))]
async fn user_lookup(
    _: Admin,
    State(s): State<RestState>,
    Path(user_id): Path<String>,
) -> ApiResult<Json<UserLookup>> {
    let profile = s.api.profile(&user_id).await?;
    let (presence, groups) =
        futures::try_join!(s.api.presence(&user_id), s.api.my_groups(&user_id))?;
    Ok(Json(UserLookup {
        profile,
        presence,
        groups,
    }))
}

#[derive(Serialize, ToSchema)]
struct GroupLookup {
    group: GroupInfo,
    /// The first 100 members.
    members: Vec<MemberEntry>,
    total: usize,
}

/// A group as an operator sees it: its settings and first members.
#[utoipa::path(get, path = "/admin/groups/{group_id}", tag = "groups",
    params(("group_id" = String, Path, pattern = "^[A-Za-z0-9.@-]{1,64}$", example = "team")),
    responses((status = 200, body = GroupLookup)),
    security(("admin_secret" = [])))]
async fn group_lookup(
    _: Admin,
    State(s): State<RestState>,
    Path(group_id): Path<String>,
) -> ApiResult<Json<GroupLookup>> {
    let group = s.api.group_info_for_admin(&group_id).await?;
    let (page, total) = s.api.members_for_admin(&group_id, 0, 100).await?;
    let members = entries(page);
    Ok(Json(GroupLookup {
        group,
        members,
        total,
    }))
}
