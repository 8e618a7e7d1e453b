//! PROTOCOL.md, end to end, over real sockets against a real server.

mod common;

use common::{send_frame, seqs_of, Target, TestServer};
use futures::future::join_all;
use serde_json::{json, Value};

#[tokio::test]
async fn single_chat_reaches_every_connection_of_both_users_in_seq_order() {
    let s = TestServer::start().await;
    s.register(&["alice", "bob"]).await;
    let mut a1 = s.connect("alice", 1).await;
    let mut a2 = s.connect("alice", 5).await;
    let mut b1 = s.connect("bob", 2).await;
    let mut b2 = s.connect("bob", 3).await;

    // Pipelined: every send goes out before any ack is read.
    let n = 30;
    for i in 0..n {
        a1.send_json(&{
            let mut f = send_frame(Target::User("bob"), &format!("c{i}"), &format!("hello {i}"));
            f["rid"] = json!(format!("x{i}"));
            f
        })
        .await;
    }
    let mut acks = Vec::new();
    for i in 0..n {
        let ack = a1.next_where(|f| f["rid"] == json!(format!("x{i}"))).await;
        assert_eq!(ack["op"], "ack", "{ack}");
        assert_eq!(ack["conversation_id"], "si_alice_bob");
        acks.push(ack);
    }
    let expected: Vec<u64> = (1..=n as u64).collect();
    for c in [&mut a1, &mut a2, &mut b1, &mut b2] {
        let got = c.pushed(n).await;
        assert_eq!(
            seqs_of(&got, "si_alice_bob"),
            expected,
            "every connection sees 1..n in order"
        );
        for (i, m) in got.iter().enumerate() {
            assert_eq!(m["client_msg_id"], format!("c{i}"));
            assert_eq!(m["server_msg_id"], acks[i]["server_msg_id"]);
            assert_eq!(m["sender"], "alice");
            assert_eq!(m["recv_id"], "bob");
            assert_eq!(m["content"]["text"], format!("hello {i}"));
        }
    }
    // A reply in the other direction continues the same conversation.
    let ack = b2.send_text(Target::User("alice"), "r1", "hi back").await;
    assert_eq!(ack["op"], "ack");
    let m = a2.pushed(1).await;
    assert_eq!(m[0]["seq"], n as u64 + 1);
}

#[tokio::test]
async fn a_sender_hears_each_ack_before_its_own_message_comes_back() {
    let s = TestServer::start().await;
    s.register(&["alice", "bob"]).await;
    let mut a = s.connect("alice", 1).await;
    // More than tokio's per-task budget (128) of acks can finish at once.
    let n = 300;
    for i in 0..n {
        a.send_json(&send_frame(Target::User("bob"), &format!("c{i}"), "hi"))
            .await;
    }
    // Every frame in arrival order, until each message's ack and push came.
    let mut acked = std::collections::HashSet::new();
    let mut pushed = 0;
    while acked.len() < n || pushed < n {
        let f = a.read_frame().await.expect("connection open");
        match f["op"].as_str() {
            Some("ack") => {
                acked.insert(f["server_msg_id"].as_str().expect("id").to_string());
            }
            Some("push") => {
                for m in f["messages"].as_array().expect("messages") {
                    let id = m["server_msg_id"].as_str().expect("id");
                    assert!(acked.contains(id), "{id} pushed before its ack: {f}");
                    pushed += 1;
                }
            }
            _ => panic!("unexpected frame {f}"),
        }
    }
}

