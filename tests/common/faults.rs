//! Load with resends and the checks every fault test ends with (shared by
//! tests/cluster.rs and tests/operators.rs).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::json;

use super::{send_frame, Client, Target, PATIENCE};

/// What the load generator saw: the ack of every client_msg_id, per target.
#[derive(Default)]
pub struct Sent {
    pub acked: BTreeMap<String, (String, String)>, // client_msg_id -> (conversation, server_msg_id)
}

/// Send `n` messages alternating between bob and the group, one at a time,
/// each retried (same client_msg_id) until acked. `between` runs after the
/// message at index `at` is acked: that is where the fault is injected.
pub async fn send_steadily<F, Fut>(
    a: &mut Client,
    prefix: &str,
    n: usize,
    at: usize,
    between: F,
) -> Sent
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    send_steadily_to(a, ("bob", "room"), prefix, n, at, between).await
}

/// As `send_steadily`, to another user and group.
pub async fn send_steadily_to<F, Fut>(
    a: &mut Client,
    (user, group): (&str, &str),
    prefix: &str,
    n: usize,
    at: usize,
    between: F,
) -> Sent
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut sent = Sent::default();
    let mut between = Some(between);
    for i in 0..n {
        let target = if i % 2 == 0 {
            Target::User(user)
        } else {
            Target::Group(group)
        };
        let cmid = format!("{prefix}{i}");
        // A wedged server fails the test here rather than at CI's timeout.
        let deadline = tokio::time::Instant::now() + PATIENCE * 3;
        loop {
            let reply = a
                .request(send_frame(target, &cmid, &format!("text {i}")))
                .await;
            if reply["op"] == "ack" {
                let conv = reply["conversation_id"].as_str().unwrap().to_string();
                let id = reply["server_msg_id"].as_str().unwrap().to_string();
                sent.acked.insert(cmid.clone(), (conv, id));
                break;
            }
            assert_eq!(reply["code"], "unavailable", "{reply}");
            assert!(
                tokio::time::Instant::now() < deadline,
                "{cmid}: still refused as unavailable after {:?}",
                PATIENCE * 3
            );
            // A client backs off before it resends.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if i == at {
            if let Some(f) = between.take() {
                f().await;
            }
        }
    }
    sent
}

/// Send `n` messages and wait until the last is stored: the pipeline is
/// flowing (consumer groups settled, counters made) when a fault comes.
pub async fn flowing(a: &mut Client, n: usize) -> Sent {
    let sent = send_steadily(a, "m", n, usize::MAX, || async {}).await;
    for conv in ["si_alice_bob", "sg_room"] {
        let last = sent
            .acked
            .values()
            .filter(|(c, _)| c == conv)
            .map(|(_, id)| id.clone())
            .max()
            .expect("messages in both conversations");
        a.stored(&json!({"server_msg_id": last})).await;
    }
    sent
}

