//! A cluster of separate processes (gateway, api, im_msg, im_msg_transfer,
//! im_push, one of each) on the servers of `script/infra.sh`, and the
//! crashes between two stages that must cost no push: a process that dies
//! after the history has a message and before the next topic has it must
//! not have let its input offset go (issue "Trust", item 2b).

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::load::{assert_all_pushed, Endpoint, Load};
use common::{ADMIN, PATIENCE};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const CLUSTER_SECRET: &str = "process-faults-cluster-secret";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One process of each kind, with its own topics, groups, databases, keys
/// and etcd prefix.
struct Cluster {
    /// Names its topics, groups, databases, keys and etcd prefix.
    id: String,
    dir: tempfile::TempDir,
    config: PathBuf,
    gateway_port: u16,
    api_port: u16,
    im_msg_port: u16,
}

impl Cluster {
    fn new() -> Cluster {
        Cluster::with_etcd("127.0.0.1:2379")
    }

    /// As `new`, with etcd at `etcd`.
    fn with_etcd(etcd: &str) -> Cluster {
        let mut dir = tempfile::tempdir().expect("tempdir");
        if std::env::var_os("IMFLOW_TEST_KEEP").is_some() {
            // The processes' logs stay for a look after a failure.
            dir.disable_cleanup(true);
            eprintln!("process logs in {}", dir.path().display());
        }
        let id = common::unique();
        let pipeline = dir.path().join("pipeline.yaml");
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/pipeline.yaml"))
            .unwrap()
            .replace("topic: ws2ms_chat", &format!("topic: ws2ms_chat-{id}"))
            .replace("topic: msg_to_mongo", &format!("topic: msg_to_mongo-{id}"))
            .replace("topic: ms2ps_chat", &format!("topic: ms2ps_chat-{id}"));
        // One process per group.
        let im_msg_port = free_port();
        let text = text
            .replace(
                "ports: [10130, 10131, 10132, 10133, 10134, 10135]",
                &format!("ports: [{im_msg_port}]"),
            )
            .replace("count: 4", "count: 1")
            .replace(
                "ports: [10170, 10171, 10172, 10173, 10174]",
                &format!("ports: [{}]", free_port()),
            );
        std::fs::write(&pipeline, text).unwrap();
        let (gateway_port, api_port) = (free_port(), free_port());
        let config = dir.path().join("config.yaml");
        let yaml = format!(
            "pipeline: {pipeline}\nadmin_secret: {ADMIN}\ncluster_secret: {CLUSTER_SECRET}\n\
             listen:\n  gateway: 127.0.0.1:{gateway_port}\n  api: 127.0.0.1:{api_port}\n  gateway_rpc: {rpc}\n\
             kafka:\n  addr: [127.0.0.1:9092]\n  group_prefix: {id}\n  linger_ms: 1\n\
             etcd:\n  etcdSchema: {id}\n  etcdAddr: [{etcd}]\n\
             mysql:\n  dbMysqlAddress: [127.0.0.1:13306]\n  dbMysqlDatabaseName: {id}\n\
             mongo:\n  dbAddress: [127.0.0.1:37017]\n  dbDatabase: {id}\n\
             redis:\n  dbAddress: [127.0.0.1:16379]\n  keyPrefix: {id}\n\
             websocket:\n  rate_limit_per_sec: 100000\n  rate_limit_burst: 100000\n\
             rest:\n  rate_limit_per_sec: 100000\n  rate_limit_burst: 100000\n",
            pipeline = pipeline.display(),
            rpc = free_port(),
        );
        std::fs::write(&config, yaml).unwrap();
        Cluster {
            id,
            dir,
            config,
            gateway_port,
            api_port,
            im_msg_port,
        }
    }

    /// Start `process` (with `env`), and wait until it serves.
    async fn start(&self, process: &str, env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_imflow"));
        cmd.args(["serve", "--log-json", "--config"])
            .arg(&self.config)
            .args(["--process", process, "--index", "0", "--host", "127.0.0.1"])
            .env("IMFLOW_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("the imflow binary");
        let log_path = self
            .dir
            .path()
            .join(format!("{process}-{}.log", common::unique()));
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let served = tokio::time::timeout(PATIENCE * 3, async {
            let mut log = String::new();
            while let Ok(Some(line)) = lines.next_line().await {
                log.push_str(&line);
                log.push('\n');
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if v["fields"]["message"] == "imflow process serving" {
                        return Ok(log);
                    }
                }
            }
            Err(log)
        })
        .await;
        match &served {
            Ok(Ok(_)) => {}
            Ok(Err(log)) => panic!("{process} exited before serving:\n{log}"),
            Err(_) => panic!("{process} did not serve within {:?}", PATIENCE * 3),
        }
        let early = match served {
            Ok(Ok(l)) => l,
            _ => String::new(),
        };
        // Keep draining its log (to a file) so it never blocks on the pipe.
        tokio::spawn(async move {
            let mut out = early;
            while let Ok(Some(l)) = lines.next_line().await {
                out.push_str(&l);
                out.push('\n');
                let _ = std::fs::write(&log_path, &out);
            }
        });
        Proc { child }
    }

