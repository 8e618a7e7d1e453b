//! What flows through the pipeline, and the rules on identifiers and content
//! from PROTOCOL.md that every door (WebSocket, REST) shares.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The error codes of PROTOCOL.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    Conflict,
    PayloadTooLarge,
    RateLimited,
    Unavailable,
    /// The recipient blocks the sender (PROTOCOL v2).
    Blocked,
    /// The sender is muted in the group, or the group is muted.
    Muted,
    /// The revoke window is over.
    TooLate,
    /// The group no longer exists.
    Dismissed,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Blocked => "blocked",
            ErrorCode::Muted => "muted",
            ErrorCode::TooLate => "too_late",
            ErrorCode::Dismissed => "dismissed",
        }
    }
}

/// An error a client sees: a protocol code and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{}: {message}", code.as_str())]
pub struct ImError {
    pub code: ErrorCode,
    pub message: String,
}

impl ImError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ImError {
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, m)
    }
    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, m)
    }
    pub fn conflict(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, m)
    }
    pub fn unavailable(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, m)
    }
}

/// Server notifications (PROTOCOL v2): content types only the server
/// writes into a conversation.
pub mod notification {
    pub const GROUP_CREATED: i64 = 1001;
    pub const MEMBERS_ADDED: i64 = 1002;
    pub const MEMBERS_REMOVED: i64 = 1003;
    pub const MEMBER_LEFT: i64 = 1004;
    pub const ROLE_CHANGED: i64 = 1005;
    pub const GROUP_INFO_CHANGED: i64 = 1006;
    pub const GROUP_MUTED: i64 = 1007;
    pub const MEMBER_MUTED: i64 = 1008;
    pub const GROUP_DISMISSED: i64 = 1009;
    pub const OWNER_TRANSFERRED: i64 = 1010;
    pub const MESSAGE_REVOKED: i64 = 1100;

    /// Whether `content_type` is a server notification.
    pub fn is(content_type: i64) -> bool {
        content_type >= 1000
    }
}

/// A message as the server returns it (PROTOCOL.md, "Identifiers and
/// shapes"): what [`Stamped::render`] writes and [`revoked_body`] turns into
/// a revoked one. Messages travel pre-rendered; this type describes them
/// (the REST API's OpenAPI document) and checks the renderer in tests.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub conversation_id: String,
    pub seq: u64,
    pub server_msg_id: String,
    pub client_msg_id: String,
    pub sender: String,
    /// Single chat: the receiver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recv_id: Option<String>,
    /// Group chat: the group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// 101 text, 102–105 media, 106 mention, 110 custom; 1000 and up:
    /// server notifications.
    pub content_type: i64,
    /// Any JSON value; null once the message is revoked.
    pub content: serde_json::Value,
    pub send_time: i64,
    /// Present (true) once the message is revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<bool>,
}

/// What a media message (102–105) says of the file it carries.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FileRef {
    pub file_id: String,
    pub name: String,
    pub size: u64,
}

/// The file a media message (102–105) carries, if it names one
/// (`check_content` made sure it is well formed).
pub fn file_of(content_type: i64, content: &str) -> Option<FileRef> {
    if !(102..=105).contains(&content_type) {
        return None;
    }
    serde_json::from_str(content).ok()
}

/// The file a stored message (its client JSON) carries, if any; only a
/// media message's JSON is read.
pub fn file_in_body(content_type: i64, body: &str) -> Option<FileRef> {
    if !(102..=105).contains(&content_type) {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    serde_json::from_value(v.get("content")?.clone()).ok()
}

/// A stored message's JSON with its content deleted and `revoked: true`
/// (what `pull` returns once it was revoked).
pub fn revoked_body(body: &str) -> Option<String> {
    let mut v: serde_json::Value = serde_json::from_str(body).ok()?;
    let o = v.as_object_mut()?;
    o.insert("content".into(), serde_json::Value::Null);
    o.insert("revoked".into(), serde_json::Value::Bool(true));
    serde_json::to_string(&v).ok()
}

/// What the server needs to know of a stored message to judge a revoke.
#[derive(Debug, Clone, Deserialize)]
pub struct StoredHead {
    pub seq: u64,
    pub server_msg_id: String,
    pub sender: String,
    pub content_type: i64,
    pub send_time: i64,
    #[serde(default)]
    pub revoked: bool,
}

impl StoredHead {
    pub fn of(body: &str) -> Option<StoredHead> {
        serde_json::from_str(body).ok()
    }
}

/// Largest serialised `content` a message may carry.
pub const MAX_CONTENT_BYTES: usize = 16 * 1024;
/// Largest pull range (`to_seq - from_seq`).
pub const MAX_PULL_SPAN: u64 = 1000;

/// `user_id` / `group_id`: 1 to 64 of `A-Z a-z 0-9 . - @`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'@'))
}