/// The checks every fault test ends with. `bob_online_throughout`: bob's
/// pushes must hold every seq; otherwise (he reconnected after a crash) he
/// must find everything by sync and pull, and never get a seq twice.
pub async fn check_everything(
    a: &mut Client,
    b: &mut Client,
    sent: &Sent,
    bob_online_throughout: bool,
) {
    let mut by_conv: HashMap<String, Vec<(&String, &String)>> = HashMap::new();
    for (cmid, (conv, id)) in &sent.acked {
        by_conv.entry(conv.clone()).or_default().push((cmid, id));
    }
    // The sender's own push of the newest message of each conversation says
    // the whole conversation is stored (pushes come in seq order). A group
    // also holds server notifications (its "group created" at seq 1).
    let mut totals: HashMap<String, u64> = HashMap::new();
    for (conv, msgs) in &by_conv {
        // The newest: the highest index of the latest prefix ("m" > "b").
        let last = msgs
            .iter()
            .max_by_key(|(c, _)| (c.as_bytes()[0], c[1..].parse::<u64>().unwrap()))
            .unwrap();
        let deadline = tokio::time::Instant::now() + PATIENCE * 3;
        let want = last.1.clone();
        // The deadline bounds the whole wait, not each frame: after a kill
        // the pushes resume once the consumer group has moved the
        // partitions, which can leave the socket quiet for a while.
        let f = a
            .next_where_until(deadline, |f| {
                f["op"] == "push"
                    && f["messages"]
                        .as_array()
                        .is_some_and(|m| m.iter().any(|m| m["server_msg_id"] == json!(want)))
            })
            .await
            .unwrap_or_else(|| panic!("{conv}: the last message was never pushed"));
        // Not the whole frame: it may hold the other conversation's last
        // message too.
        let seq = a.take_message(f, &json!(want))["seq"].as_u64().unwrap();
        let r = a
            .request(
                json!({"op": "pull", "conversation_id": conv, "from_seq": 1, "to_seq": seq + 50}),
            )
            .await;
        let stored = r["messages"].as_array().unwrap();
        let seqs: Vec<u64> = stored.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
        assert_eq!(
            seqs,
            (1..=seq).collect::<Vec<_>>(),
            "{conv}: seqs 1..n, no gap, nothing twice, the last acked message last"
        );
        totals.insert(conv.clone(), seq);
        let stored_ids: HashMap<&str, &str> = stored
            .iter()
            .filter(|m| m["content_type"].as_i64().unwrap_or(0) < 1000)
            .map(|m| {
                (
                    m["client_msg_id"].as_str().unwrap(),
                    m["server_msg_id"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            stored_ids.len(),
            msgs.len(),
            "{conv}: each message stored once"
        );
        for (cmid, id) in msgs {
            assert_eq!(
                stored_ids.get(cmid.as_str()),
                Some(&id.as_str()),
                "{conv}: {cmid} stored with its acked id"
            );
        }
    }
    if !bob_online_throughout {
        let sync = b.request(json!({"op": "sync"})).await;
        for conv in by_conv.keys() {
            let n = totals[conv];
            let c = sync["conversations"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["conversation_id"] == json!(conv))
                .unwrap_or_else(|| panic!("bob's sync lists {conv}: {sync}"));
            assert_eq!(c["max_seq"], json!(n), "{conv}: bob's sync");
            let r = b
                .request(json!({"op": "pull", "conversation_id": conv, "from_seq": 1, "to_seq": n}))
                .await;
            assert_eq!(
                r["messages"].as_array().unwrap().len() as u64,
                n,
                "{conv}: bob's pull"
            );
        }
        let mut seen = std::collections::HashSet::new();
        for f in b.backlog.drain(..) {
            for m in f["messages"].as_array().into_iter().flatten() {
                let key = (m["conversation_id"].to_string(), m["seq"].as_u64());
                assert!(seen.insert(key), "bob got a seq twice: {m}");
            }
        }
        return;
    }
    // bob was online throughout: every seq of the messages sent, each once
    // (notifications before bob connected are not pushed to him).
    let total: usize = by_conv.values().map(Vec::len).sum();
    let mut pushed: Vec<serde_json::Value> = Vec::new();
    while pushed
        .iter()
        .filter(|m| m["content_type"].as_i64().unwrap_or(0) < 1000)
        .count()
        < total
    {
        pushed.extend(b.pushed(1).await);
    }
    let mut seen: HashMap<(String, u64), usize> = HashMap::new();
    for m in &pushed {
        *seen
            .entry((
                m["conversation_id"].as_str().unwrap().to_string(),
                m["seq"].as_u64().unwrap(),
            ))
            .or_default() += 1;
    }
    for (conv, msgs) in &by_conv {
        let n = totals[conv];
        let first = n + 1 - msgs.len() as u64;
        for seq in first..=n {
            assert_eq!(
                seen.get(&(conv.clone(), seq)),
                Some(&1),
                "bob got {conv} #{seq} once"
            );
        }
    }
}
