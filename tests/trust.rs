//! Bad input and strangers (issue "Trust", item 4), over real sockets: what
//! a careless or hostile client sends is refused with the protocol's error
//! and stores nothing; a client that holds a connection open without
//! finishing its request, or floods the API, is cut off. Runs in both modes
//! (script/test.sh sets IMFLOW_TEST_MODE=cluster for the second pass).

mod common;

use std::time::Duration;

use common::{Target, TestServer, PATIENCE};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn invalid_unicode_is_refused_in_every_content_type_over_both_doors() {
    let s = TestServer::start().await;
    s.register(&["alice", "bob"]).await;
    let mut a = s.connect("alice", 1).await;
    // Lone UTF-16 surrogates, escaped, inside otherwise valid JSON.
    let cases = [
        (110, r#"{"x":"\ud800"}"#),
        (110, r#"["a\udc00b"]"#),
        (101, r#"{"text":"\ud83d"}"#),
        (106, r#"{"text":"@b","user_ids":["bob"],"note":"\udfff"}"#),
    ];
    for (i, (t, content)) in cases.iter().enumerate() {
        let frame = format!(
            r#"{{"op":"send","rid":"u{i}","client_msg_id":"u{i}","recv_id":"bob","content_type":{t},"content":{content}}}"#
        );
        a.send_raw(frame).await;
        let r = a.next_where(|f| f["rid"] == json!(format!("u{i}"))).await;
        assert_eq!(r["code"], "bad_request", "ws {t} {content}: {r}");
        let body = format!(
            r#"{{"client_msg_id":"r{i}","recv_id":"bob","content_type":{t},"content":{content}}}"#
        );
        let token = s.token("alice", 2).await;
        let r = s
            .http
            .post(format!("{}/msg/send", s.api))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "rest {t} {content}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["code"], "bad_request");
    }
    // A rid that cannot be echoed is refused too, and the connection lives.
    a.send_raw(r#"{"op":"ping","rid":"\ud800"}"#.to_string())
        .await;
    let r = a.next_where(|f| f["op"] == "error").await;
    assert_eq!(r["code"], "bad_request", "{r}");
    assert!(r.get("rid").is_none(), "{r}");
    // Nothing was stored: a valid message gets seq 1.
    let ack = a.send_text(Target::User("bob"), "ok", "fine").await;
    assert_eq!(ack["op"], "ack", "{ack}");
    assert_eq!(a.stored(&ack).await, 1);
}

#[tokio::test]
async fn reading_a_chat_with_nobody_is_404_and_stores_nothing() {
    let s = TestServer::start().await;
    s.register(&["alice"]).await;
    let mut a = s.connect("alice", 1).await;
    for conv in ["si_alice_zed", "si_aaa_alice"] {
        let r = a
            .request(json!({"op": "read", "conversation_id": conv, "seq": 5}))
            .await;
        assert_eq!(r["code"], "not_found", "{conv}: {r}");
        let r = a
            .request(json!({"op": "pull", "conversation_id": conv, "from_seq": 1, "to_seq": 5}))
            .await;
        assert_eq!(r["code"], "not_found", "{conv}: {r}");
        let t = s.token("alice", 2).await;
        let (st, v) = s
            .call(
                "POST",
                &t,
                &format!("/conversations/{conv}/read"),
                Some(json!({"seq": 1})),
            )
            .await;
        assert_eq!(st, 404, "{v}");
    }
    let sync = a.request(json!({"op": "sync"})).await;
    assert_eq!(
        sync["conversations"].as_array().map(Vec::len),
        Some(0),
        "nothing entered alice's list: {sync}"
    );
}

/// A server with short HTTP deadlines and a small per-user rate.
async fn strict_server() -> TestServer {
    TestServer::start_with(|c| {
        c.rest.header_timeout_secs = 1;
        c.rest.rate_limit_per_sec = 5;
        c.rest.rate_limit_burst = 5;
        c.rest.max_connections = 64;
    })
    .await
}

/// Read until the server closes the connection (EOF or reset); how long it
/// took.
async fn until_closed(sock: &mut tokio::net::TcpStream) -> Duration {
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(PATIENCE, sock.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("the server kept the connection open for {PATIENCE:?}"),
        }
    }
}

#[tokio::test]
async fn a_client_that_never_finishes_its_request_is_cut_off() {
    let s = strict_server().await;
    let addr = s.api.trim_start_matches("http://").to_string();
    // Slowloris: a request head that never ends.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let took = until_closed(&mut slow).await;
    assert!(took < Duration::from_secs(5), "closed after {took:?}");
    // A connection that never sends a byte.
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    until_closed(&mut silent).await;
    // Meanwhile the server answers others.
    let r = s
        .http
        .get(format!("{}/healthz", s.api))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test]
async fn a_user_flooding_the_rest_api_is_told_to_slow_down_and_others_are_not() {
    let s = strict_server().await;
    s.register(&["alice", "bob"]).await;
    let a = s.token("alice", 1).await;
    let mut limited = 0;
    for _ in 0..30 {
        let (st, v) = s.call("GET", &a, "/conversations", None).await;
        if st == 429 {
            assert_eq!(v["code"], "rate_limited", "{v}");
            limited += 1;
        } else {
            assert_eq!(st, 200, "{v}");
        }
    }
    assert!(limited > 0, "30 calls at once were all served");
    let b = s.token("bob", 1).await;
    let (st, _) = s.call("GET", &b, "/conversations", None).await;
    assert_eq!(st, 200, "another user is not limited by alice's flood");
}

#[tokio::test]
async fn every_process_answers_metrics_with_its_own() {
    let s = TestServer::start().await;
    let text = s
        .http
        .get(format!("{}/metrics", s.api))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("process_resident_memory_bytes"),
        "process metrics: {}",
        &text[..text.len().min(500)]
    );
}