    /// Where its processes announce themselves in etcd.
    fn etcd_prefix(&self) -> String {
        self.id.clone()
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::new(
            &format!("ws://127.0.0.1:{}/ws", self.gateway_port),
            &format!("http://127.0.0.1:{}", self.api_port),
        )
    }
}

struct Proc {
    child: Child,
}

impl Proc {
    async fn kill(mut self) {
        self.child.start_kill().expect("SIGKILL");
        let _ = self.child.wait().await;
    }
}

/// How many messages of `conversation` the history holds, as `user` pulls
/// them through the API.
async fn stored(api: &str, token: &str, conversation: &str) -> usize {
    let r: Value = reqwest::Client::new()
        .get(format!(
            "{api}/conversations/{conversation}/messages?from_seq=1&to_seq=1000"
        ))
        .bearer_auth(token)
        .send()
        .await
        .expect("pull")
        .json()
        .await
        .expect("pull body");
    r["messages"].as_array().map(Vec::len).unwrap_or(0)
}

async fn token(api: &str, user: &str) -> String {
    let r: Value = reqwest::Client::new()
        .post(format!("{api}/auth/token"))
        .header("X-Admin-Secret", ADMIN)
        .json(&serde_json::json!({"user_id": user, "platform": 3}))
        .send()
        .await
        .expect("token")
        .json()
        .await
        .expect("token body");
    r["token"].as_str().expect("a token").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_history_commit_still_pushes_every_message() {
    let c = Cluster::new();
    let _gateway = c.start("gateway", &[]).await;
    let _api = c.start("api", &[]).await;
    let _im_msg = c.start("im_msg", &[]).await;
    let _im_push = c.start("im_push", &[]).await;
    // The transfer process stores messages in the history, and its next
    // stage never hands them on (as if it died right after the commit).
    let transfer = c
        .start("im_msg_transfer", &[("IMFLOW_FAULTS", "stall-output:hot")])
        .await;
    // The internal ports take only the cluster secret.
    let send = serde_json::json!({"sender": "mallory", "req": {"client_msg_id": "x", "recv_id": "bob", "content_type": 101, "content": {"text": "hi"}}});
    for secret in [None, Some(ADMIN), Some("guess")] {
        let mut req = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{}/rpc/send", c.im_msg_port))
            .json(&send);
        if let Some(s) = secret {
            req = req.header("x-imflow-cluster-secret", s);
        }
        let st = req.send().await.expect("rpc").status().as_u16();
        assert_eq!(st, 403, "secret {secret:?}");
    }
    let endpoint = c.endpoint();
    let api = format!("http://127.0.0.1:{}", c.api_port);
    let load = Load::start(&endpoint, "cr", "p", 8, 10.0, 4, &[]).await;
    load.wait_acked(8 * 5).await;
    // Wait for the event: the history holds messages nobody was pushed.
    let (s0, r0) = common::load::pair_users("cr", 0);
    let t = token(&api, &r0).await;
    let conversation = if s0 < r0 {
        format!("si_{s0}_{r0}")
    } else {
        format!("si_{r0}_{s0}")
    };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while stored(&api, &t, &conversation).await < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing reached the history"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    transfer.kill().await;
    let _transfer = c.start("im_msg_transfer", &[]).await;
    // Every receiver stayed connected to the gateway throughout: each must
    // get every message by push, those stored before the crash included.
    let logs = load.finish().await;
    assert_all_pushed(&logs);
    assert!(common::load::acked(&logs) >= 40);
    // The restarted process knew which seqs were still in flight: none was
    // handed out twice, so none had to move, and pushes kept seq order.
    for l in &logs {
        let seqs: Vec<u64> = l.pushes.iter().map(|(_, s, _)| *s).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{}: pushes out of seq order: {seqs:?}",
            l.conversation
        );
    }
    let _ = Path::new("");
}

