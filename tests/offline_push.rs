//! The `offline-push` kind against real HTTP receivers on loopback standing
//! in for FCM, APNs and a push service of the operator's own, in both run
//! modes: a recipient with no connection gets a notification through the
//! provider its device names; one who is online, or muted the
//! conversation, gets none; a provider away for a while gets every
//! notification once back; one that refuses for good yields dead letters.

mod common;

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use common::{Target, TestServer, PATIENCE};
use serde_json::{json, Value};
use tokio::sync::watch;

const SECRET: &str = "an-offline-push-secret-of-the-tests";
const FCM_TOKEN: &str = "fcm-bearer-of-the-tests";
const APNS_TOKEN: &str = "apns-jwt-of-the-tests";

/// A request the providers' receiver took or refused.
#[derive(Clone, Debug)]
struct Request {
    /// `fcm`, `apns` or `relay` (the generic provider).
    provider: &'static str,
    /// APNs: the device token in the path.
    device: String,
    authorization: String,
    apns_topic: String,
    body: Value,
    status: u16,
}

#[derive(Default)]
struct Seen {
    requests: Vec<Request>,
}

impl Seen {
    /// Accepted notifications as (provider, push token, text).
    fn taken(&self) -> Vec<(String, String, String)> {
        let mut all = Vec::new();
        for r in self.requests.iter().filter(|r| r.status == 200) {
            match r.provider {
                "fcm" => all.push((
                    "fcm".into(),
                    r.body["message"]["token"]
                        .as_str()
                        .unwrap_or_default()
                        .into(),
                    r.body["message"]["notification"]["body"]
                        .as_str()
                        .unwrap_or_default()
                        .into(),
                )),
                "apns" => all.push((
                    "apns".into(),
                    r.device.clone(),
                    r.body["aps"]["alert"]["body"]
                        .as_str()
                        .unwrap_or_default()
                        .into(),
                )),
                _ => {
                    for n in r.body["notifications"].as_array().into_iter().flatten() {
                        all.push((
                            "relay".into(),
                            n["push_token"].as_str().unwrap_or_default().into(),
                            n["body"].as_str().unwrap_or_default().into(),
                        ));
                    }
                }
            }
        }
        all.sort();
        all
    }

    fn refused(&self, provider: &str) -> usize {
        self.requests
            .iter()
            .filter(|r| r.provider == provider && r.status != 200)
            .count()
    }
}

struct Receiver {
    /// The relay answers 503 while this is set.
    relay_down: Mutex<bool>,
    seen: watch::Sender<Seen>,
}

