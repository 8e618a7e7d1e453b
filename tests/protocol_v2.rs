//! PROTOCOL.md "Version 2 additions", over real sockets, in both run modes
//! (script/test.sh runs this file again with IMFLOW_TEST_MODE=cluster):
//! server notifications, history visibility, revoke, the conversation list,
//! group administration, users, blocks, devices, presence, typing and
//! receipts, each with the refusals the protocol names.

mod common;

use common::{send_frame, Client, Target, TestServer, PATIENCE};
use serde_json::{json, Value};

/// The next pushed message of `conversation` with `content_type`.
async fn pushed_of(c: &mut Client, conversation: &str, content_type: i64) -> Value {
    let f = c
        .next_where(|f| {
            f["op"] == "push"
                && f["messages"].as_array().is_some_and(|m| {
                    m.iter().any(|m| {
                        m["conversation_id"] == conversation && m["content_type"] == content_type
                    })
                })
        })
        .await;
    f["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["conversation_id"] == conversation && m["content_type"] == content_type)
        .unwrap()
        .clone()
}

async fn pull(c: &mut Client, conversation: &str, from: u64, to: u64) -> Value {
    c.request(
        json!({"op": "pull", "conversation_id": conversation, "from_seq": from, "to_seq": to}),
    )
    .await
}

fn seqs(r: &Value) -> Vec<u64> {
    r["messages"]
        .as_array()
        .map(|m| m.iter().map(|m| m["seq"].as_u64().unwrap()).collect())
        .unwrap_or_default()
}

async fn sync(c: &mut Client, extra: Value) -> Value {
    let mut f = json!({"op": "sync"});
    if let Value::Object(m) = extra {
        for (k, v) in m {
            f[k] = v;
        }
    }
    c.request(f).await
}

fn conv<'a>(sync: &'a Value, id: &str) -> Option<&'a Value> {
    sync["conversations"]
        .as_array()?
        .iter()
        .find(|c| c["conversation_id"] == id)
}

