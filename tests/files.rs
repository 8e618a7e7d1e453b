//! PROTOCOL v2 "Files" over real sockets, in both run modes: the bytes go
//! to the URL `POST /files` gives (the API itself in standalone, the garage
//! of script/infra.sh in cluster mode), a message names the file, its
//! readers download it and nobody else can; a file of another user, one
//! not uploaded in full, or one over the size limit is refused.

mod common;

use common::{Target, TestServer};
use serde_json::{json, Value};

const LIMIT: u64 = 64 * 1024;

async fn server() -> TestServer {
    TestServer::start_with(|cfg| cfg.max_file_bytes = LIMIT).await
}

/// An absolute URL for one the server gave (a path means the API's origin).
fn absolute(s: &TestServer, url: &str) -> String {
    if url.starts_with('/') {
        format!("{}{url}", s.api)
    } else {
        url.to_string()
    }
}

/// `POST /files` as `token`: (status, body).
async fn declare(s: &TestServer, token: &str, name: &str, size: u64) -> (u16, Value) {
    s.call(
        "POST",
        token,
        "/files",
        Some(json!({"name": name, "size": size, "content_type": "image/png"})),
    )
    .await
}

/// PUT `bytes` to an upload URL; the status.
async fn upload(s: &TestServer, url: &str, bytes: Vec<u8>) -> u16 {
    s.http
        .put(absolute(s, url))
        .header("content-type", "image/png")
        .body(bytes)
        .send()
        .await
        .expect("upload")
        .status()
        .as_u16()
}

/// `GET /files/{id}` as `token`, not following the redirect:
/// (status, Location).
async fn locate(s: &TestServer, token: &str, file_id: &str) -> (u16, Option<String>) {
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let r = no_redirects
        .get(format!("{}/files/{file_id}", s.api))
        .bearer_auth(token)
        .send()
        .await
        .expect("locate");
    let location = r
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (r.status().as_u16(), location)
}

fn file_message(file_id: &str, name: &str, size: u64) -> Value {
    json!({"file_id": file_id, "name": name, "size": size})
}