pub fn check_id(what: &str, id: &str) -> Result<(), ImError> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(ImError::bad_request(format!(
            "{what} must be 1 to 64 characters of A-Z a-z 0-9 . - @"
        )))
    }
}

/// A push provider's name, as devices give it and `offline-push` stages
/// name theirs: 1 to 64 letters, digits, `-` or `_`.
pub fn valid_provider(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `client_msg_id`: 1 to 64 printable ASCII characters.
pub fn valid_client_msg_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| (0x20..0x7f).contains(&b))
}

pub fn valid_platform(p: i64) -> bool {
    (1..=9).contains(&p)
}

/// A conversation, parsed from its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conversation {
    Single(Arc<str>, Arc<str>),
    Group(Arc<str>),
}

impl Conversation {
    pub fn single(a: &str, b: &str) -> Self {
        let (x, y) = if a.as_bytes() <= b.as_bytes() {
            (a, b)
        } else {
            (b, a)
        };
        Conversation::Single(x.into(), y.into())
    }

    pub fn parse(id: &str) -> Option<Self> {
        if let Some(g) = id.strip_prefix("sg_") {
            return valid_id(g).then(|| Conversation::Group(g.into()));
        }
        let rest = id.strip_prefix("si_")?;
        let (a, b) = rest.split_once('_')?;
        (valid_id(a) && valid_id(b) && a.as_bytes() <= b.as_bytes())
            .then(|| Conversation::Single(a.into(), b.into()))
    }

    pub fn id(&self) -> String {
        match self {
            Conversation::Single(a, b) => format!("si_{a}_{b}"),
            Conversation::Group(g) => format!("sg_{g}"),
        }
    }
}

/// Who a message is addressed to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    User(Arc<str>),
    Group(Arc<str>),
}

/// A send request as a door received it, before any check.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SendRequest {
    /// 1 to 64 printable ASCII characters chosen by the sender.
    pub client_msg_id: String,
    /// Single chat: the receiver (or `group_id`).
    #[serde(default)]
    pub recv_id: Option<String>,
    /// Group chat: the group (or `recv_id`).
    #[serde(default)]
    pub group_id: Option<String>,
    /// 101 text, 102–105 media, 106 mention, 110 custom.
    pub content_type: i64,
    /// Any JSON value, at most 16 KiB serialised.
    #[schema(value_type = Value)]
    pub content: Box<RawValue>,
}

/// A server notification to write into a conversation (see
/// `IngestHandle::notify`); the conversation is the group, or the single
/// chat between its cause and `target`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Notice {
    pub target: Target,
    pub content_type: i64,
    pub content: serde_json::Value,
}

/// A message after `ingest`: authorised and stamped, not yet sequenced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stamped {
    pub conversation_id: Arc<str>,
    pub server_msg_id: Arc<str>,
    pub client_msg_id: Arc<str>,
    pub sender: Arc<str>,
    pub target: Target,
    pub content_type: i64,
    /// The content exactly as the client sent it (validated JSON text).
    pub content: Arc<str>,
    pub send_time: i64,
}

/// A message after `seq-assign`: it has its place in the conversation, and its
/// client-facing JSON is rendered once here and shared from then on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sequenced {
    pub msg: Stamped,
    pub seq: u64,
    pub body: Arc<str>,
}

/// A message after `fanout`: the users it goes to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    pub conversation_id: Arc<str>,
    pub seq: u64,
    pub body: Arc<str>,
    pub recipients: Arc<[Arc<str>]>,
}

/// What the sender is told once its message is durable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckInfo {
    pub server_msg_id: String,
    pub conversation_id: String,
    pub send_time: i64,
}

impl Stamped {
    pub fn ack_info(&self) -> AckInfo {
        AckInfo {
            server_msg_id: self.server_msg_id.to_string(),
            conversation_id: self.conversation_id.to_string(),
            send_time: self.send_time,
        }
    }

