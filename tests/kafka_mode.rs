//! The standalone stages with their topic edges on a real Kafka broker
//! (tansu, started by `script/test.sh` through `script/infra.sh`;
//! `IMFLOW_KAFKA_BROKERS` overrides 127.0.0.1:9092). Each test uses its own
//! topics and consumer groups.
//!
//! Here an "ack" means the message is durable in Kafka, as in a cluster; it
//! is in the history a moment later, so these tests wait for the sender's own
//! push (sent after the history commit) before reading history.

mod common;

use common::{send_frame, seqs_of, Target, TestServer};
use serde_json::json;

/// A server whose pipeline is the shipped one with its topics renamed.
async fn kafka_server(pipelines: &tempfile::TempDir) -> TestServer {
    let id = common::unique();
    let dir = pipelines.path().to_path_buf();
    TestServer::start_with(move |c| common::use_kafka(c, &dir, &id)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_chat_over_kafka_reaches_every_connection_in_seq_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = kafka_server(&dir).await;
    s.register(&["alice", "bob"]).await;
    let mut a1 = s.connect("alice", 1).await;
    let mut a2 = s.connect("alice", 2).await;
    let mut b1 = s.connect("bob", 1).await;
    let n = 40;
    for i in 0..n {
        let mut f = send_frame(Target::User("bob"), &format!("c{i}"), &format!("m{i}"));
        f["rid"] = json!(format!("x{i}"));
        a1.send_json(&f).await;
    }
    let mut last_id = String::new();
    for i in 0..n {
        let ack = a1.next_where(|f| f["rid"] == json!(format!("x{i}"))).await;
        assert_eq!(ack["op"], "ack", "{ack}");
        last_id = ack["server_msg_id"].as_str().unwrap().to_string();
    }
    let want: Vec<u64> = (1..=n as u64).collect();
    for c in [&mut a1, &mut a2, &mut b1] {
        let got = c.pushed(n).await;
        assert_eq!(seqs_of(&got, "si_alice_bob"), want);
    }
    // What a test that lost a message uses to say where it stopped: it
    // finds this one at every hop.
    let kafka = s.cfg.kafka.clone().unwrap();
    let id = kafka.group_prefix.trim_start_matches("test-").to_string();
    let topics: Vec<String> = ["ws2ms_chat", "msg_to_mongo", "ms2ps_chat"]
        .iter()
        .map(|t| format!("{t}-{id}"))
        .collect();
    let (brokers, wanted) = (kafka.addr[0].clone(), topics.clone());
    let found = tokio::task::spawn_blocking(move || {
        common::trace::find_in_topics(&brokers, &wanted, &last_id)
    })
    .await
    .unwrap();
    for t in &topics {
        assert!(
            found.iter().any(|f| f.starts_with(&format!("{t}["))),
            "{t} in {found:?}"
        );
    }
    let r = b1
        .request(
            json!({"op": "pull", "conversation_id": "si_alice_bob", "from_seq": 1, "to_seq": 100}),
        )
        .await;
    assert_eq!(
        seqs_of(r["messages"].as_array().unwrap(), "si_alice_bob"),
        want
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_over_kafka_gets_every_message_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = kafka_server(&dir).await;
    let users: Vec<String> = (0..20).map(|i| format!("u{i}")).collect();
    let refs: Vec<&str> = users.iter().map(String::as_str).collect();
    s.register(&refs).await;
    let owner = s.token("u0", 1).await;
    assert_eq!(s.create_group(&owner, "g", &refs[1..]).await, 201);
    let mut online = futures::future::join_all((0..10).map(|i| s.connect(&users[i * 2], 1))).await;
    for round in 0..5 {
        for (k, c) in online.iter_mut().take(4).enumerate() {
            c.send_json(&send_frame(
                Target::Group("g"),
                &format!("g{k}-{round}"),
                "hi",
            ))
            .await;
        }
    }
    // Seq 1 is the "group created" notification (PROTOCOL v2).
    let want: Vec<u64> = (2..=21).collect();
    for c in online.iter_mut() {
        assert_eq!(seqs_of(&c.pushed_chat(20).await, "sg_g"), want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_over_kafka_keeps_history_continues_seqs_and_remembers_resends() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = kafka_server(&dir).await;
    s.register(&["alice", "bob"]).await;
    let first = {
        let mut a = s.connect("alice", 1).await;
        let first = a.send_text(Target::User("bob"), "c1", "one").await;
        a.send_text(Target::User("bob"), "c2", "two").await;
        assert_eq!(seqs_of(&a.pushed(2).await, "si_alice_bob"), vec![1, 2]);
        let again = a.send_text(Target::User("bob"), "c1", "one").await;
        assert_eq!(again["server_msg_id"], first["server_msg_id"]);
        first
    };
    s.restart().await;
    let mut a = s.connect("alice", 1).await;
    let again = a.send_text(Target::User("bob"), "c1", "one").await;
    assert_eq!(
        again["server_msg_id"], first["server_msg_id"],
        "resend recognised after restart"
    );
    a.send_text(Target::User("bob"), "c3", "three").await;
    let got = a.pushed(1).await;
    assert_eq!(
        seqs_of(&got, "si_alice_bob"),
        vec![3],
        "seqs continue, nothing replayed twice"
    );
    let r = a
        .request(
            json!({"op": "pull", "conversation_id": "si_alice_bob", "from_seq": 1, "to_seq": 10}),
        )
        .await;
    assert_eq!(
        seqs_of(r["messages"].as_array().unwrap(), "si_alice_bob"),
        vec![1, 2, 3]
    );
}
