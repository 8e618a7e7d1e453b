//! A pipelined load over many conversations, for fault tests: each pair of
//! users is one single chat; its sender keeps several sends in flight at a
//! steady rate, resends (same client_msg_id) what is refused or left
//! unanswered, and reconnects when its connection drops; its receiver
//! records every push with the time it arrived. A fault then lands with
//! sends in flight, in conversations spread over every partition, and the
//! longest pause in deliveries can be measured.
//!
//! Every wait has a deadline: a message not acked within
//! [`MESSAGE_DEADLINE`] fails the test instead of hanging it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::ADMIN;

/// Longest a message may take to be acked, resends included.
pub const MESSAGE_DEADLINE: Duration = Duration::from_secs(90);
/// A send with no answer after this long is sent again (as a client whose
/// request timed out would).
const RESEND_AFTER: Duration = Duration::from_secs(12);

/// Where the server is; a test that restarts it updates this.
#[derive(Clone)]
pub struct Endpoint(Arc<RwLock<(String, String)>>);

impl Endpoint {
    /// `ws` is `ws://HOST:PORT/ws`, `api` is `http://HOST:PORT`.
    pub fn new(ws: &str, api: &str) -> Self {
        Endpoint(Arc::new(RwLock::new((ws.to_string(), api.to_string()))))
    }

    pub fn set(&self, ws: &str, api: &str) {
        *self.0.write().unwrap() = (ws.to_string(), api.to_string());
    }

    fn get(&self) -> (String, String) {
        self.0.read().unwrap().clone()
    }
}

/// What one conversation of the load saw.
#[derive(Debug, Default)]
pub struct PairLog {
    pub conversation: String,
    pub sender: String,
    pub receiver: String,
    /// client_msg_id → server_msg_id, as acked.
    pub acked: BTreeMap<String, String>,
    /// Pushes to the receiver: (when, seq, server_msg_id).
    pub pushes: Vec<(Instant, u64, String)>,
    pub receiver_reconnected: bool,
    /// Times the sender's connection dropped.
    pub sender_reconnects: usize,
    /// Each acked message: when it was first sent, and how long its ack took.
    pub acks: Vec<(Instant, Duration)>,
    pub resends: usize,
    /// What the receiver read by pull at the end, in seq order.
    pub stored: Vec<Value>,
}

pub struct Load {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<PairLog>>,
    pub started: Instant,
    acked: Arc<std::sync::atomic::AtomicUsize>,
    refused: Arc<std::sync::atomic::AtomicUsize>,
}

/// The users of pair `i` of a load named `prefix`.
pub fn pair_users(prefix: &str, i: usize) -> (String, String) {
    (format!("{prefix}s{i}"), format!("{prefix}r{i}"))
}

impl Load {
    /// Register the users and start `pairs` conversations between the users
    /// of `prefix`, each sending `rate` messages per second with up to
    /// `in_flight` unanswered; client_msg_ids start with `phase` (a later
    /// load on the same users takes another phase).
    pub async fn start(
        endpoint: &Endpoint,
        prefix: &str,
        phase: &str,
        pairs: usize,
        rate: f64,
        in_flight: usize,
        earlier: &[PairLog],
    ) -> Load {
        let http = reqwest::Client::new();
        let (_, api) = endpoint.get();
        let users: Vec<Value> = (0..pairs)
            .flat_map(|i| {
                let (s, r) = pair_users(prefix, i);
                [json!({"user_id": s}), json!({"user_id": r})]
            })
            .collect();
        for chunk in users.chunks(1000) {
            let st = http
                .post(format!("{api}/auth/register"))
                .header("X-Admin-Secret", ADMIN)
                .json(&json!({"users": chunk}))
                .send()
                .await
                .expect("register")
                .status();
            assert!(st.is_success(), "register: {st}");
        }
        let (stop, stopped) = watch::channel(false);
        let acked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks = (0..pairs)
            .map(|i| {
                let (s, r) = pair_users(prefix, i);
                let conv = conversation(&s, &r);
                let mut before = BTreeMap::new();
                for e in earlier.iter().filter(|e| e.conversation == conv) {
                    before.extend(e.acked.clone());
                }
                let pair = Pair {
                    earlier: before,
                    endpoint: endpoint.clone(),
                    http: http.clone(),
                    prefix: format!("{phase}-"),
                    acked: acked.clone(),
                    refused: refused.clone(),
                    log: PairLog {
                        conversation: conv,
                        sender: s,
                        receiver: r,
                        ..Default::default()
                    },
                    period: Duration::from_secs_f64(1.0 / rate.max(0.01)),
                    in_flight: in_flight.max(1),
                };
                tokio::spawn(pair.run(stopped.clone()))
            })
            .collect();
        Load {
            stop,
            tasks,
            started: Instant::now(),
            acked,
            refused,
        }
    }