    /// The message as clients see it (PROTOCOL.md "A message").
    pub fn render(&self, seq: u64) -> String {
        let mut out = String::with_capacity(200 + self.content.len());
        out.push_str("{\"conversation_id\":");
        push_json_str(&mut out, &self.conversation_id);
        out.push_str(",\"seq\":");
        out.push_str(&seq.to_string());
        out.push_str(",\"server_msg_id\":");
        push_json_str(&mut out, &self.server_msg_id);
        out.push_str(",\"client_msg_id\":");
        push_json_str(&mut out, &self.client_msg_id);
        out.push_str(",\"sender\":");
        push_json_str(&mut out, &self.sender);
        match &self.target {
            Target::User(u) => {
                out.push_str(",\"recv_id\":");
                push_json_str(&mut out, u);
            }
            Target::Group(g) => {
                out.push_str(",\"group_id\":");
                push_json_str(&mut out, g);
            }
        }
        out.push_str(",\"content_type\":");
        out.push_str(&self.content_type.to_string());
        out.push_str(",\"content\":");
        out.push_str(&self.content);
        out.push_str(",\"send_time\":");
        out.push_str(&self.send_time.to_string());
        out.push('}');
        out
    }
}

/// Append `s` as a JSON string literal.
pub fn push_json_str(out: &mut String, s: &str) {
    // serde_json's escaping cannot fail on a &str.
    match serde_json::to_string(s) {
        Ok(q) => out.push_str(&q),
        Err(_) => out.push_str("\"\""),
    }
}

/// Append `,"messages":[…]}`: already rendered message bodies as the
/// closing field of a reply object (the bodies are spliced, not re-encoded).
pub fn close_with_messages(out: &mut String, bodies: &[Arc<str>]) {
    out.reserve(16 + bodies.iter().map(|b| b.len() + 1).sum::<usize>());
    out.push_str(",\"messages\":[");
    for (i, b) in bodies.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(b);
    }
    out.push_str("]}");
}

/// Check `content_type` and the shape of `content` (PROTOCOL.md).
pub fn check_content(content_type: i64, content: &RawValue) -> Result<(), ImError> {
    let text = content.get();
    if text.len() > MAX_CONTENT_BYTES {
        return Err(ImError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "content is {} bytes; at most {MAX_CONTENT_BYTES} are allowed",
                text.len()
            ),
        ));
    }
    let need = |ok: bool, what: &str| {
        if ok {
            Ok(())
        } else {
            Err(ImError::bad_request(format!(
                "content_type {content_type} needs content {what}"
            )))
        }
    };
    match content_type {
        101 => {
            let v: serde_json::Value = parse(text)?;
            need(
                v.get("text").is_some_and(|t| t.is_string()),
                "{\"text\": \"…\"}",
            )
        }
        // PROTOCOL v2: a `file_id` from POST /files (checked by ingest);
        // v1: a `url` of the client's own.
        102..=105 => {
            let v: serde_json::Value = parse(text)?;
            let file = v.get("file_id").is_some_and(|t| t.is_string())
                && v.get("name").is_some_and(|t| t.is_string())
                && v.get("size").is_some_and(|t| t.is_u64());
            let v1 = v.get("file_id").is_none() && v.get("url").is_some_and(|t| t.is_string());
            need(
                file || v1,
                "{\"file_id\": \"…\", \"name\": \"…\", \"size\": bytes, …} (or v1's {\"url\": \"…\", …})",
            )
        }
        106 => {
            let v: serde_json::Value = parse(text)?;
            let ok = v.get("text").is_some_and(|t| t.is_string())
                && v.get("user_ids")
                    .and_then(|u| u.as_array())
                    .is_some_and(|a| a.iter().all(|x| x.as_str().is_some_and(valid_id)));
            need(ok, "{\"text\": \"…\", \"user_ids\": [user_id, …]}")
        }
        // Any JSON, but valid JSON: parsing checks every escape, so a lone
        // UTF-16 surrogate ("\ud800"), which strict clients cannot decode in
        // a push or a pull, is refused here.
        110 => parse(text).map(|_| ()),
        t if t >= 1000 => Err(ImError::bad_request(
            "content_type 1000 and up are notifications only the server sends",
        )),
        t => Err(ImError::bad_request(format!(
            "unknown content_type {t}; use 101-106 or 110"
        ))),
    }
}