/// PROTOCOL guarantee 6: a client that connects and syncs learns every
/// message, by that sync or by push, without a later message revealing it.
/// The push processes learn of a new connection from the presence registry;
/// with the gateway slow to record it (a slow Redis, injected), a sync
/// answered at once would miss a message stored just after it, pushed
/// while no push process knew the connection. The connection answers only
/// once its presence is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_connects_and_syncs_gets_the_next_message_by_push() {
    let c = Cluster::new();
    let _gateway = c
        .start("gateway", &[("IMFLOW_FAULTS", "delay-presence:1500")])
        .await;
    let _api = c.start("api", &[]).await;
    let _im_msg = c.start("im_msg", &[]).await;
    let _im_push = c.start("im_push", &[]).await;
    let _transfer = c.start("im_msg_transfer", &[]).await;
    let s = common::TestServer::attach(
        &format!("127.0.0.1:{}", c.gateway_port),
        &format!("127.0.0.1:{}", c.api_port),
    );
    let users: Vec<String> = (0..3).map(|i| format!("newcomer{i}")).collect();
    let mut all: Vec<&str> = users.iter().map(String::as_str).collect();
    all.push("sender");
    s.register(&all).await;
    let mut sender = s.connect("sender", 1).await;
    for u in &users {
        let mut newcomer = s.connect(u, 1).await;
        let sync = newcomer.request(serde_json::json!({"op": "sync"})).await;
        assert_eq!(sync["op"], "sync", "{sync}");
        let ack = sender
            .send_text(common::Target::User(u), &format!("to-{u}"), "hello")
            .await;
        assert_eq!(ack["op"], "ack", "{ack}");
        let id = ack["server_msg_id"].clone();
        let pushed = tokio::time::timeout(Duration::from_secs(10), newcomer.push_of(&id)).await;
        assert!(
            pushed.is_ok(),
            "{u}: the message after its sync was never pushed"
        );
    }
}

/// An etcd of this test's own, which it may kill and start again empty.
struct Etcd {
    child: Child,
    client_port: u16,
    peer_port: u16,
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// A fresh etcd (no data) on the given ports, once it answers.
    async fn start(client_port: u16, peer_port: u16) -> Etcd {
        let dir = tempfile::tempdir().expect("tempdir");
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("etcd (script/infra.sh installs it)");
        let e = Etcd {
            child,
            client_port,
            peer_port,
            _dir: dir,
        };
        e.members("").await;
        e
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// The processes announced under `prefix`, once etcd answers.
    async fn members(&self, prefix: &str) -> Vec<imflow_gateways::discovery::Member> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let listed =
                match imflow_gateways::discovery::Discovery::connect(&[self.addr()], prefix, None)
                    .await
                {
                    Ok(d) => d.members().await.map(|(m, _)| m).ok(),
                    Err(_) => None,
                };
            if let Some(m) = listed {
                return m;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "etcd at {} never answered",
                self.addr()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL; its ports, for a new etcd with no data (the worst an etcd
    /// outage can leave: a node rebuilt from nothing). Its data goes too.
    async fn kill(mut self) -> (u16, u16) {
        self.child.start_kill().expect("SIGKILL");
        let _ = self.child.wait().await;
        (self.client_port, self.peer_port)
    }
}

/// etcd is only where processes find each other: while it is gone the
/// cluster keeps serving with the processes it knows, and when it comes
/// back (empty, at worst) every process announces itself again, so a
/// process started afterwards finds the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_gone_and_back_empty_costs_no_message() {
    let etcd = Etcd::start(free_port(), free_port()).await;
    let c = Cluster::with_etcd(&etcd.addr());
    let prefix = c.etcd_prefix();
    let _gateway = c.start("gateway", &[]).await;
    let _api = c.start("api", &[]).await;
    let _im_msg = c.start("im_msg", &[]).await;
    let im_push = c.start("im_push", &[]).await;
    let _transfer = c.start("im_msg_transfer", &[]).await;
    assert_eq!(etcd.members(&prefix).await.len(), 5);
    let load = Load::start(&c.endpoint(), "ed", "p", 8, 10.0, 4, &[]).await;
    load.wait_acked(8 * 5).await;
    let (client_port, peer_port) = etcd.kill().await;
    // Messages keep flowing while etcd is gone, longer than a lease lives
    // (80 msg/s: some 6 s).
    let before = load.acked_so_far();
    load.wait_acked(before + 8 * 10 * 6).await;
    let etcd = Etcd::start(client_port, peer_port).await;
    // Every process announces itself again in the new etcd.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let listed = etcd.members(&prefix).await;
        if listed.len() == 5 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {listed:?} announced again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A push process started now finds the gateway through the new etcd.
    im_push.kill().await;
    let _im_push = c.start("im_push", &[]).await;
    let before = load.acked_so_far();
    load.wait_acked(before + 8 * 5).await;
    let logs = load.finish().await;
    assert_all_pushed(&logs);
}