#[tokio::test]
async fn a_group_of_200_with_50_online_gets_every_message_in_order() {
    let s = TestServer::start().await;
    let users: Vec<String> = (0..200).map(|i| format!("u{i}")).collect();
    let refs: Vec<&str> = users.iter().map(String::as_str).collect();
    s.register(&refs).await;
    let owner_token = s.token("u0", 1).await;
    let (st, v) = s
        .call(
            "POST",
            &owner_token,
            "/groups",
            Some(json!({"group_id": "big", "name": "Big", "members": &users[1..]})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["group_id"], "big");
    let (st, v) = s
        .call(
            "GET",
            &owner_token,
            "/groups/big/members?offset=0&limit=1000",
            None,
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(v["total"], 200);

    let mut online = join_all((0..50).map(|i| s.connect(&users[i * 4], 1))).await;
    let per_sender = 10;
    let senders = 5;
    for round in 0..per_sender {
        for (k, sender) in online.iter_mut().take(senders).enumerate() {
            let f = send_frame(Target::Group("big"), &format!("g{k}-{round}"), "hey all");
            sender.send_json(&f).await;
        }
    }
    let total = per_sender * senders;
    // Seq 1 is the "group created" notification (PROTOCOL v2).
    let expected: Vec<u64> = (2..=total as u64 + 1).collect();
    for c in online.iter_mut() {
        let got = c.pushed_chat(total).await;
        assert_eq!(seqs_of(&got, "sg_big"), expected);
        assert!(got
            .iter()
            .all(|m| m["group_id"] == "big" && m.get("recv_id").is_none()));
    }
    // Per-sender order is kept inside the conversation order.
    let got = {
        let mut c = s.connect("u7", 1).await;
        let r = c
            .request(
                json!({"op": "pull", "conversation_id": "sg_big", "from_seq": 1, "to_seq": 1000}),
            )
            .await;
        r["messages"].as_array().unwrap().clone()
    };
    for k in 0..senders {
        let mine: Vec<String> = got
            .iter()
            .filter(|m| {
                m["client_msg_id"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("g{k}-"))
            })
            .map(|m| m["client_msg_id"].as_str().unwrap().to_string())
            .collect();
        let want: Vec<String> = (0..per_sender).map(|r| format!("g{k}-{r}")).collect();
        assert_eq!(mine, want);
    }
}

#[tokio::test]
async fn an_offline_user_catches_up_by_sync_and_pull() {
    let s = TestServer::start().await;
    s.register(&["alice", "bob", "carol"]).await;
    let mut a = s.connect("alice", 1).await;
    let mut last = Value::Null;
    for i in 0..5 {
        last = a
            .send_text(Target::User("bob"), &format!("m{i}"), &format!("t{i}"))
            .await;
        assert_eq!(last["op"], "ack");
    }
    assert_eq!(a.stored(&last).await, 5);
    let t = s.token("alice", 2).await;
    s.call(
        "POST",
        &t,
        "/groups",
        Some(json!({"group_id": "team", "name": "T", "members": ["bob"]})),
    )
    .await;
    let ack = a.send_text(Target::Group("team"), "g1", "group hi").await;
    assert_eq!(ack["op"], "ack");
    // After the "group created" notification.
    assert_eq!(a.stored(&ack).await, 2);

    let mut b = s.connect("bob", 1).await;
    let sync = b.request(json!({"op": "sync"})).await;
    assert_eq!(sync["op"], "sync");
    let mut convs: Vec<Value> = sync["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            json!({"conversation_id": c["conversation_id"], "max_seq": c["max_seq"], "read_seq": c["read_seq"]})
        })
        .collect();
    convs.sort_by_key(|c| c["conversation_id"].as_str().unwrap().to_string());
    assert_eq!(
        convs,
        vec![
            json!({"conversation_id": "sg_team", "max_seq": 2, "read_seq": 0}),
            json!({"conversation_id": "si_alice_bob", "max_seq": 5, "read_seq": 0}),
        ]
    );
    let r = b
        .request(
            json!({"op": "pull", "conversation_id": "si_alice_bob", "from_seq": 1, "to_seq": 5}),
        )
        .await;
    assert_eq!(r["op"], "messages");
    let msgs = r["messages"].as_array().unwrap();
    assert_eq!(seqs_of(msgs, "si_alice_bob"), vec![1, 2, 3, 4, 5]);
    assert_eq!(msgs[4]["content"]["text"], "t4");
    // A range beyond the end returns what exists.
    let r = b
        .request(
            json!({"op": "pull", "conversation_id": "si_alice_bob", "from_seq": 4, "to_seq": 100}),
        )
        .await;
    assert_eq!(
        seqs_of(r["messages"].as_array().unwrap(), "si_alice_bob"),
        vec![4, 5]
    );
    // The same over REST.
    let tb = s.token("bob", 3).await;
    let (st, v) = s.call("GET", &tb, "/conversations", None).await;
    assert_eq!(st, 200);
    assert_eq!(v["conversations"].as_array().unwrap().len(), 2);
    let (st, v) = s
        .call(
            "GET",
            &tb,
            "/conversations/si_alice_bob/messages?from_seq=2&to_seq=3",
            None,
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(
        seqs_of(v["messages"].as_array().unwrap(), "si_alice_bob"),
        vec![2, 3]
    );
    // carol has nothing.
    let mut c = s.connect("carol", 1).await;
    assert_eq!(
        c.request(json!({"op": "sync"})).await["conversations"],
        json!([])
    );
}

#[tokio::test]
async fn a_resend_gets_the_first_messages_id_and_creates_nothing() {
    let s = TestServer::start().await;
    s.register(&["alice", "bob"]).await;
    let mut a = s.connect("alice", 1).await;
    let first = a.send_text(Target::User("bob"), "same", "once").await;
    let again = a.send_text(Target::User("bob"), "same", "once").await;
    assert_eq!(again["op"], "ack");
    assert_eq!(again["server_msg_id"], first["server_msg_id"]);
    assert_eq!(again["send_time"], first["send_time"]);

    // Concurrent resends: all answered with one id, one message stored.
    let frame = send_frame(Target::User("bob"), "burst", "x");
    for i in 0..5 {
        let mut f = frame.clone();
        f["rid"] = json!(format!("b{i}"));
        a.send_json(&f).await;
    }
    let mut ids = Vec::new();
    for i in 0..5 {
        let ack = a.next_where(|f| f["rid"] == json!(format!("b{i}"))).await;
        assert_eq!(ack["op"], "ack", "{ack}");
        ids.push(ack["server_msg_id"].clone());
    }
    assert!(ids.iter().all(|x| *x == ids[0]), "{ids:?}");

    // REST resend of a WebSocket message too.
    let t = s.token("alice", 2).await;
    let (st, v) = s
        .call("POST", &t, "/msg/send", Some(json!({"client_msg_id": "same", "recv_id": "bob", "content_type": 101, "content": {"text": "once"}})))
        .await;
    assert_eq!(st, 200);
    assert_eq!(v["server_msg_id"], first["server_msg_id"]);

    let burst = json!({"server_msg_id": ids[0]});
    assert_eq!(a.stored(&burst).await, 2);
    let r = a
        .request(
            json!({"op": "pull", "conversation_id": "si_alice_bob", "from_seq": 1, "to_seq": 100}),
        )
        .await;
    assert_eq!(
        seqs_of(r["messages"].as_array().unwrap(), "si_alice_bob"),
        vec![1, 2]
    );
}

#[tokio::test]
async fn read_seq_reaches_the_users_other_devices() {
    let s = TestServer::start().await;
    s.register(&["alice", "bob"]).await;
    let mut a = s.connect("alice", 1).await;
    let mut b_phone = s.connect("bob", 2).await;
    let mut b_desk = s.connect("bob", 3).await;
    for i in 0..3 {
        a.send_text(Target::User("bob"), &format!("m{i}"), "x")
            .await;
    }
    b_phone.pushed(3).await;
    let ok = b_phone
        .request(json!({"op": "read", "conversation_id": "si_alice_bob", "seq": 2}))
        .await;
    assert_eq!(ok["op"], "ok");
    let note = b_desk.next_where(|f| f["op"] == "read").await;
    assert_eq!(note["conversation_id"], "si_alice_bob");
    assert_eq!(note["seq"], 2);
    let sync = b_desk.request(json!({"op": "sync"})).await;
    assert_eq!(sync["conversations"][0]["read_seq"], 2);
    // Never backwards.
    b_desk
        .request(json!({"op": "read", "conversation_id": "si_alice_bob", "seq": 1}))
        .await;
    let sync = b_phone.request(json!({"op": "sync"})).await;
    assert_eq!(sync["conversations"][0]["read_seq"], 2);
    // REST read: the devices hear of it.
    let t = s.token("bob", 4).await;
    let (st, _) = s
        .call(
            "POST",
            &t,
            "/conversations/si_alice_bob/read",
            Some(json!({"seq": 3})),
        )
        .await;
    assert_eq!(st, 200);
    let note = b_phone
        .next_where(|f| f["op"] == "read" && f["seq"] == 3)
        .await;
    assert_eq!(note["conversation_id"], "si_alice_bob");
}

#[tokio::test]
async fn logout_kicks_and_revokes_and_a_same_platform_login_replaces() {
    let s = TestServer::start().await;
    s.register(&["alice"]).await;
    let old_token = s.token("alice", 1).await;
    let mut first = s.connect_token(&old_token).await.unwrap();
    // A second login on the same platform kicks the first.
    let mut second = s.connect("alice", 1).await;
    let kick = first.next_where(|f| f["op"] == "kick").await;
    assert!(kick["reason"].is_string());
    assert!(
        first.read_frame().await.is_none(),
        "kicked connection is closed"
    );
    assert_eq!(second.request(json!({"op": "ping"})).await["op"], "pong");

    let mut web = s.connect("alice", 5).await;
    let (st, _) = s
        .admin("/auth/logout", json!({"user_id": "alice", "platform": 1}))
        .await;
    assert_eq!(st, 200);
    second.next_where(|f| f["op"] == "kick").await;
    assert!(second.read_frame().await.is_none());
    assert_eq!(
        web.request(json!({"op": "ping"})).await["op"],
        "pong",
        "other platforms stay"
    );
    match s.connect_token(&old_token).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status().as_u16(), 401),
        other => panic!(
            "revoked token must be refused with 401, got {:?}",
            other.map(|_| ())
        ),
    }
    let (st, _) = s.call("GET", &old_token, "/conversations", None).await;
    assert_eq!(st, 401);
    // Logout of every platform.
    s.admin("/auth/logout", json!({"user_id": "alice"})).await;
    web.next_where(|f| f["op"] == "kick").await;
    // A fresh token works.
    let mut again = s.connect("alice", 1).await;
    assert_eq!(again.request(json!({"op": "ping"})).await["op"], "pong");
}