fn bytes_of(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

#[tokio::test]
async fn a_sent_file_is_downloaded_by_its_readers_and_refused_to_everyone_else() {
    let s = server().await;
    s.register(&["alice", "bob", "carol"]).await;
    let (alice_t, bob_t, carol_t) = (
        s.token("alice", 1).await,
        s.token("bob", 1).await,
        s.token("carol", 1).await,
    );
    let photo = bytes_of(40_000);
    let (status, declared) = declare(&s, &alice_t, "photo.png", photo.len() as u64).await;
    assert_eq!(status, 200, "{declared}");
    let file_id = declared["file_id"].as_str().expect("file_id").to_string();
    assert!(declared["expires_at"].as_i64().expect("expires_at") > 0);
    let url = declared["upload_url"].as_str().expect("upload_url");
    assert_eq!(upload(&s, url, photo.clone()).await, 200);

    // Nobody reads it before it is sent, not even in a conversation.
    assert_eq!(locate(&s, &bob_t, &file_id).await.0, 403);

    let mut alice = s.connect("alice", 1).await;
    let ack = alice
        .request(json!({"op": "send", "client_msg_id": "f1", "recv_id": "bob",
            "content_type": 102, "content": file_message(&file_id, "photo.png", photo.len() as u64)}))
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");
    alice.stored(&ack).await;

    for token in [&bob_t, &alice_t] {
        let (status, location) = locate(&s, token, &file_id).await;
        assert_eq!(status, 302);
        let got = s
            .http
            .get(absolute(&s, &location.expect("Location")))
            .send()
            .await
            .expect("download");
        assert_eq!(got.status(), 200);
        assert_eq!(
            got.bytes().await.expect("bytes").to_vec(),
            photo,
            "the bytes uploaded"
        );
    }
    let (status, location) = locate(&s, &carol_t, &file_id).await;
    assert_eq!((status, location), (403, None), "Carol reads neither side");
    assert_eq!(
        locate(&s, &carol_t, "0123456789abcdef0123456789abcdef")
            .await
            .0,
        403,
        "an id that names nothing gets the same answer: ids tell nothing"
    );
    assert_eq!(locate(&s, &carol_t, "..%2F..%2Fetc").await.0, 403);

    // Bob cannot send Alice's file, even to Alice.
    let mut bob = s.connect("bob", 1).await;
    let refused = bob
        .request(json!({"op": "send", "client_msg_id": "f2", "recv_id": "alice",
            "content_type": 102, "content": file_message(&file_id, "photo.png", photo.len() as u64)}))
        .await;
    assert_eq!(refused["code"], "bad_request", "{refused}");

    // Nor can Alice claim another size than the file has.
    let lie = alice
        .request(
            json!({"op": "send", "client_msg_id": "f3", "recv_id": "bob",
            "content_type": 102, "content": file_message(&file_id, "photo.png", 1)}),
        )
        .await;
    assert_eq!(lie["code"], "bad_request", "{lie}");

    if !common::cluster_mode() {
        // The embedded store's URLs: taken once, and only as signed.
        assert_eq!(upload(&s, url, photo.clone()).await, 409);
        let tampered = url.replace("sig=", "sig=00");
        assert_eq!(upload(&s, &tampered, photo.clone()).await, 403);
    }
}

#[tokio::test]
async fn a_member_who_joined_after_a_file_was_sent_cannot_download_it() {
    let s = server().await;
    s.register(&["alice", "bob", "dave"]).await;
    let (alice_t, bob_t, dave_t) = (
        s.token("alice", 1).await,
        s.token("bob", 1).await,
        s.token("dave", 1).await,
    );
    assert_eq!(s.create_group(&alice_t, "trip", &["bob"]).await, 201);
    let (_, declared) = declare(&s, &alice_t, "map.png", 2_000).await;
    let file_id = declared["file_id"].as_str().expect("file_id").to_string();
    let url = declared["upload_url"].as_str().expect("url");
    assert_eq!(upload(&s, url, bytes_of(2_000)).await, 200);
    let mut alice = s.connect("alice", 1).await;
    let ack = alice
        .request(
            json!({"op": "send", "client_msg_id": "g1", "group_id": "trip",
            "content_type": 102, "content": file_message(&file_id, "map.png", 2_000)}),
        )
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");
    let seq = alice.stored(&ack).await;

    let (status, _) = s
        .call(
            "POST",
            &alice_t,
            "/groups/trip/members",
            Some(json!({"user_ids": ["dave"]})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(locate(&s, &bob_t, &file_id).await.0, 302, "a member then");
    assert_eq!(
        locate(&s, &dave_t, &file_id).await.0,
        403,
        "dave reads the group only from the notice that added him"
    );

    // Revoked: its content is deleted, the file with it.
    let r = alice
        .request(json!({"op": "revoke", "conversation_id": "sg_trip", "seq": seq}))
        .await;
    assert_eq!(r["op"], "ok", "{r}");
    assert_eq!(
        locate(&s, &bob_t, &file_id).await.0,
        403,
        "gone with the message"
    );
}

#[tokio::test]
async fn a_file_not_uploaded_in_full_or_over_the_limit_is_refused() {
    let s = server().await;
    s.register(&["alice", "bob"]).await;
    let alice_t = s.token("alice", 1).await;
    let mut alice = s.connect("alice", 1).await;
    let send = |client_msg_id: &str, file_id: &str| {
        json!({"op": "send", "client_msg_id": client_msg_id, "recv_id": "bob",
            "content_type": 105, "content": file_message(file_id, "notes.txt", 100)})
    };

    // Declared, never uploaded.
    let (_, declared) = declare(&s, &alice_t, "notes.txt", 100).await;
    let never = declared["file_id"].as_str().expect("file_id").to_string();
    let r = alice.request(send("n1", &never)).await;
    assert_eq!(r["code"], "bad_request", "{r}");

    // Uploaded short: the embedded store refuses the PUT, an S3 store
    // keeps it; the send is refused either way.
    let (_, declared) = declare(&s, &alice_t, "notes.txt", 100).await;
    let short = declared["file_id"].as_str().expect("file_id").to_string();
    let status = upload(
        &s,
        declared["upload_url"].as_str().expect("url"),
        bytes_of(60),
    )
    .await;
    if !common::cluster_mode() {
        assert_eq!(status, 400);
    }
    let r = alice.request(send("n2", &short)).await;
    assert_eq!(r["code"], "bad_request", "{r}");

    // Longer than declared: refused at the door in standalone.
    let (_, declared) = declare(&s, &alice_t, "notes.txt", 100).await;
    let long = declared["file_id"].as_str().expect("file_id").to_string();
    let status = upload(
        &s,
        declared["upload_url"].as_str().expect("url"),
        bytes_of(101),
    )
    .await;
    if !common::cluster_mode() {
        assert_eq!(status, 413);
    }
    let r = alice.request(send("n3", &long)).await;
    assert_eq!(r["code"], "bad_request", "{r}");

    // An id nobody declared.
    let r = alice
        .request(send("n4", "0123456789abcdef0123456789abcdef"))
        .await;
    assert_eq!(r["code"], "bad_request", "{r}");

    // Over max_file_bytes, and nonsense.
    let (status, body) = declare(&s, &alice_t, "big.bin", LIMIT + 1).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (413, Some("payload_too_large"))
    );
    assert_eq!(declare(&s, &alice_t, "", 10).await.0, 400);
    assert_eq!(declare(&s, &alice_t, "empty", 0).await.0, 400);

    // A v1 client's own URL is still a valid picture message.
    let r = alice
        .send_text(Target::User("bob"), "v1", "text first")
        .await;
    alice.stored(&r).await;
    let v1 = alice
        .request(
            json!({"op": "send", "client_msg_id": "v1p", "recv_id": "bob",
            "content_type": 102, "content": {"url": "https://cdn.example.com/p.png"}}),
        )
        .await;
    assert_eq!(v1["op"], "ack", "{v1}");
}