#[tokio::test]
async fn group_administration_writes_notifications_that_every_member_receives() {
    let s = TestServer::start().await;
    s.register(&["alice", "bob", "carol", "dave"]).await;
    let mut b = s.connect("bob", 1).await;
    let ta = s.token("alice", 2).await;
    assert_eq!(s.create_group(&ta, "club", &["bob", "carol"]).await, 201);
    // 1001 at seq 1, from alice, naming everyone.
    let n = pushed_of(&mut b, "sg_club", 1001).await;
    assert_eq!(n["seq"], 1);
    assert_eq!(n["sender"], "alice");
    assert_eq!(n["content"]["group_id"], "club");
    assert_eq!(n["content"]["name"], "club");
    let mut members: Vec<String> = n["content"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect();
    members.sort();
    assert_eq!(members, ["alice", "bob", "carol"]);

    let steps: Vec<(&str, &str, Option<Value>, i64, Value)> = vec![
        (
            "POST",
            "/groups/club/members",
            Some(json!({"user_ids": ["dave"]})),
            1002,
            json!({"user_ids": ["dave"]}),
        ),
        (
            "PUT",
            "/groups/club/members/bob/role",
            Some(json!({"role": "admin"})),
            1005,
            json!({"user_id": "bob", "role": "admin"}),
        ),
        (
            "PUT",
            "/groups/club",
            Some(json!({"name": "Club", "notice": "be kind"})),
            1006,
            json!({"name": "Club", "notice": "be kind"}),
        ),
        (
            "POST",
            "/groups/club/mute",
            Some(json!({"muted": true})),
            1007,
            json!({"muted": true}),
        ),
        (
            "POST",
            "/groups/club/mute",
            Some(json!({"muted": false})),
            1007,
            json!({"muted": false}),
        ),
        (
            "DELETE",
            "/groups/club/members/dave",
            None,
            1003,
            json!({"user_ids": ["dave"]}),
        ),
    ];
    let mut seq = 1;
    for (method, path, body, kind, content) in steps {
        let (st, v) = s.call(method, &ta, path, body).await;
        assert_eq!(st, 200, "{method} {path}: {v}");
        let n = pushed_of(&mut b, "sg_club", kind).await;
        seq += 1;
        assert_eq!(n["seq"], seq, "{kind}");
        assert_eq!(n["sender"], "alice", "{kind}");
        for (k, want) in content.as_object().unwrap() {
            assert_eq!(&n["content"][k], want, "{kind}: {n}");
        }
    }
    // Member mute: until a time in the future; 0 unmutes.
    let (st, _) = s
        .call(
            "POST",
            &ta,
            "/groups/club/members/carol/mute",
            Some(json!({"seconds": 60})),
        )
        .await;
    assert_eq!(st, 200);
    let n = pushed_of(&mut b, "sg_club", 1008).await;
    assert_eq!(n["content"]["user_id"], "carol");
    assert!(n["content"]["until"].as_i64().unwrap() > n["send_time"].as_i64().unwrap());
    // carol leaves on her own: 1004.
    let tc = s.token("carol", 2).await;
    let (st, _) = s
        .call("DELETE", &tc, "/groups/club/members/carol", None)
        .await;
    assert_eq!(st, 200);
    let n = pushed_of(&mut b, "sg_club", 1004).await;
    assert_eq!(
        (n["sender"].as_str(), n["content"]["user_id"].as_str()),
        (Some("carol"), Some("carol"))
    );
    // Ownership to bob: alice becomes an admin.
    let (st, _) = s
        .call(
            "POST",
            &ta,
            "/groups/club/transfer",
            Some(json!({"user_id": "bob"})),
        )
        .await;
    assert_eq!(st, 200);
    let n = pushed_of(&mut b, "sg_club", 1010).await;
    assert_eq!(
        (n["content"]["from"].as_str(), n["content"]["to"].as_str()),
        (Some("alice"), Some("bob"))
    );
    let tb = s.token("bob", 2).await;
    let (_, info) = s.call("GET", &tb, "/groups/club", None).await;
    assert_eq!(info["owner"], "bob");
    assert_eq!(info["name"], "Club");
    assert_eq!(info["notice"], "be kind");
    assert_eq!(info["member_count"], 2);
    assert_eq!(info["muted"], false);
    let (_, m) = s.call("GET", &tb, "/groups/club/members", None).await;
    let roles: Vec<(String, String)> = m["members"]
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
    assert!(
        roles.contains(&("alice".into(), "admin".into())),
        "{roles:?}"
    );
    // Dismissed by its owner: 1009, then no sends or member changes, but
    // the members still read the history.
    let (st, _) = s.call("DELETE", &ta, "/groups/club", None).await;
    assert_eq!(st, 403, "only the owner dismisses");
    let (st, _) = s.call("DELETE", &tb, "/groups/club", None).await;
    assert_eq!(st, 200);
    let n = pushed_of(&mut b, "sg_club", 1009).await;
    let last = n["seq"].as_u64().unwrap();
    let r = b.send_text(Target::Group("club"), "late", "anyone?").await;
    assert_eq!(r["code"], "dismissed", "{r}");
    let (st, v) = s
        .call(
            "POST",
            &tb,
            "/groups/club/members",
            Some(json!({"user_ids": ["dave"]})),
        )
        .await;
    assert_eq!((st, v["code"].as_str()), (410, Some("dismissed")));
    let r = pull(&mut b, "sg_club", 1, 100).await;
    assert_eq!(seqs(&r), (1..=last).collect::<Vec<_>>());
    assert!(r["messages"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["content_type"].as_i64().unwrap() >= 1000));
}

#[tokio::test]
async fn a_member_added_later_reads_from_the_notification_that_added_them() {
    let s = TestServer::start().await;
    s.register(&["alice", "bob", "carol"]).await;
    let ta = s.token("alice", 2).await;
    assert_eq!(s.create_group(&ta, "room", &["bob"]).await, 201);
    let mut a = s.connect("alice", 1).await;
    for i in 0..3 {
        let ack = a
            .send_text(Target::Group("room"), &format!("early{i}"), "before carol")
            .await;
        a.stored(&ack).await;
    }
    let mut c = s.connect("carol", 1).await;
    let (st, v) = s
        .call(
            "POST",
            &ta,
            "/groups/room/members",
            Some(json!({"user_ids": ["carol"]})),
        )
        .await;
    assert_eq!((st, v["added"].as_u64()), (200, Some(1)));
    let added = pushed_of(&mut c, "sg_room", 1002).await;
    assert_eq!(added["seq"], 5, "after 1001 and three messages");
    let ack = a.send_text(Target::Group("room"), "late", "hi carol").await;
    a.stored(&ack).await;
    let r = pull(&mut c, "sg_room", 1, 100).await;
    assert_eq!(seqs(&r), [5, 6], "carol reads from her 1002 on");
    let sy = sync(&mut c, json!({})).await;
    let room = conv(&sy, "sg_room").expect("the group is in carol's list");
    assert_eq!(room["min_seq"], 5);
    assert_eq!(room["max_seq"], 6);
    let sy = sync(&mut a, json!({})).await;
    assert_eq!(conv(&sy, "sg_room").unwrap()["min_seq"], 1);
    // Removed, she no longer reads nor sends, and the group leaves her list.
    let (st, _) = s
        .call("DELETE", &ta, "/groups/room/members/carol", None)
        .await;
    assert_eq!(st, 200);
    let gone = pushed_of(&mut c, "sg_room", 1003).await;
    assert_eq!(gone["content"]["user_ids"], json!(["carol"]));
    let r = pull(&mut c, "sg_room", 1, 100).await;
    assert!(
        ["forbidden", "not_found"].contains(&r["code"].as_str().unwrap_or("")),
        "{r}"
    );
    let r = c.send_text(Target::Group("room"), "x", "still here?").await;
    assert!(
        ["forbidden", "not_found"].contains(&r["code"].as_str().unwrap_or("")),
        "{r}"
    );
    let sy = sync(&mut c, json!({})).await;
    assert!(conv(&sy, "sg_room").is_none(), "{sy}");
}

#[tokio::test]
async fn revoke_deletes_the_content_and_tells_everyone() {
    let s = TestServer::start().await;
    s.register(&["alice", "bob", "carol"]).await;
    let mut a = s.connect("alice", 1).await;
    let mut b = s.connect("bob", 1).await;
    let ack = a.send_text(Target::User("bob"), "secret", "oops").await;
    let seq = a.stored(&ack).await;
    let r = a
        .request(json!({"op": "revoke", "conversation_id": "si_alice_bob", "seq": seq}))
        .await;
    assert_eq!(r["op"], "ok", "{r}");
    let n = pushed_of(&mut b, "si_alice_bob", 1100).await;
    assert_eq!(n["content"]["seq"], seq);
    assert_eq!(n["content"]["server_msg_id"], ack["server_msg_id"]);
    assert_eq!(n["sender"], "alice");
    let r = pull(&mut b, "si_alice_bob", seq, seq).await;
    let m = &r["messages"][0];
    assert_eq!(
        (m["revoked"].as_bool(), m["content"].is_null()),
        (Some(true), true),
        "{m}"
    );
    // Over REST too, and the refusals.
    let tb = s.token("bob", 2).await;
    let path = format!("/conversations/si_alice_bob/messages/{seq}/revoke");
    let (st, v) = s.call("POST", &tb, &path, None).await;
    assert_eq!(st, 403, "bob cannot revoke alice's message: {v}");
    let ta = s.token("alice", 2).await;
    let (st, _) = s.call("POST", &ta, &path, None).await;
    assert_eq!(st, 409, "already revoked");
    let n_seq = n["seq"].as_u64().unwrap();
    let (st, _) = s
        .call(
            "POST",
            &ta,
            &format!("/conversations/si_alice_bob/messages/{n_seq}/revoke"),
            None,
        )
        .await;
    assert_eq!(st, 409, "a notification is not revoked");
    let (st, _) = s
        .call(
            "POST",
            &ta,
            "/conversations/si_alice_bob/messages/999/revoke",
            None,
        )
        .await;
    assert_eq!(st, 404);
    // A group's owner revokes anyone's message, any time.
    assert_eq!(s.create_group(&ta, "g", &["bob"]).await, 201);
    let ack = b.send_text(Target::Group("g"), "b1", "bob says").await;
    let seq = b.stored(&ack).await;
    let (st, v) = s
        .call(
            "POST",
            &ta,
            &format!("/conversations/sg_g/messages/{seq}/revoke"),
            None,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let r = pull(&mut b, "sg_g", seq, seq).await;
    assert_eq!(r["messages"][0]["revoked"], true);
}

#[tokio::test]
async fn a_revoke_after_the_window_is_too_late() {
    let s = TestServer::start_with(|c| c.revoke_window_secs = 0).await;
    s.register(&["alice", "bob"]).await;
    let mut a = s.connect("alice", 1).await;
    let ack = a.send_text(Target::User("bob"), "m", "hi").await;
    let seq = a.stored(&ack).await;
    let r = a
        .request(json!({"op": "revoke", "conversation_id": "si_alice_bob", "seq": seq}))
        .await;
    assert_eq!(r["code"], "too_late", "{r}");
    let ta = s.token("alice", 2).await;
    let (st, v) = s
        .call(
            "POST",
            &ta,
            &format!("/conversations/si_alice_bob/messages/{seq}/revoke"),
            None,
        )
        .await;
    assert_eq!((st, v["code"].as_str()), (403, Some("too_late")));
}

#[tokio::test]
async fn the_conversation_list_counts_unread_and_sorts_pinned_then_newest() {
    let s = TestServer::start().await;
    s.register(&["alice", "bob", "carol", "dave"]).await;
    let mut a = s.connect("alice", 1).await;
    let mut b = s.connect("bob", 1).await;
    let mut c = s.connect("carol", 1).await;
    let mut d = s.connect("dave", 1).await;
    // bob: 3 from alice, 1 of his own after them; carol: 2 to bob; dave: 1.
    for i in 0..3 {
        let ack = a
            .send_text(Target::User("bob"), &format!("a{i}"), "hey")
            .await;
        a.stored(&ack).await;
    }
    let own = b.send_text(Target::User("alice"), "b0", "mine").await;
    b.stored(&own).await;
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    for i in 0..2 {
        let ack = c
            .send_text(Target::User("bob"), &format!("c{i}"), "yo")
            .await;
        c.stored(&ack).await;
    }
    // The list orders by send time in ms: let the clock move on.
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    let last = d.send_text(Target::User("bob"), "d0", "latest").await;
    d.stored(&last).await;
    let sy = sync(&mut b, json!({})).await;
    assert_eq!(sy["more"], false);
    let ids: Vec<&str> = sy["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["conversation_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["si_bob_dave", "si_bob_carol", "si_alice_bob"],
        "newest first"
    );
    let ab = conv(&sy, "si_alice_bob").unwrap();
    assert_eq!(ab["unread"], 3, "bob's own message is not unread: {ab}");
    assert_eq!(ab["peer"], "alice");
    assert_eq!(ab["last_message"]["client_msg_id"], "b0");
    assert_eq!(ab["min_seq"], 1);
    assert_eq!(
        (ab["pinned"].as_bool(), ab["muted"].as_bool()),
        (Some(false), Some(false))
    );
    assert_eq!(conv(&sy, "si_bob_carol").unwrap()["unread"], 2);
    // Reading lowers the count; pinning moves it first; settings per user.
    let r = b
        .request(json!({"op": "read", "conversation_id": "si_alice_bob", "seq": 2}))
        .await;
    assert_eq!(r["op"], "ok");
    let tb = s.token("bob", 2).await;
    let (st, _) = s
        .call(
            "PUT",
            &tb,
            "/conversations/si_alice_bob/settings",
            Some(json!({"pinned": true, "muted": true})),
        )
        .await;
    assert_eq!(st, 200);
    let (st, v) = s.call("GET", &tb, "/conversations?limit=2", None).await;
    assert_eq!(st, 200);
    let list = v["conversations"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(v["more"], true);
    assert_eq!(list[0]["conversation_id"], "si_alice_bob");
    assert_eq!(
        (list[0]["pinned"].as_bool(), list[0]["muted"].as_bool()),
        (Some(true), Some(true))
    );
    assert_eq!(list[0]["unread"], 1, "seq 3 is still unread");
    assert_eq!(list[1]["conversation_id"], "si_bob_dave");
    let sy = sync(&mut a, json!({})).await;
    assert_eq!(
        conv(&sy, "si_alice_bob").unwrap()["pinned"],
        false,
        "alice's settings are her own"
    );
    assert_eq!(
        conv(&sy, "si_alice_bob").unwrap()["unread"],
        1,
        "bob's message is unread for alice"
    );
    // since: only what changed at or after it.
    let since = last["send_time"].as_i64().unwrap();
    let sy = sync(&mut b, json!({"since": since})).await;
    let ids: Vec<&str> = sy["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["conversation_id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"si_bob_dave") && ids.contains(&"si_alice_bob"),
        "{ids:?}"
    );
    assert!(!ids.contains(&"si_bob_carol"), "{ids:?}");
    let (st, _) = s.call("GET", &tb, "/conversations?limit=0", None).await;
    assert_eq!(st, 400);
    let (st, _) = s.call("GET", &tb, "/conversations?limit=1001", None).await;
    assert_eq!(st, 400);
}

#[tokio::test]
async fn group_rules_refuse_what_the_table_refuses() {
    let s = TestServer::start_with(|c| c.max_group_members = 4).await;
    s.register(&["owner", "adm", "adm2", "mem", "out", "extra"])
        .await;
    let to = s.token("owner", 1).await;
    assert_eq!(s.create_group(&to, "t", &["adm", "adm2", "mem"]).await, 201);
    for a in ["adm", "adm2"] {
        let (st, _) = s
            .call(
                "PUT",
                &to,
                &format!("/groups/t/members/{a}/role"),
                Some(json!({"role": "admin"})),
            )
            .await;
        assert_eq!(st, 200);
    }
    let (ta, tm, tx) = (
        s.token("adm", 1).await,
        s.token("mem", 1).await,
        s.token("out", 1).await,
    );
    let (st, v) = s
        .call("PUT", &tm, "/groups/t", Some(json!({"name": "x"})))
        .await;
    assert_eq!(
        (st, v["code"].as_str()),
        (403, Some("forbidden")),
        "a member edits"
    );
    let (st, _) = s.call("GET", &tx, "/groups/t", None).await;
    assert_eq!(st, 403, "a stranger reads the info");
    let (st, _) = s
        .call("POST", &tm, "/groups/t/mute", Some(json!({"muted": true})))
        .await;
    assert_eq!(st, 403, "a member mutes the group");
    let (st, _) = s
        .call(
            "POST",
            &ta,
            "/groups/t/members/owner/mute",
            Some(json!({"seconds": 10})),
        )
        .await;
    assert_eq!(st, 403, "an admin mutes the owner");
    let (st, _) = s
        .call(
            "POST",
            &ta,
            "/groups/t/members/adm2/mute",
            Some(json!({"seconds": 10})),
        )
        .await;
    assert_eq!(st, 403, "an admin mutes another admin");
    let (st, _) = s
        .call(
            "POST",
            &ta,
            "/groups/t/transfer",
            Some(json!({"user_id": "mem"})),
        )
        .await;
    assert_eq!(st, 403, "an admin hands the group over");
    let (st, _) = s
        .call(
            "POST",
            &to,
            "/groups/t/transfer",
            Some(json!({"user_id": "out"})),
        )
        .await;
    assert_eq!(st, 404, "to a non-member");
    let (st, _) = s.call("DELETE", &ta, "/groups/t", None).await;
    assert_eq!(st, 403, "an admin dismisses");
    // A muted member, then a muted group.
    let mut m = s.connect("mem", 2).await;
    let (st, _) = s
        .call(
            "POST",
            &ta,
            "/groups/t/members/mem/mute",
            Some(json!({"seconds": 3600})),
        )
        .await;
    assert_eq!(st, 200);
    let r = m.send_text(Target::Group("t"), "m1", "hello?").await;
    assert_eq!(r["code"], "muted", "{r}");
    let (st, _) = s
        .call(
            "POST",
            &ta,
            "/groups/t/members/mem/mute",
            Some(json!({"seconds": 0})),
        )
        .await;
    assert_eq!(st, 200);
    let r = m.send_text(Target::Group("t"), "m2", "back").await;
    assert_eq!(r["op"], "ack", "{r}");
    let (st, _) = s
        .call("POST", &ta, "/groups/t/mute", Some(json!({"muted": true})))
        .await;
    assert_eq!(st, 200);
    let r = m.send_text(Target::Group("t"), "m3", "quiet?").await;
    assert_eq!(r["code"], "muted", "{r}");
    let (st, v) = s
        .call("POST", &tm, "/msg/send", Some(json!({"client_msg_id": "m4", "group_id": "t", "content_type": 101, "content": {"text": "x"}})))
        .await;
    assert_eq!((st, v["code"].as_str()), (403, Some("muted")));
    let mut adm = s.connect("adm", 2).await;
    let r = adm.send_text(Target::Group("t"), "a1", "admins may").await;
    assert_eq!(r["op"], "ack", "{r}");
    // Size: 4 at most; 1000 ids per request at most.
    let (st, _) = s
        .call(
            "POST",
            &to,
            "/groups/t/members",
            Some(json!({"user_ids": ["extra"]})),
        )
        .await;
    assert_eq!(st, 409, "past max_group_members");
    let many: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
    let (st, _) = s
        .call(
            "POST",
            &to,
            "/groups/t/members",
            Some(json!({"user_ids": many})),
        )
        .await;
    assert_eq!(st, 400, "more than 1000 user_ids");
    // A client cannot write a notification.
    let r = m
        .request(json!({"op": "send", "client_msg_id": "n", "group_id": "t", "content_type": 1002, "content": {"user_ids": []}}))
        .await;
    assert_eq!(r["code"], "bad_request");
    // My groups, with my role.
    let (st, v) = s.call("GET", &ta, "/users/me/groups", None).await;
    assert_eq!(st, 200);
    assert_eq!(
        v["groups"],
        json!([{"group_id": "t", "name": "t", "role": "admin"}])
    );
}

#[tokio::test]
async fn profiles_blocks_devices_and_presence() {
    let s = TestServer::start().await;
    s.register(&["alice", "bob"]).await;
    let ta = s.token("alice", 1).await;
    let (st, _) = s
        .call(
            "PUT",
            &ta,
            "/users/me",
            Some(json!({"nickname": "Alice", "avatar_url": "https://x/a.png"})),
        )
        .await;
    assert_eq!(st, 200);
    let tb = s.token("bob", 1).await;
    let (st, v) = s.call("GET", &tb, "/users/alice", None).await;
    assert_eq!(st, 200);
    assert_eq!(
        v,
        json!({"user_id": "alice", "nickname": "Alice", "avatar_url": "https://x/a.png"})
    );
    let (st, _) = s.call("GET", &tb, "/users/nobody", None).await;
    assert_eq!(st, 404);
    let (st, v) = s
        .call(
            "PUT",
            &ta,
            "/users/me",
            Some(json!({"nickname": "x".repeat(65)})),
        )
        .await;
    assert_eq!((st, v["code"].as_str()), (400, Some("bad_request")));
    // bob blocks alice: her single-chat sends are refused, groups are not.
    let (st, _) = s.call("PUT", &tb, "/users/me/blocks/alice", None).await;
    assert_eq!(st, 200);
    let (_, v) = s.call("GET", &tb, "/users/me/blocks", None).await;
    assert_eq!(v["user_ids"], json!(["alice"]));
    let mut a = s.connect("alice", 2).await;
    let r = a.send_text(Target::User("bob"), "blk", "let me in").await;
    assert_eq!(r["code"], "blocked", "{r}");
    let (st, v) = s
        .call("POST", &ta, "/msg/send", Some(json!({"client_msg_id": "blk2", "recv_id": "bob", "content_type": 101, "content": {"text": "x"}})))
        .await;
    assert_eq!((st, v["code"].as_str()), (403, Some("blocked")));
    assert_eq!(s.create_group(&ta, "both", &["bob"]).await, 201);
    let r = a
        .send_text(Target::Group("both"), "grp", "groups are fine")
        .await;
    assert_eq!(r["op"], "ack", "{r}");
    let (st, _) = s.call("DELETE", &tb, "/users/me/blocks/alice", None).await;
    assert_eq!(st, 200);
    let r = a.send_text(Target::User("bob"), "unblk", "thanks").await;
    assert_eq!(r["op"], "ack", "{r}");
    // Devices.
    let (st, _) = s
        .call(
            "PUT",
            &ta,
            "/users/me/devices/1",
            Some(json!({"push_token": "tok", "provider": "apns"})),
        )
        .await;
    assert_eq!(st, 200);
    let (st, _) = s
        .call(
            "PUT",
            &ta,
            "/users/me/devices/12",
            Some(json!({"push_token": "tok", "provider": "apns"})),
        )
        .await;
    assert_eq!(st, 400);
    // Presence: alice is on platform 2 (the WebSocket above).
    let (st, v) = s.call("GET", &tb, "/users/alice/presence", None).await;
    assert_eq!(st, 200);
    assert_eq!(
        (v["online"].as_bool(), v["platforms"].clone()),
        (Some(true), json!([2]))
    );
    assert!(v["last_seen"].as_i64().unwrap() > 0);
    let (_, v) = s.call("GET", &ta, "/users/bob/presence", None).await;
    assert_eq!(v["online"], false);
}

#[tokio::test]
async fn typing_presence_and_receipts_reach_the_others_and_are_not_stored() {
    let s = TestServer::start().await;
    s.register(&["alice", "bob", "carol"]).await;
    let mut a1 = s.connect("alice", 1).await;
    let mut a2 = s.connect("alice", 2).await;
    let mut b = s.connect("bob", 1).await;
    // Presence: alice follows bob and carol.
    let r = a1
        .request(json!({"op": "subscribe_presence", "user_ids": ["bob", "carol"]}))
        .await;
    assert_eq!(r["op"], "presence", "{r}");
    let users = r["users"].as_array().unwrap();
    assert_eq!(
        users[0],
        json!({"user_id": "bob", "online": true, "platforms": [1]})
    );
    assert_eq!(
        users[1],
        json!({"user_id": "carol", "online": false, "platforms": []})
    );
    let c = s.connect("carol", 5).await;
    let p = a1
        .next_where(|f| f["op"] == "presence" && f["user_id"] == "carol")
        .await;
    assert_eq!(
        (p["online"].as_bool(), p["platforms"].clone()),
        (Some(true), json!([5]))
    );
    drop(c);
    let p = a1
        .next_where(|f| f["op"] == "presence" && f["user_id"] == "carol")
        .await;
    assert_eq!(p["online"], false);
    // Typing: to bob, not to alice's other device; at most one a second.
    for _ in 0..3 {
        let r = a1
            .request(json!({"op": "typing", "conversation_id": "si_alice_bob"}))
            .await;
        assert_eq!(r["op"], "ok");
    }
    let ack = a1.send_text(Target::User("bob"), "after", "typed").await;
    assert_eq!(ack["op"], "ack");
    let mut typing = 0;
    loop {
        let f = b.read_frame().await.expect("bob's connection");
        if f["op"] == "typing" {
            assert_eq!(
                (f["conversation_id"].as_str(), f["user_id"].as_str()),
                (Some("si_alice_bob"), Some("alice"))
            );
            typing += 1;
        }
        if f["op"] == "push" {
            break;
        }
    }
    assert_eq!(
        typing, 1,
        "three typing frames within a second: one forwarded"
    );
    let r = b
        .request(
            json!({"op": "pull", "conversation_id": "si_alice_bob", "from_seq": 1, "to_seq": 10}),
        )
        .await;
    assert_eq!(seqs(&r), [1], "typing is not stored");
    let mut carol = s.connect("carol", 1).await;
    let r = carol
        .request(json!({"op": "typing", "conversation_id": "si_alice_bob"}))
        .await;
    assert_eq!(r["code"], "forbidden");
    // Receipts: bob reads, alice's connections hear it.
    let r = b
        .request(json!({"op": "read", "conversation_id": "si_alice_bob", "seq": 1}))
        .await;
    assert_eq!(r["op"], "ok");
    for a in [&mut a1, &mut a2] {
        let f = a.next_where(|f| f["op"] == "receipt").await;
        assert_eq!(
            f,
            json!({"op": "receipt", "conversation_id": "si_alice_bob", "user_id": "bob", "seq": 1})
        );
    }
    // alice's second device never saw her own typing.
    let ping = a2.request(json!({"op": "ping"})).await;
    assert_eq!(ping["op"], "pong");
    assert!(
        a2.backlog.iter().all(|f| f["op"] != "typing"),
        "{:?}",
        a2.backlog
    );
    let _ = (send_frame, PATIENCE);
}