fn parse(text: &str) -> Result<serde_json::Value, ImError> {
    serde_json::from_str(text).map_err(|e| ImError::bad_request(format!("content: {e}")))
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Unique, roughly time-ordered message ids: milliseconds, a per-process
/// counter and a random process tag, so two processes (or a restarted one)
/// never mint the same id.
pub fn new_server_msg_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static TAG: OnceLock<u32> = OnceLock::new();
    let tag = *TAG.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        h.write_u32(std::process::id());
        (h.finish() & 0xff_ffff) as u32
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed) & 0xffff_ffff;
    format!("{:012x}{:08x}{:06x}", now_ms(), n, tag)
}

/// Stable 64-bit key of a conversation for partitioning (FNV-1a): the same
/// conversation lands in the same partition in every process and release.
pub fn partition_key(conversation_id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in conversation_id.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl fmt::Display for Conversation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversation_ids_round_trip_and_order_users() {
        assert_eq!(Conversation::single("bob", "alice").id(), "si_alice_bob");
        assert_eq!(
            Conversation::parse("si_alice_bob"),
            Some(Conversation::single("alice", "bob"))
        );
        assert_eq!(
            Conversation::parse("si_bob_alice"),
            None,
            "a must sort before b"
        );
        assert_eq!(
            Conversation::parse("sg_team.1"),
            Some(Conversation::Group("team.1".into()))
        );
        assert_eq!(Conversation::parse("sg_"), None);
        assert_eq!(Conversation::parse("xx_a_b"), None);
    }

    #[test]
    fn ids_follow_the_protocol() {
        assert!(valid_id("alice@example.com"));
        assert!(!valid_id("a_b"));
        assert!(!valid_id(""));
        assert!(!valid_id(&"x".repeat(65)));
        assert!(valid_client_msg_id("c-1 x"));
        assert!(!valid_client_msg_id("é"));
    }

    #[test]
    fn content_rules() {
        let raw = |s: &str| RawValue::from_string(s.to_string()).unwrap();
        assert!(check_content(101, &raw(r#"{"text":"hi"}"#)).is_ok());
        assert!(check_content(101, &raw(r#"{"url":"x"}"#)).is_err());
        assert!(check_content(102, &raw(r#"{"url":"x","w":3}"#)).is_ok());
        assert!(check_content(106, &raw(r#"{"text":"@a","user_ids":["a"]}"#)).is_ok());
        assert!(check_content(110, &raw("[1,2]")).is_ok());
        for lone in [
            r#"{"a":"\ud800"}"#,
            r#"["x\udc00y"]"#,
            r#"{"text":"\ud800"}"#,
        ] {
            for t in [101, 110] {
                assert_eq!(
                    check_content(t, &raw(lone)).unwrap_err().code,
                    ErrorCode::BadRequest,
                    "{t} {lone}"
                );
            }
        }
        assert!(
            check_content(110, &raw(r#"{"a":"\ud83d\ude00"}"#)).is_ok(),
            "a pair is fine"
        );
        assert_eq!(
            check_content(1001, &raw("{}")).unwrap_err().code,
            ErrorCode::BadRequest
        );
        let big = format!(r#"{{"text":"{}"}}"#, "x".repeat(MAX_CONTENT_BYTES));
        assert_eq!(
            check_content(101, &raw(&big)).unwrap_err().code,
            ErrorCode::PayloadTooLarge
        );
    }

    #[test]
    fn rendered_message_is_the_protocol_shape() {
        let m = Stamped {
            conversation_id: "si_a_b".into(),
            server_msg_id: "s1".into(),
            client_msg_id: "c\"1".into(),
            sender: "a".into(),
            target: Target::User("b".into()),
            content_type: 101,
            content: r#"{"text":"hi"}"#.into(),
            send_time: 5,
        };
        let v: serde_json::Value = serde_json::from_str(&m.render(3)).unwrap();
        assert_eq!(v["seq"], 3);
        assert_eq!(v["client_msg_id"], "c\"1");
        assert_eq!(v["recv_id"], "b");
        assert_eq!(v["content"]["text"], "hi");
        assert!(v.get("group_id").is_none());
        // The documented shape, field for field, revoked or not.
        let typed: Message = serde_json::from_str(&m.render(3)).unwrap();
        assert_eq!(typed.recv_id.as_deref(), Some("b"));
        let revoked = revoked_body(&m.render(3)).unwrap();
        let typed: Message = serde_json::from_str(&revoked).unwrap();
        assert_eq!(
            (typed.revoked, typed.content),
            (Some(true), serde_json::Value::Null)
        );
    }

    #[test]
    fn server_msg_ids_are_unique() {
        let a = new_server_msg_id();
        let b = new_server_msg_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 26);
    }
}