    /// Wait until `n` sends have been refused (`unavailable`) in all: the
    /// fault is felt.
    pub async fn wait_refused(&self, n: usize) {
        let deadline = Instant::now() + MESSAGE_DEADLINE;
        while self.refused.load(std::sync::atomic::Ordering::Relaxed) < n {
            assert!(Instant::now() < deadline, "no send was ever refused");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait until `n` messages have been acked in all (the load is flowing).
    pub async fn wait_acked(&self, n: usize) {
        let deadline = Instant::now() + MESSAGE_DEADLINE;
        while self.acked.load(std::sync::atomic::Ordering::Relaxed) < n {
            assert!(
                Instant::now() < deadline,
                "the load never reached {n} acked messages"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends answered `unavailable` so far.
    pub fn refused_so_far(&self) -> usize {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Messages acked so far.
    pub fn acked_so_far(&self) -> usize {
        self.acked.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stop sending, wait for every message to be acked and the last one
    /// pushed, and check what the receivers can read: seqs 1..n, each acked
    /// message (of this load and the `earlier` ones it was started with)
    /// once with its acked id.
    pub async fn finish(self) -> Vec<PairLog> {
        let _ = self.stop.send(true);
        let mut logs = Vec::new();
        for t in self.tasks {
            logs.push(t.await.expect("a load task panicked"));
        }
        logs
    }
}

fn conversation(a: &str, b: &str) -> String {
    if a.as_bytes() <= b.as_bytes() {
        format!("si_{a}_{b}")
    } else {
        format!("si_{b}_{a}")
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Send one message (a resend when `cmid` was sent before); its rid.
async fn send_message(ws: &mut Ws, rid: &mut u64, cmid: &str, receiver: &str) -> String {
    *rid += 1;
    let r = format!("{cmid}#{rid}");
    let frame = json!({"op": "send", "rid": r, "client_msg_id": cmid, "recv_id": receiver,
        "content_type": 101, "content": {"text": cmid}});
    // A failed write shows as a closed connection on the next read.
    let _ = ws.send(Message::text(frame.to_string())).await;
    r
}

struct Pair {
    /// Messages of earlier loads in this conversation (client_msg_id →
    /// server_msg_id).
    earlier: BTreeMap<String, String>,
    endpoint: Endpoint,
    http: reqwest::Client,
    prefix: String,
    acked: Arc<std::sync::atomic::AtomicUsize>,
    refused: Arc<std::sync::atomic::AtomicUsize>,
    log: PairLog,
    period: Duration,
    in_flight: usize,
}

struct Outstanding {
    cmid: String,
    first: Instant,
    last: Instant,
}

impl Pair {
    async fn token(&self, user: &str, platform: u8) -> Option<String> {
        let (_, api) = self.endpoint.get();
        let r = self
            .http
            .post(format!("{api}/auth/token"))
            .header("X-Admin-Secret", ADMIN)
            .json(&json!({"user_id": user, "platform": platform}))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        let v: Value = r.json().await.ok()?;
        v["token"].as_str().map(str::to_string)
    }

    /// Connect `user`, retrying until `deadline` (the server may be
    /// restarting).
    async fn connect(&self, user: &str, platform: u8, deadline: Instant) -> Ws {
        loop {
            if let Some(t) = self.token(user, platform).await {
                let (ws, _) = self.endpoint.get();
                if let Ok(Ok((c, _))) = tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio_tungstenite::connect_async(format!("{ws}?token={t}")),
                )
                .await
                {
                    return c;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{user} could not connect before its deadline"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn run(mut self, mut stopped: watch::Receiver<bool>) -> PairLog {
        let far = Instant::now() + MESSAGE_DEADLINE;
        let sender = self.log.sender.clone();
        let receiver = self.log.receiver.clone();
        let mut tx = self.connect(&sender, 1, far).await;
        let mut rx = self.connect(&receiver, 1, far).await;
        let mut outstanding: HashMap<String, Outstanding> = HashMap::new(); // rid -> …
        let mut retry_at: Vec<(Instant, String)> = Vec::new(); // cmids to resend
        let mut next = 0usize;
        let mut rid = 0u64;
        let mut tick = tokio::time::interval(self.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut check = tokio::time::interval(Duration::from_millis(200));
        let mut stopping = false;
        let mut stop_deadline = far;
        let mut first_sent: HashMap<String, Instant> = HashMap::new();
        loop {
            if stopping && outstanding.is_empty() && retry_at.is_empty() && self.all_pushed() {
                break;
            }
            tokio::select! {
                _ = stopped.changed(), if !stopping => {
                    stopping = true;
                    stop_deadline = Instant::now() + MESSAGE_DEADLINE;
                }
                _ = tick.tick(), if !stopping && outstanding.len() < self.in_flight => {
                    let cmid = format!("{}{next}", self.prefix);
                    next += 1;
                    let r = send_message(&mut tx, &mut rid, &cmid, &receiver).await;
                    let now = Instant::now();
                    first_sent.insert(cmid.clone(), now);
                    outstanding.insert(r, Outstanding { cmid, first: now, last: now });
                }
                _ = check.tick() => {
                    let now = Instant::now();
                    if stopping && now >= stop_deadline {
                        // Say what is missing: not stored, or stored and not pushed.
                        let stored = self.read_all(&mut rx).await;
                        let ids: HashSet<&str> = stored.iter().filter_map(|m| m["server_msg_id"].as_str()).collect();
                        let pushed: HashSet<&str> = self.log.pushes.iter().map(|(_, _, id)| id.as_str()).collect();
                        let missing: Vec<(&String, &String, bool)> = self.log.acked.iter()
                            .filter(|(_, id)| !pushed.contains(id.as_str()))
                            .map(|(c, id)| (c, id, ids.contains(id.as_str())))
                            .collect();
                        let seqs: Vec<u64> = stored.iter().filter_map(|m| m["seq"].as_u64()).collect();
                        panic!("{}: not everything was acked and pushed within {:?} of the end: {} unanswered, {} to resend, {} acked, {} pushed; stored {} (max seq {:?}); acked and not pushed (cmid, id, stored?): {missing:?}",
                            self.log.conversation, MESSAGE_DEADLINE, outstanding.len(), retry_at.len(), self.log.acked.len(), self.log.pushes.len(), stored.len(), seqs.iter().max());
                    }
                    for o in outstanding.values() {
                        assert!(now < o.first + MESSAGE_DEADLINE, "{}: {} not acked within {:?}", self.log.conversation, o.cmid, MESSAGE_DEADLINE);
                    }
                    let late: Vec<String> = outstanding
                        .iter()
                        .filter(|(_, o)| now > o.last + RESEND_AFTER)
                        .map(|(r, _)| r.clone())
                        .collect();
                    for r in late {
                        if let Some(o) = outstanding.remove(&r) {
                            retry_at.push((now, o.cmid));
                        }
                    }
                    let due: Vec<String> = retry_at.iter().filter(|(t, _)| *t <= now).map(|(_, c)| c.clone()).collect();
                    retry_at.retain(|(t, _)| *t > now);
                    for cmid in due {
                        let r = send_message(&mut tx, &mut rid, &cmid, &receiver).await;
                        self.log.resends += 1;
                        let first = first_sent.get(&cmid).copied().unwrap_or(now);
                        outstanding.insert(r, Outstanding { cmid, first, last: now });
                    }
                }
                frame = tx.next() => match frame {
                    Some(Ok(Message::Text(t))) => {
                        let v: Value = serde_json::from_str(t.as_str()).expect("server frames are JSON");
                        let Some(r) = v["rid"].as_str() else { continue };
                        let Some(o) = outstanding.remove(r) else { continue };
                        match v["op"].as_str() {
                            Some("ack") => {
                                let id = v["server_msg_id"].as_str().expect("ack id").to_string();
                                match self.log.acked.insert(o.cmid.clone(), id.clone()) {
                                    Some(before) => assert_eq!(before, id, "{}: a resend of {} got another id", self.log.conversation, o.cmid),
                                    None => {
                                        self.log.acks.push((o.first, o.first.elapsed()));
                                        self.acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                    }
                                }
                            }
                            _ => {
                                assert_eq!(v["code"], "unavailable", "{}: {v}", self.log.conversation);
                                self.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                retry_at.push((Instant::now() + Duration::from_millis(100), o.cmid));
                            }
                        }
                    }
                    Some(Ok(_)) => {}
                    None | Some(Err(_)) => {
                        // Dropped (the server or gateway died): reconnect and
                        // resend whatever had no answer.
                        self.log.sender_reconnects += 1;
                        tx = self.connect(&sender, 1, Instant::now() + MESSAGE_DEADLINE).await;
                        let now = Instant::now();
                        for (_, o) in outstanding.drain() {
                            retry_at.push((now, o.cmid));
                        }
                    }
                },
                frame = rx.next() => match frame {
                    Some(Ok(Message::Text(t))) => {
                        let v: Value = serde_json::from_str(t.as_str()).expect("server frames are JSON");
                        if v["op"] == "push" {
                            let now = Instant::now();
                            for m in v["messages"].as_array().into_iter().flatten() {
                                if m["conversation_id"] == json!(self.log.conversation) {
                                    self.log.pushes.push((now, m["seq"].as_u64().expect("seq"), m["server_msg_id"].as_str().unwrap_or_default().to_string()));
                                }
                            }
                        }
                    }
                    Some(Ok(_)) => {}
                    None | Some(Err(_)) => {
                        self.log.receiver_reconnected = true;
                        rx = self.connect(&receiver, 1, Instant::now() + MESSAGE_DEADLINE).await;
                    }
                },
            }
        }
        self.log.stored = self.read_all(&mut rx).await;
        let mut all = self.earlier.clone();
        all.extend(self.log.acked.clone());
        check_stored(&self.log.conversation, &self.log.stored, &all);
        if !self.log.receiver_reconnected {
            let mut seen = HashSet::new();
            for (_, seq, _) in &self.log.pushes {
                assert!(
                    seen.insert(*seq),
                    "{}: seq {seq} pushed twice to one connection",
                    self.log.conversation
                );
            }
        }
        self.log
    }

    /// The receiver was pushed every message acked in this load, and the
    /// conversation's last one (seq n, n the messages acked in it): it
    /// knows of every message. (A message given a new seq after a fault is
    /// pushed after higher seqs: the highest seq alone does not say the
    /// others are stored.) A receiver that was reconnected finds what it
    /// missed by pull.
    fn all_pushed(&self) -> bool {
        if self.log.receiver_reconnected {
            return true;
        }
        let n = (self.earlier.len() + self.log.acked.len()) as u64;
        let pushed: HashSet<&str> = self
            .log
            .pushes
            .iter()
            .map(|(_, _, id)| id.as_str())
            .collect();
        self.log.pushes.iter().any(|(_, seq, _)| *seq >= n)
            && self
                .log
                .acked
                .values()
                .all(|id| pushed.contains(id.as_str()))
    }

    /// Every message of the conversation, by pull, until a page is empty.
    async fn read_all(&self, rx: &mut Ws) -> Vec<Value> {
        let conv = &self.log.conversation;
        let mut got: Vec<Value> = Vec::new();
        let mut from = 1;
        loop {
            let to = from + 999;
            let frame = json!({"op": "pull", "rid": "read-all", "conversation_id": conv, "from_seq": from, "to_seq": to});
            rx.send(Message::text(frame.to_string()))
                .await
                .expect("pull");
            let reply = loop {
                let f = tokio::time::timeout(Duration::from_secs(20), rx.next())
                    .await
                    .expect("pull answered");
                if let Some(Ok(Message::Text(t))) = f {
                    let v: Value = serde_json::from_str(t.as_str()).expect("JSON");
                    if v["rid"] == "read-all" {
                        break v;
                    }
                }
            };
            let page = reply["messages"].as_array().cloned().unwrap_or_default();
            if page.is_empty() {
                return got;
            }
            got.extend(page);
            from = to + 1;
        }
    }
}

/// What a receiver read holds seqs 1..n with no gap and nothing twice, and
/// each acked message exactly once, with its acked id.
pub fn check_stored(conv: &str, stored: &[Value], acked: &BTreeMap<String, String>) {
    let seqs: Vec<u64> = stored.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "{conv}: seqs 1..n with no gap and nothing twice"
    );
    let mut by_cmid: HashMap<&str, Vec<&str>> = HashMap::new();
    for m in stored {
        by_cmid
            .entry(m["client_msg_id"].as_str().unwrap())
            .or_default()
            .push(m["server_msg_id"].as_str().unwrap());
    }
    for (cmid, id) in acked {
        assert_eq!(
            by_cmid.get(cmid.as_str()).map(Vec::as_slice),
            Some(&[id.as_str()][..]),
            "{conv}: {cmid} stored once, with its acked id"
        );
    }
    assert_eq!(
        stored.len(),
        acked.len(),
        "{conv}: nothing stored that was not acked (or stored twice)"
    );
}

/// Deliveries per second over all pairs, from `start`: the timeline around
/// a fault.
pub fn timeline(logs: &[PairLog], start: Instant) -> Vec<usize> {
    let mut per_sec: Vec<usize> = Vec::new();
    for l in logs {
        for (t, _, _) in &l.pushes {
            let s = t.saturating_duration_since(start).as_secs() as usize;
            if per_sec.len() <= s {
                per_sec.resize(s + 1, 0);
            }
            per_sec[s] += 1;
        }
    }
    per_sec
}

/// The longest time any conversation went without a delivery between
/// `from` and `to` (both within the load), and which conversation.
pub fn longest_gap(logs: &[PairLog], from: Instant, to: Instant) -> (Duration, String) {
    let mut worst = (Duration::ZERO, String::new());
    for l in logs {
        let mut last = from;
        for (t, _, _) in l.pushes.iter().filter(|(t, _, _)| *t >= from && *t <= to) {
            let gap = t.saturating_duration_since(last);
            if gap > worst.0 {
                worst = (gap, l.conversation.clone());
            }
            last = *t;
        }
        let tail = to.saturating_duration_since(last);
        if tail > worst.0 {
            worst = (tail, l.conversation.clone());
        }
    }
    worst
}

/// Every pair's receiver got every message by push (it was never
/// disconnected): the push path lost nothing.
pub fn assert_all_pushed(logs: &[PairLog]) {
    for l in logs {
        if l.receiver_reconnected {
            continue;
        }
        let pushed: HashSet<&str> = l.pushes.iter().map(|(_, _, id)| id.as_str()).collect();
        for (cmid, id) in &l.acked {
            assert!(
                pushed.contains(id.as_str()),
                "{}: {cmid} was acked but never pushed to its online receiver",
                l.conversation
            );
        }
    }
}

/// Messages acked over all pairs.
pub fn acked(logs: &[PairLog]) -> usize {
    logs.iter().map(|l| l.acked.len()).sum()
}