fn header(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

impl Receiver {
    fn record(
        &self,
        provider: &'static str,
        device: String,
        headers: &HeaderMap,
        body: &Bytes,
        status: StatusCode,
    ) -> StatusCode {
        let body: Value = serde_json::from_slice(body).expect("a JSON body");
        self.seen.send_modify(|s| {
            s.requests.push(Request {
                provider,
                device,
                authorization: header(headers, "authorization"),
                apns_topic: header(headers, "apns-topic"),
                body,
                status: status.as_u16(),
            })
        });
        status
    }
}

/// FCM answers 404 (UNREGISTERED) for a token named "gone", 500 for
/// "broken", else 200.
async fn fcm(State(r): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let v: Value = serde_json::from_slice(&body).unwrap_or_default();
    let status = match v["message"]["token"].as_str() {
        Some("gone") => StatusCode::NOT_FOUND,
        Some("broken") => StatusCode::INTERNAL_SERVER_ERROR,
        _ if header(&headers, "authorization") != format!("Bearer {FCM_TOKEN}") => {
            StatusCode::UNAUTHORIZED
        }
        _ => StatusCode::OK,
    };
    r.record("fcm", String::new(), &headers, &body, status)
}

async fn apns(
    State(r): State<Arc<Receiver>>,
    Path(device): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let status = if header(&headers, "authorization") == format!("Bearer {APNS_TOKEN}") {
        StatusCode::OK
    } else {
        StatusCode::FORBIDDEN
    };
    r.record("apns", device, &headers, &body, status)
}

async fn relay(State(r): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let text = String::from_utf8_lossy(&body).to_string();
    let expected = format!(
        "sha256={}",
        imflow_stages::hooks::sign(
            SECRET.as_bytes(),
            &header(&headers, "x-imflow-timestamp"),
            &text
        )
    );
    let status = if header(&headers, "x-imflow-signature") != expected {
        StatusCode::UNAUTHORIZED
    } else if *r.relay_down.lock().expect("mood") {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    r.record("relay", String::new(), &headers, &body, status)
}

/// The three providers on an ephemeral loopback port; returns the receiver,
/// what it saw, and its base URL.
async fn receiver(relay_down: bool) -> (Arc<Receiver>, watch::Receiver<Seen>, String) {
    let (tx, rx) = watch::channel(Seen::default());
    let r = Arc::new(Receiver {
        relay_down: Mutex::new(relay_down),
        seen: tx,
    });
    let app = axum::Router::new()
        .route("/fcm", axum::routing::post(fcm))
        .route("/apns/3/device/{device}", axum::routing::post(apns))
        .route("/relay", axum::routing::post(relay))
        .with_state(r.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (r, rx, url)
}

/// The server's pipeline with an `offline-push` stage named `stage` beside
/// `push` (both read fanout's deliveries, in the `im_push` group).
fn start_with_offline_push(
    stage: &'static str,
    options: String,
) -> impl FnOnce(&mut imflow::Config) {
    move |cfg| {
        let dir = cfg
            .data_dir
            .parent()
            .expect("data dir has a parent")
            .to_path_buf();
        let text = std::fs::read_to_string(&cfg.pipeline).expect("pipeline");
        let push = "  push:\n    kind: push\n    inputs: [fanout]\n";
        assert!(text.contains(push), "the shipped pipeline changed");
        let text = text
            .replace(
                push,
                &format!("{push}\n  {stage}:\n    kind: offline-push\n    inputs: [fanout]\n    options: {options}\n"),
            )
            .replace("stages: [fanout, push]", &format!("stages: [fanout, push, {stage}]"))
            .replace(TOKEN_FILE, &apns_token_file(&dir).display().to_string());
        let path = dir.join("pipeline-offline-push.yaml");
        std::fs::write(&path, text).expect("write pipeline");
        cfg.pipeline = path;
        std::fs::write(apns_token_file(&dir), format!("{APNS_TOKEN}\n")).expect("token file");
        if let Some(k) = cfg.kafka.as_mut() {
            k.dead_letter_topic = format!("dead-{}", common::unique());
        }
    }
}

/// The three providers at `url`; the APNs token file is in the test
/// server's own directory (`TOKEN_FILE` is replaced when the pipeline is
/// written there), so it goes when the test does.
fn providers(url: &str, fcm_path: &str) -> String {
    format!(
        "{{fcm: {{shape: fcm, url: '{url}{fcm_path}', token_env: IMFLOW_TEST_FCM_TOKEN}}, \
           apns: {{shape: apns, url: '{url}/apns', topic: com.example.chat, token_file: '{TOKEN_FILE}'}}, \
           relay: {{shape: generic, url: '{url}/relay', secret: {SECRET}}}}}"
    )
}

const TOKEN_FILE: &str = "@apns-token-file@";

/// Where the test server in `dir` keeps the APNs provider token, as a
/// sidecar would.
fn apns_token_file(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("apns-token")
}

/// The FCM token's variable, set once for every test of this file.
fn fcm_token_in_env() {
    static SET: std::sync::Once = std::sync::Once::new();
    SET.call_once(|| std::env::set_var("IMFLOW_TEST_FCM_TOKEN", FCM_TOKEN));
}

async fn wait_for(seen: &mut watch::Receiver<Seen>, what: &str, done: impl Fn(&Seen) -> bool) {
    tokio::time::timeout(PATIENCE * 3, seen.wait_for(|s| done(s)))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("receiver alive");
}

async fn wait_metric(s: &TestServer, name: &str, label: &str, at_least: f64) {
    tokio::time::timeout(PATIENCE, async {
        while s.metric(name, label).await < at_least {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{name}{{{label}}} never reached {at_least}"));
}

async fn device(s: &TestServer, user: &str, platform: u8, provider: &str, token: &str) {
    let t = s.token(user, platform).await;
    let (status, v) = s
        .call(
            "PUT",
            &t,
            &format!("/users/me/devices/{platform}"),
            Some(json!({"push_token": token, "provider": provider})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
}

async fn mute(s: &TestServer, user: &str, conversation: &str, muted: bool) {
    let t = s.token(user, 1).await;
    let (status, v) = s
        .call(
            "PUT",
            &t,
            &format!("/conversations/{conversation}/settings"),
            Some(json!({"muted": muted})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
}

fn triple(provider: &str, token: &str, text: &str) -> (String, String, String) {
    (provider.into(), token.into(), text.into())
}

#[tokio::test]
async fn offline_users_are_notified_through_their_provider_and_online_or_muted_ones_are_not() {
    const STAGE: &str = "offline_a";
    fcm_token_in_env();
    let (_receiver, mut seen, url) = receiver(false).await;
    let s = TestServer::start_with(start_with_offline_push(
        STAGE,
        format!("{{providers: {}, preview: true}}", providers(&url, "/fcm")),
    ))
    .await;
    s.register(&["alice", "bob", "carol", "dave", "erin"]).await;
    device(&s, "bob", 2, "fcm", "bob-phone").await;
    device(&s, "carol", 1, "apns", "carol-phone").await;
    device(&s, "dave", 2, "relay", "dave-phone").await;
    device(&s, "erin", 2, "fcm", "erin-phone").await;
    mute(&s, "dave", "si_alice_dave", true).await;
    let mut alice = s.connect("alice", 1).await;
    let mut erin = s.connect("erin", 2).await;

    for to in ["bob", "carol", "dave", "erin"] {
        let ack = alice
            .send_text(
                Target::User(to),
                &format!("first-{to}"),
                &format!("hi {to}"),
            )
            .await;
        alice.stored(&ack).await;
    }
    erin.pushed_chat(1).await;
    // Alice, online, is among the recipients of all four; Erin of hers:
    // five recipients seen online means Erin's delivery was looked at.
    let online = format!("stage=\"{STAGE}\",reason=\"online\"");
    wait_metric(&s, "imflow_offline_push_skipped_total", &online, 5.0).await;
    let muted = format!("stage=\"{STAGE}\",reason=\"muted\"");
    wait_metric(&s, "imflow_offline_push_skipped_total", &muted, 1.0).await;
    wait_for(&mut seen, "Bob's and Carol's notifications", |s| {
        s.taken().len() >= 2
    })
    .await;

    // Erin goes offline, Dave unmutes: now both are notified.
    drop(erin);
    let alice_token = s.token("alice", 1).await;
    tokio::time::timeout(PATIENCE, async {
        while s
            .call("GET", &alice_token, "/users/erin/presence", None)
            .await
            .1["online"]
            != false
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("Erin seen offline");
    mute(&s, "dave", "si_alice_dave", false).await;
    for to in ["erin", "dave"] {
        let ack = alice
            .send_text(
                Target::User(to),
                &format!("second-{to}"),
                &format!("again {to}"),
            )
            .await;
        alice.stored(&ack).await;
    }
    wait_for(&mut seen, "four notifications", |s| s.taken().len() >= 4).await;

    let got = seen.borrow();
    assert_eq!(
        got.taken(),
        [
            triple("apns", "carol-phone", "hi carol"),
            triple("fcm", "bob-phone", "hi bob"),
            triple("fcm", "erin-phone", "again erin"),
            triple("relay", "dave-phone", "again dave"),
        ],
        "one notification per offline, unmuted recipient; none for the online or muted one"
    );
    for r in &got.requests {
        match r.provider {
            "fcm" => {
                assert_eq!(r.authorization, format!("Bearer {FCM_TOKEN}"));
                assert_eq!(r.body["message"]["notification"]["title"], "alice");
                assert_eq!(r.body["message"]["data"]["sender"], "alice");
                assert!(
                    r.body["message"]["data"]["seq"].is_string(),
                    "FCM data values are strings"
                );
            }
            "apns" => {
                assert_eq!(r.authorization, format!("Bearer {APNS_TOKEN}"));
                assert_eq!(r.apns_topic, "com.example.chat");
                assert_eq!(r.body["conversation_id"], "si_alice_carol");
                assert_eq!(r.body["aps"]["thread-id"], "si_alice_carol");
            }
            _ => {
                let n = &r.body["notifications"][0];
                assert_eq!(r.body["event"], "notification");
                assert_eq!(
                    (n["user_id"].as_str(), n["platform"].as_u64()),
                    (Some("dave"), Some(2))
                );
                assert_eq!(n["conversation_id"], "si_alice_dave");
            }
        }
    }
    assert!(
        got.requests.iter().all(|r| r.status == 200),
        "no request refused"
    );
}

#[tokio::test]
async fn a_provider_away_for_a_while_gets_every_notification_and_a_gone_token_is_a_dead_letter() {
    const STAGE: &str = "offline_b";
    fcm_token_in_env();
    let (receiver, mut seen, url) = receiver(true).await;
    let mut s = TestServer::start_with(start_with_offline_push(
        STAGE,
        format!(
            "{{providers: {}, preview: true, batch: 3, max_attempts: 1000, retry_first_ms: 10, retry_cap_ms: 50}}",
            providers(&url, "/fcm")
        ),
    ))
    .await;
    s.register(&["alice", "bob", "carol"]).await;
    device(&s, "bob", 2, "relay", "bob-phone").await;
    device(&s, "carol", 2, "fcm", "gone").await;
    let mut alice = s.connect("alice", 1).await;

    for i in 0..5 {
        let ack = alice
            .send_text(Target::User("bob"), &format!("b{i}"), &format!("m{i}"))
            .await;
        alice.stored(&ack).await;
    }
    wait_for(&mut seen, "refusals while down", |s| {
        s.refused("relay") >= 3
    })
    .await;
    assert!(seen.borrow().taken().is_empty());
    *receiver.relay_down.lock().expect("mood") = false;
    // At least once: a POST that timed out may have been taken too.
    let distinct = |s: &Seen| {
        let mut t = s.taken();
        t.dedup();
        t
    };
    wait_for(&mut seen, "all five of Bob's", |s| distinct(s).len() >= 5).await;
    let expected: Vec<_> = (0..5)
        .map(|i| triple("relay", "bob-phone", &format!("m{i}")))
        .collect();
    assert_eq!(distinct(&seen.borrow()), expected);

    // The APNs token a sidecar keeps has expired (403): retried, not
    // given up on, and sent once the file holds a fresh one.
    std::fs::write(apns_token_file(s.dir.path()), "expired-jwt\n").expect("token file");
    s.register(&["erin"]).await;
    device(&s, "erin", 1, "apns", "erin-phone").await;
    let ack = alice.send_text(Target::User("erin"), "e0", "hi erin").await;
    alice.stored(&ack).await;
    wait_for(&mut seen, "refusals of the expired token", |s| {
        s.refused("apns") >= 2
    })
    .await;
    std::fs::write(apns_token_file(s.dir.path()), format!("{APNS_TOKEN}\n")).expect("token file");
    wait_for(&mut seen, "Erin's notification", |s| {
        s.taken().contains(&triple("apns", "erin-phone", "hi erin"))
    })
    .await;

    // FCM says Carol's token is unregistered (404): no point in asking
    // again, it is a dead letter at once.
    let ack = alice.send_text(Target::User("carol"), "c0", "lost?").await;
    alice.stored(&ack).await;
    let dead = format!("stage=\"{STAGE}\"");
    wait_metric(&s, "imflow_offline_push_dead_lettered_total", &dead, 1.0).await;
    let letters = s.dead_letters(STAGE, 1).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let note: Value = serde_json::from_str(&letters[0].body).expect("the notification");
    assert_eq!(
        (
            letters[0].conversation_id.as_str(),
            note["push_token"].as_str(),
            note["user_id"].as_str(),
            letters[0].attempts,
            letters[0].error.as_str()
        ),
        (
            "si_alice_carol",
            Some("gone"),
            Some("carol"),
            1,
            "HTTP 404 Not Found"
        )
    );
}

#[tokio::test]
async fn a_provider_that_never_recovers_yields_a_dead_letter_after_max_attempts() {
    const STAGE: &str = "offline_c";
    fcm_token_in_env();
    let (_receiver, seen, url) = receiver(false).await;
    let mut s = TestServer::start_with(start_with_offline_push(
        STAGE,
        format!(
            "{{providers: {}, max_attempts: 3, retry_first_ms: 10, retry_cap_ms: 20}}",
            providers(&url, "/fcm")
        ),
    ))
    .await;
    s.register(&["alice", "dave"]).await;
    device(&s, "dave", 2, "fcm", "broken").await;
    let mut alice = s.connect("alice", 1).await;
    for i in 0..2 {
        let ack = alice
            .send_text(Target::User("dave"), &format!("d{i}"), "hello")
            .await;
        alice.stored(&ack).await;
    }
    let dead = format!("stage=\"{STAGE}\"");
    wait_metric(&s, "imflow_offline_push_dead_lettered_total", &dead, 2.0).await;
    let mut letters = s.dead_letters(STAGE, 2).await;
    // Sent side by side: they fail in either order.
    letters.sort_by_key(|l| l.seq);
    let seqs: Vec<(u64, u32, &str)> = letters
        .iter()
        .map(|l| (l.seq, l.attempts, l.error.as_str()))
        .collect();
    assert_eq!(
        seqs,
        [
            (1, 3, "HTTP 500 Internal Server Error"),
            (2, 3, "HTTP 500 Internal Server Error")
        ],
        "each tried three times, and the conversation moved on"
    );
    assert!(seen.borrow().refused("fcm") >= 6);
}