#[tokio::test]
async fn a_restart_keeps_history_continues_seqs_and_remembers_resends() {
    let mut s = TestServer::start().await;
    s.register(&["alice", "bob"]).await;
    s.call(
        "POST",
        &s.token("alice", 1).await,
        "/groups",
        Some(json!({"group_id": "g", "name": "G", "members": ["bob"]})),
    )
    .await;
    let first = {
        let mut a = s.connect("alice", 1).await;
        let first = a.send_text(Target::User("bob"), "c1", "before").await;
        let second = a.send_text(Target::User("bob"), "c2", "before").await;
        let third = a.send_text(Target::Group("g"), "c3", "before").await;
        assert_eq!(a.stored(&second).await, 2);
        assert_eq!(a.stored(&third).await, 2, "after the group's creation");
        first
    };
    s.restart().await;
    let mut a = s.connect("alice", 1).await;
    let mut b = s.connect("bob", 1).await;
    let r = b
        .request(
            json!({"op": "pull", "conversation_id": "si_alice_bob", "from_seq": 1, "to_seq": 10}),
        )
        .await;
    assert_eq!(
        seqs_of(r["messages"].as_array().unwrap(), "si_alice_bob"),
        vec![1, 2]
    );
    let again = a.send_text(Target::User("bob"), "c1", "before").await;
    assert_eq!(
        again["server_msg_id"], first["server_msg_id"],
        "resend recognised after restart"
    );
    a.send_text(Target::User("bob"), "c4", "after").await;
    a.send_text(Target::Group("g"), "c5", "after").await;
    let got = b.pushed(2).await;
    assert_eq!(seqs_of(&got, "si_alice_bob"), vec![3]);
    assert_eq!(seqs_of(&got, "sg_g"), vec![3]);
    let sync = b.request(json!({"op": "sync"})).await;
    let max: Vec<(String, u64)> = sync["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["conversation_id"].as_str().unwrap().to_string(),
                c["max_seq"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(
        max.contains(&("si_alice_bob".into(), 3)) && max.contains(&("sg_g".into(), 3)),
        "{max:?}"
    );
}

fn code(f: &Value) -> &str {
    assert_eq!(f["op"], "error", "{f}");
    f["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn bad_input_gets_the_protocols_errors_and_the_connection_survives() {
    let s = TestServer::start().await;
    s.register(&["alice", "bob", "eve"]).await;
    for bad in ["nope", ""] {
        match s.connect_token(bad).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert_eq!(r.status().as_u16(), 401)
            }
            other => panic!(
                "bad token must be refused with 401, got {:?}",
                other.map(|_| ())
            ),
        }
    }
    let mut a = s.connect("alice", 1).await;
    a.send_raw("this is not json".into()).await;
    assert_eq!(
        code(&a.next_where(|f| f["op"] == "error").await),
        "bad_request"
    );
    let big = format!(r#"{{"op":"ping","pad":"{}"}}"#, "x".repeat(70_000));
    a.send_raw(big).await;
    assert_eq!(
        code(&a.next_where(|f| f["op"] == "error").await),
        "payload_too_large"
    );
    assert_eq!(
        a.request(json!({"op": "ping"})).await["op"],
        "pong",
        "connection kept"
    );
    assert_eq!(
        code(&a.request(json!({"op": "teleport"})).await),
        "bad_request"
    );
    assert_eq!(
        code(&a.send_text(Target::User("nobody"), "u1", "x").await),
        "not_found"
    );
    assert_eq!(
        code(&a.request(json!({"op": "send", "client_msg_id": "x"})).await),
        "bad_request"
    );
    let mut f = send_frame(Target::User("bob"), "n1", "x");
    f["content_type"] = json!(1001);
    assert_eq!(
        code(&a.request(f).await),
        "bad_request",
        "notifications are server-only"
    );
    let mut f = send_frame(Target::User("bob"), "n2", "x");
    f["content"] = json!({"text": "y".repeat(17_000)});
    assert_eq!(code(&a.request(f).await), "payload_too_large");

    // Groups: outsiders may neither send nor pull.
    let tb = s.token("bob", 1).await;
    s.call(
        "POST",
        &tb,
        "/groups",
        Some(json!({"group_id": "club", "name": "C", "members": []})),
    )
    .await;
    assert_eq!(
        code(&a.send_text(Target::Group("club"), "g1", "x").await),
        "forbidden"
    );
    assert_eq!(
        code(&a.send_text(Target::Group("nogroup"), "g2", "x").await),
        "not_found"
    );
    let r = a
        .request(json!({"op": "pull", "conversation_id": "sg_club", "from_seq": 1, "to_seq": 5}))
        .await;
    assert_eq!(code(&r), "forbidden");
    // An outsider cannot read someone else's single chat.
    let mut b = s.connect("bob", 2).await;
    b.send_text(Target::User("eve"), "p1", "private").await;
    let r = a
        .request(json!({"op": "pull", "conversation_id": "si_bob_eve", "from_seq": 1, "to_seq": 5}))
        .await;
    assert_eq!(code(&r), "forbidden");
    let ta = s.token("alice", 2).await;
    let (st, v) = s
        .call(
            "GET",
            &ta,
            "/conversations/si_bob_eve/messages?from_seq=1&to_seq=5",
            None,
        )
        .await;
    assert_eq!((st, v["code"].as_str()), (403, Some("forbidden")));
    let r = a
        .request(
            json!({"op": "pull", "conversation_id": "si_alice_bob", "from_seq": 1, "to_seq": 1002}),
        )
        .await;
    assert_eq!(code(&r), "bad_request", "at most 1000 apart");
    assert_eq!(a.request(json!({"op": "ping"})).await["op"], "pong");
}

#[tokio::test]
async fn rest_refuses_what_it_must() {
    let s = TestServer::start().await;
    s.register(&["alice", "bob", "carol", "dave"]).await;
    let r = s
        .http
        .post(format!("{}/auth/register", s.api))
        .json(&json!({"users": [{"user_id": "mallory"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = s
        .http
        .post(format!("{}/auth/token", s.api))
        .header("X-Admin-Secret", "wrong")
        .json(&json!({"user_id": "alice", "platform": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "unauthorized");
    let (st, _) = s
        .admin("/auth/token", json!({"user_id": "ghost", "platform": 1}))
        .await;
    assert_eq!(st, 404);
    let (st, _) = s
        .admin("/auth/token", json!({"user_id": "alice", "platform": 12}))
        .await;
    assert_eq!(st, 400);
    let (st, _) = s
        .admin("/auth/register", json!({"users": [{"user_id": "bad_id"}]}))
        .await;
    assert_eq!(st, 400);
    let (st, v) = s
        .admin(
            "/auth/register",
            json!({"users": [{"user_id": "alice", "nickname": "Al"}]}),
        )
        .await;
    assert_eq!((st, v["registered"].as_u64()), (200, Some(1)));
    let (st, _) = s.call("GET", "garbage", "/conversations", None).await;
    assert_eq!(st, 401);

    let ta = s.token("alice", 1).await;
    let tb = s.token("bob", 1).await;
    let tc = s.token("carol", 1).await;
    assert_eq!(s.create_group(&ta, "g1", &["bob", "carol"]).await, 201);
    let (st, v) = s
        .call(
            "POST",
            &tb,
            "/groups",
            Some(json!({"group_id": "g1", "name": "again", "members": []})),
        )
        .await;
    assert_eq!((st, v["code"].as_str()), (409, Some("conflict")));
    let (st, _) = s
        .call(
            "POST",
            &ta,
            "/groups",
            Some(json!({"name": "G", "members": ["ghost"]})),
        )
        .await;
    assert_eq!(st, 404);
    // Only owner/admins add; only the owner sets roles.
    let (st, _) = s
        .call(
            "POST",
            &tb,
            "/groups/g1/members",
            Some(json!({"user_ids": ["dave"]})),
        )
        .await;
    assert_eq!(st, 403);
    let (st, _) = s
        .call(
            "PUT",
            &tb,
            "/groups/g1/members/carol/role",
            Some(json!({"role": "admin"})),
        )
        .await;
    assert_eq!(st, 403);
    let (st, _) = s
        .call(
            "PUT",
            &ta,
            "/groups/g1/members/bob/role",
            Some(json!({"role": "admin"})),
        )
        .await;
    assert_eq!(st, 200);
    let (st, v) = s
        .call(
            "POST",
            &tb,
            "/groups/g1/members",
            Some(json!({"user_ids": ["dave", "carol"]})),
        )
        .await;
    assert_eq!((st, v["added"].as_u64()), (200, Some(1)));
    let (st, v) = s
        .call("GET", &tc, "/groups/g1/members?offset=1&limit=2", None)
        .await;
    assert_eq!(st, 200);
    assert_eq!(v["total"], 4);
    assert_eq!(v["members"].as_array().unwrap().len(), 2);
    let (_, v) = s.call("GET", &tc, "/groups/g1/members", None).await;
    let roles: Vec<(String, String)> = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["user_id"].as_str().unwrap().into(),
                m["role"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(roles.contains(&("alice".into(), "owner".into())));
    assert!(roles.contains(&("bob".into(), "admin".into())));
    // An admin cannot remove the owner or another admin; the owner cannot leave.
    let (st, _) = s
        .call("DELETE", &tb, "/groups/g1/members/alice", None)
        .await;
    assert_eq!(st, 403);
    let (st, _) = s
        .call("DELETE", &ta, "/groups/g1/members/alice", None)
        .await;
    assert_eq!(st, 409);
    let (st, _) = s.call("DELETE", &tc, "/groups/g1/members/dave", None).await;
    assert_eq!(st, 403, "a member cannot remove others");
    let (st, _) = s.call("DELETE", &tb, "/groups/g1/members/dave", None).await;
    assert_eq!(st, 200);
    let (st, _) = s
        .call("DELETE", &tc, "/groups/g1/members/carol", None)
        .await;
    assert_eq!(st, 200, "a member may leave");
    let (st, _) = s.call("GET", &tc, "/groups/g1/members", None).await;
    assert_eq!(st, 403, "after leaving, the member list is closed");
    let (st, _) = s
        .call("POST", &tc, "/msg/send", Some(json!({"client_msg_id": "x", "group_id": "g1", "content_type": 101, "content": {"text": "hi"}})))
        .await;
    assert_eq!(st, 403);
    let (st, _) = s
        .call(
            "POST",
            &ta,
            "/msg/send",
            Some(json!({"client_msg_id": "x", "recv_id": "bob"})),
        )
        .await;
    assert_eq!(st, 400);
    let (st, _) = s.call("GET", &ta, "/groups/nope/members", None).await;
    assert_eq!(st, 404);
    let r = s
        .http
        .get(format!("{}/healthz", s.api))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let metrics = s
        .http
        .get(format!("{}/metrics", s.api))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("imflow_edge_queue_depth"), "{metrics}");
}

#[tokio::test]
async fn a_client_over_its_rate_limit_is_told_so_and_recovers() {
    let s = TestServer::start_with(|c| {
        c.websocket.rate_limit_per_sec = 1;
        c.websocket.rate_limit_burst = 3;
    })
    .await;
    s.register(&["alice"]).await;
    let mut a = s.connect("alice", 1).await;
    for i in 0..6 {
        a.send_json(&json!({"op": "ping", "rid": format!("p{i}")}))
            .await;
    }
    let mut codes = Vec::new();
    for i in 0..6 {
        let f = a.next_where(|f| f["rid"] == json!(format!("p{i}"))).await;
        codes.push(
            f["op"].as_str().unwrap_or("").to_string() + ":" + f["code"].as_str().unwrap_or(""),
        );
    }
    assert_eq!(&codes[..3], ["pong:", "pong:", "pong:"]);
    assert!(
        codes[3..].iter().all(|c| c == "error:rate_limited"),
        "{codes:?}"
    );
    // The bucket refills: the connection was kept.
    let pong = loop {
        let f = a.request(json!({"op": "ping"})).await;
        if f["op"] == "pong" {
            break f;
        }
        assert_eq!(code(&f), "rate_limited");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    };
    assert_eq!(pong["op"], "pong");
}
