//! The cluster data plane under faults, against the real servers of
//! `script/infra.sh` (Kafka on 9092, MySQL 13306, MongoDB 37017, Redis
//! 16379), plus private Redis and MongoDB servers these tests may flush,
//! freeze and kill.
//!
//! Each fault runs under a steady load: alice sends to bob (single chat) and
//! to a group, resending whatever was not acknowledged, as a real client
//! does. Afterwards every conversation is checked: every acked message is
//! stored exactly once with the id its ack carried, seqs run 1..n without a
//! gap, and the online recipient got every seq by push, each once.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::faults::{check_everything, flowing, send_steadily};
use common::{send_frame, Client, Target, TestServer, PATIENCE};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A server process of its own (Redis or MongoDB) that a test may stop.
struct Private {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

/// The path of a server binary `script/infra.sh` installed: from the
/// environment (`script/test.sh` exports what `script/infra.sh paths`
/// prints), else where infra.sh puts it by default.
fn infra_binary(var: &str, default_in_venv: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        let tools = std::env::var("IMFLOW_TOOLS_DIR").unwrap_or_else(|_| {
            format!(
                "{}/.cache/imflow",
                std::env::var("HOME").unwrap_or_default()
            )
        });
        format!("{tools}/venv/{default_in_venv}")
    })
}

impl Private {
    /// Start `cmd` (which must listen on `port`, with its files in `dir`)
    /// and wait until it listens.
    async fn start(mut cmd: Command, port: u16, dir: tempfile::TempDir, what: &str) -> Private {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{what} (script/infra.sh installs it): {e}"));
        let p = Private {
            child,
            port,
            _dir: dir,
        };
        p.wait_until_it_answers().await;
        p
    }

    fn redis_command(port: u16, dir: &Path) -> Command {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir);
        cmd
    }

    async fn redis() -> Private {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let cmd = Self::redis_command(port, dir.path());
        Self::start(cmd, port, dir, "redis-server").await
    }

    /// One node of a Redis Cluster.
    async fn redis_cluster_node() -> Private {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cmd = Self::redis_command(port, dir.path());
        cmd.args([
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
        ]);
        Self::start(cmd, port, dir, "redis-server").await
    }

    async fn mongo() -> Private {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cmd = Command::new(infra_binary("IMFLOW_SECANTUSD", "bin/secantusd-py"));
        cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("--storage-path")
            .arg(dir.path());
        Self::start(cmd, port, dir, "secantusd-py").await
    }

    /// A MariaDB of its own (a fresh data directory; a few seconds).
    async fn mysql() -> Private {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let data = dir.path().join("data");
        let installed = Command::new("mariadb-install-db")
            .args(["--user=root", "--auth-root-authentication-method=normal"])
            .args(["--skip-test-db"])
            .arg(format!("--datadir={}", data.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .expect("mariadb-install-db (script/infra.sh installs it)");
        assert!(installed.success(), "mariadb-install-db");
        let mut cmd = Command::new("mariadbd");
        cmd.args(["--user=root", "--bind-address=127.0.0.1", "--skip-log-bin"])
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--port={port}"))
            .arg(format!("--socket={}", dir.path().join("sock").display()));
        Self::start(cmd, port, dir, "mariadbd").await
    }

    /// A tansu broker on `port` with the given storage engine, run in `dir`
    /// (tansu reads a `sqlite://` path relative to its working directory).
    fn tansu_command(bin: &Path, port: u16, storage: &str, dir: &Path) -> Command {
        let url = format!("tcp://127.0.0.1:{port}");
        let mut cmd = Command::new(bin);
        cmd.args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .args(["--storage-engine", storage])
        .current_dir(dir);
        cmd
    }

    /// A Kafka broker (the tansu of `script/infra.sh`) with in-memory topics.
    async fn kafka() -> Private {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let bin = infra_binary("IMFLOW_TANSU", "bin/tansu");
        let cmd = Self::tansu_command(Path::new(&bin), port, "memory://tansu/", dir.path());
        Self::start(cmd, port, dir, "tansu").await
    }

    /// A tansu that keeps its topics in SQLite under `dir`, on `port`
    /// (again after a restart).
    async fn kafka_persistent(bin: &Path, dir: &Path, port: u16) -> Private {
        let cmd = Self::tansu_command(bin, port, "sqlite://tansu.db", dir);
        let own = tempfile::tempdir().unwrap();
        Self::start(cmd, port, own, "tansu with SQLite storage").await
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Wait for the listening socket (the event), within the tests' patience.
    async fn wait_until_it_answers(&self) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while tokio::net::TcpStream::connect(self.addr()).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} never listened",
                self.addr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("running").to_string();
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} {pid}");
    }
}

async fn redis_cmd(addr: &str, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", addr.rsplit(':').next().unwrap()])
        .args(args)
        .output()
        .await
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

async fn cluster_server(tweak: impl FnOnce(&mut imflow::Config)) -> TestServer {
    TestServer::start_with(|c| {
        let dir = c.data_dir.clone();
        std::fs::create_dir_all(&dir).unwrap();
        common::use_cluster(c, &dir);
        tweak(c);
    })
    .await
}

async fn alice_bob_and_a_room(s: &TestServer) -> (Client, Client) {
    s.register(&["alice", "bob", "carol"]).await;
    let t = s.token("alice", 2).await;
    assert_eq!(s.create_group(&t, "room", &["bob", "carol"]).await, 201);
    (s.connect("alice", 1).await, s.connect("bob", 1).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_flushed_mid_run_loses_nothing_and_reuses_no_seq() {
    let redis = Private::redis().await;
    let addr = redis.addr();
    let s = cluster_server(|c| {
        if let Some(r) = c.redis.as_mut() {
            r.db_address = vec![addr.clone()];
        }
    })
    .await;
    let (mut a, mut b) = alice_bob_and_a_room(&s).await;
    let mut sent = flowing(&mut a, 60).await;
    assert_eq!(redis_cmd(&redis.addr(), &["FLUSHALL"]).await, "OK");
    sent.acked.extend(
        send_steadily(&mut a, "n", 60, usize::MAX, || async {})
            .await
            .acked,
    );
    check_everything(&mut a, &mut b, &sent, true).await;
    let t = s.token("bob", 3).await;
    let (_, convs) = s.call("GET", &t, "/conversations", None).await;
    let mut max: Vec<(String, u64)> = convs["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["conversation_id"].as_str().unwrap().into(),
                c["max_seq"].as_u64().unwrap(),
            )
        })
        .collect();
    max.sort();
    assert_eq!(
        max,
        [
            // 60 messages after the "group created" notification.
            ("sg_room".to_string(), 61),
            ("si_alice_bob".to_string(), 60)
        ],
        "sync after the flush reads the history"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_frozen_for_a_while_delays_but_drops_nothing() {
    let mongo = Private::mongo().await;
    let addr = mongo.addr();
    let s = cluster_server(|c| {
        if let Some(m) = c.mongo.as_mut() {
            m.db_address = vec![addr.clone()];
        }
    })
    .await;
    let (mut a, mut b) = alice_bob_and_a_room(&s).await;
    let mut sent = flowing(&mut a, 30).await;
    let failed_before = history_errors(&s).await;
    // Unreachable: the process stops answering (SIGSTOP), later resumes.
    mongo.signal("-STOP");
    sent.acked.extend(
        send_steadily(&mut a, "n", 50, usize::MAX, || async {})
            .await
            .acked,
    );
    // Sends kept being acked (they are durable in Kafka) while the history
    // could not be written. Once the history stage has felt it (a failed
    // commit, retried), MongoDB answers again and the pipeline catches up.
    let deadline = tokio::time::Instant::now() + PATIENCE * 2;
    while history_errors(&s).await == failed_before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the history stage never noticed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    mongo.signal("-CONT");
    check_everything(&mut a, &mut b, &sent, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_broker_frozen_past_the_session_timeout_loses_and_repeats_nothing() {
    let kafka = Private::kafka().await;
    let addr = kafka.addr();
    let s = cluster_server(|c| {
        if let Some(k) = c.kafka.as_mut() {
            k.addr = vec![addr.clone()];
        }
    })
    .await;
    let (mut a, mut b) = alice_bob_and_a_room(&s).await;
    let mut sent = flowing(&mut a, 20).await;
    kafka.signal("-STOP");
    // A send while the broker is away is not acked: its ack needs the
    // broker's confirmation. The broker stays away past the consumers'
    // session timeout (10 s), so the groups rebalance when it is back.
    let f = send_frame(Target::User("bob"), "n0", "while frozen");
    a.send_json(&f).await;
    let early = tokio::time::timeout(
        Duration::from_secs(12),
        a.next_where(|f| f["op"] == "ack" || f["op"] == "error"),
    )
    .await;
    assert!(
        early.is_err(),
        "answered while the broker was away: {early:?}"
    );
    kafka.signal("-CONT");
    // The first send is answered (acked, or `unavailable` and then resent
    // by send_steadily under the same client_msg_id).
    let first = a
        .next_where(|f| f["op"] == "ack" || f["op"] == "error")
        .await;
    if first["op"] == "ack" {
        sent.acked.insert(
            "n0".into(),
            (
                first["conversation_id"].as_str().unwrap().into(),
                first["server_msg_id"].as_str().unwrap().into(),
            ),
        );
    }
    let rest = send_steadily(&mut a, "n", 30, usize::MAX, || async {}).await;
    if let Some(id) = sent.acked.get("n0") {
        assert_eq!(
            rest.acked.get("n0"),
            Some(id),
            "a resend of n0 keeps its id"
        );
    }
    sent.acked.extend(rest.acked);
    check_everything(&mut a, &mut b, &sent, true).await;
    stop_before_the_broker(s).await;
}

/// Stop the server while its private broker still runs: Kafka consumers
/// closing against a dead broker would wait for it.
async fn stop_before_the_broker(mut s: TestServer) {
    if let Some(server) = s.server.take() {
        server.stop().await.expect("clean stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_of_three_nodes_serves_the_cluster_stores() {
    let nodes = [
        Private::redis_cluster_node().await,
        Private::redis_cluster_node().await,
        Private::redis_cluster_node().await,
    ];
    let addrs: Vec<String> = nodes.iter().map(Private::addr).collect();
    let create = Command::new("redis-cli")
        .arg("--cluster")
        .arg("create")
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .await
        .expect("redis-cli");
    assert!(
        create.status.success(),
        "{}",
        String::from_utf8_lossy(&create.stdout)
    );
    // Wait for the event: every node reports the cluster ok.
    for a in &addrs {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !redis_cmd(a, &["CLUSTER", "INFO"])
            .await
            .contains("cluster_state:ok")
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{a}: cluster never ok"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let s = cluster_server(|c| {
        if let Some(r) = c.redis.as_mut() {
            r.db_address = addrs.clone();
            r.enable_cluster = true;
        }
    })
    .await;
    let (mut a, mut b) = alice_bob_and_a_room(&s).await;
    // Resend keys (one per message) and the two conversations hash to
    // slots all over the cluster.
    let mut sent = flowing(&mut a, 20).await;
    let more = send_steadily(&mut a, "n", 20, usize::MAX, || async {}).await;
    sent.acked.extend(more.acked);
    check_everything(&mut a, &mut b, &sent, true).await;
    // The counters and caches really are spread over the nodes.
    let prefix = s.cfg.redis.as_ref().unwrap().key_prefix.clone();
    let mut holding = 0;
    for a in &addrs {
        let keys = redis_cmd(a, &["KEYS", &format!("{prefix}:*")]).await;
        if !keys.is_empty() {
            holding += 1;
        }
    }
    assert!(holding >= 2, "keys on {holding} node(s) only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_membership_change_on_one_process_reaches_the_others() {
    // Two processes on the same stores (as two hosts would be).
    let id = common::unique();
    let shared = |id: String| {
        move |c: &mut imflow::Config| {
            common::use_cluster_stores(c, &id);
            c.kafka = None;
            c.pipeline =
                std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/pipeline.yaml"));
        }
    };
    let one = TestServer::start_with(shared(id.clone())).await;
    let two = TestServer::start_with(shared(id)).await;
    one.register(&["alice", "bob", "carol"]).await;
    let t = one.token("alice", 2).await;
    assert_eq!(one.create_group(&t, "team", &["bob"]).await, 201);
    let mut carol = two.connect("carol", 1).await;
    let refused = carol
        .send_text(Target::Group("team"), "c0", "let me in")
        .await;
    assert_eq!(refused["code"], "forbidden", "{refused}");

    let (st, v) = one
        .call(
            "POST",
            &t,
            "/groups/team/members",
            Some(json!({"user_ids": ["carol"]})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    // The other process drops its cached membership when told; carol's
    // sends there are accepted from then on.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut n = 0;
    loop {
        n += 1;
        let r = carol
            .send_text(Target::Group("team"), &format!("c{n}"), "hi")
            .await;
        if r["op"] == "ack" {
            break;
        }
        assert_eq!(r["code"], "forbidden", "{r}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the other process never saw carol join"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The tansu built with SQLite storage by `script/infra.sh` (the pip one
/// keeps topics in memory, so a restart would lose them).
fn persistent_tansu() -> std::path::PathBuf {
    let path = std::env::var("IMFLOW_TANSU_SQLITE").expect(
        "IMFLOW_TANSU_SQLITE: a tansu built with SQLite storage (script/test.sh sets it from script/infra.sh tansu-sqlite)",
    );
    std::path::PathBuf::from(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_broker_restarted_loses_and_repeats_nothing() {
    let bin = persistent_tansu();
    let storage = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut kafka = Private::kafka_persistent(&bin, storage.path(), port).await;
    let addr = kafka.addr();
    let s = cluster_server(|c| {
        if let Some(k) = c.kafka.as_mut() {
            k.addr = vec![addr.clone()];
        }
    })
    .await;
    let (mut a, mut b) = alice_bob_and_a_room(&s).await;
    let mut sent = flowing(&mut a, 20).await;
    // Messages in flight when the broker goes down: sent, not yet answered.
    for i in 0..5 {
        let mut f = send_frame(Target::User("bob"), &format!("n{i}"), "in flight");
        f["rid"] = json!(format!("inflight{i}"));
        a.send_json(&f).await;
    }
    kafka.child.start_kill().expect("SIGKILL");
    let _ = kafka.child.wait().await;
    kafka = Private::kafka_persistent(&bin, storage.path(), port).await;
    // Whatever was answered is checked below; what failed is resent.
    let rest = send_steadily(&mut a, "n", 30, usize::MAX, || async {}).await;
    sent.acked.extend(rest.acked);
    check_everything(&mut a, &mut b, &sent, true).await;
    stop_before_the_broker(s).await;
    drop(kafka);
}

/// Failed history commits so far (the history stage's error counter).
async fn history_errors(s: &TestServer) -> f64 {
    s.metric("imflow_stage_errors_total", "stage=\"history\"")
        .await
}

fn bad(cfg: &mut imflow::Config, what: &str) {
    let unused = format!("127.0.0.1:{}", free_port());
    match what {
        "mysql" => cfg.mysql.as_mut().unwrap().db_mysql_address = vec![unused],
        "mysql-password" => cfg.mysql.as_mut().unwrap().db_mysql_password = "wrong".into(),
        "mongo" => cfg.mongo.as_mut().unwrap().db_address = vec![unused],
        "redis" => cfg.redis.as_mut().unwrap().db_address = vec![unused],
        _ => unreachable!(),
    }
}

#[tokio::test]
async fn bad_cluster_settings_fail_fast_naming_the_setting() {
    for (what, names) in [
        ("mysql", "mysql.dbMysqlAddress"),
        ("mysql-password", "dbMysqlPassword"),
        ("mongo", "mongo.dbAddress"),
        ("redis", "redis.dbAddress"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = common::test_config(dir.path().join("data"));
        common::use_cluster(&mut cfg, dir.path());
        bad(&mut cfg, what);
        let started = std::time::Instant::now();
        let err = match imflow::Server::start(cfg).await {
            Ok(_) => panic!("{what}: a bad setting must stop the start"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(names), "{what}: {err}");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{what}: failed fast, not after {:?}",
            started.elapsed()
        );
    }
}

/// The binary as a separate process, so a test can SIGKILL it.
struct Process {
    child: Child,
    gateway: String,
    api: String,
}

impl Process {
    async fn start(config: &Path) -> Process {
        let mut child = Command::new(env!("CARGO_BIN_EXE_imflow"))
            .args([
                "serve",
                "--log-json",
                "--gateway-addr",
                "127.0.0.1:0",
                "--api-addr",
                "127.0.0.1:0",
                "--config",
            ])
            .arg(config)
            .env("IMFLOW_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the imflow binary");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let (gateway, api) = tokio::time::timeout(PATIENCE * 3, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if v["fields"]["message"] == "imflow serving" {
                    return (
                        v["fields"]["gateway"].as_str().unwrap().to_string(),
                        v["fields"]["api"].as_str().unwrap().to_string(),
                    );
                }
            }
            panic!("imflow exited before serving");
        })
        .await
        .expect("imflow serves");
        // Keep draining its log so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Process {
            child,
            gateway,
            api,
        }
    }

    async fn kill(mut self) {
        self.child.start_kill().expect("SIGKILL");
        let _ = self.child.wait().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_between_produce_and_commit_then_restart_loses_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::test_config(dir.path().join("data"));
    common::use_cluster(&mut cfg, dir.path());
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, cluster_yaml(&cfg)).unwrap();

    let first = Process::start(&config).await;
    let mut s = TestServer::attach(&first.gateway, &first.api);
    let (mut a, _) = alice_bob_and_a_room(&s).await;
    // Offsets are committed every 200 ms, so under a steady load a kill
    // lands with messages produced but their offsets not yet committed.
    let before = send_steadily(&mut a, "b", 40, usize::MAX, || async {}).await;
    first.kill().await;

    let second = Process::start(&config).await;
    s.reattach(&second.gateway, &second.api);
    let mut a = s.connect("alice", 1).await;
    let mut b = s.connect("bob", 1).await;
    // The same messages again, as a client that never saw the acks would
    // send them: recognised, with the ids of the first acks.
    let again = send_steadily(&mut a, "b", 40, usize::MAX, || async {}).await;
    assert_eq!(
        again.acked, before.acked,
        "resends across the crash keep their ids"
    );
    let mut sent = send_steadily(&mut a, "m", 80, usize::MAX, || async {}).await;
    sent.acked.extend(before.acked);
    check_everything(&mut a, &mut b, &sent, false).await;
    second.kill().await;
}

fn cluster_yaml(cfg: &imflow::Config) -> String {
    let k = cfg.kafka.as_ref().unwrap();
    let m = cfg.mysql.as_ref().unwrap();
    let g = cfg.mongo.as_ref().unwrap();
    let r = cfg.redis.as_ref().unwrap();
    format!(
        "pipeline: {}\nadmin_secret: {}\nkafka:\n  addr: [{}]\n  group_prefix: {}\n  linger_ms: 1\n\
         mysql:\n  dbMysqlAddress: [{}]\n  dbMysqlDatabaseName: {}\n\
         mongo:\n  dbAddress: [{}]\n  dbDatabase: {}\n\
         redis:\n  dbAddress: [{}]\n  keyPrefix: {}\n\
         websocket:\n  rate_limit_per_sec: 100000\n  rate_limit_burst: 100000\n",
        cfg.pipeline.display(),
        common::ADMIN,
        k.addr.join(", "),
        k.group_prefix,
        m.db_mysql_address.join(", "),
        m.db_mysql_database_name,
        g.db_address.join(", "),
        g.db_database,
        r.db_address.join(", "),
        r.key_prefix,
    )
}

/// Set the Redis seq counter of `conversation` (what a Redis restored from
/// an older snapshot, or a failover to a lagging replica, leaves behind).
async fn set_counter(s: &TestServer, conversation: &str, value: i64) {
    let r = s.cfg.redis.as_ref().unwrap();
    let key = format!("{}:seq:{{{conversation}}}", r.key_prefix);
    let addr = r.db_address[0].clone();
    assert_eq!(
        redis_cmd(&addr, &["SET", &key, &value.to_string()]).await,
        "OK"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_behind_or_ahead_of_the_history_loses_nothing_and_leaves_no_hole() {
    use common::load::{Endpoint, Load};
    let mut s = cluster_server(|_| {}).await;
    // The issue's case first, exactly: 10 messages, the counter set back
    // to 3 while the server is down, 3 more.
    s.register(&["alice", "bob"]).await;
    let mut a = s.connect("alice", 1).await;
    let mut acked = std::collections::BTreeMap::new();
    for i in 0..10 {
        let r = a
            .send_text(Target::User("bob"), &format!("x{i}"), "before")
            .await;
        acked.insert(
            format!("x{i}"),
            r["server_msg_id"].as_str().unwrap().to_string(),
        );
        a.stored(&r).await;
    }
    drop(a);
    let endpoint = Endpoint::new(&s.ws, &s.api);
    // And the same under a pipelined load over 24 conversations.
    let load = Load::start(&endpoint, "sc", "p1", 24, 20.0, 4, &[]).await;
    load.wait_acked(24 * 10).await;
    let first = load.finish().await;

    s.stop_server().await;
    set_counter(&s, "si_alice_bob", 3).await;
    for (i, l) in first.iter().enumerate() {
        let n = l.stored.len() as i64;
        // Half behind (as after an old snapshot), half ahead (as if seqs
        // were handed out and lost).
        let v = if i % 2 == 0 { 2 } else { n + 40 };
        set_counter(&s, &l.conversation, v).await;
    }
    s.start_again().await;
    endpoint.set(&s.ws, &s.api);
    let mut a = s.connect("alice", 1).await;
    for i in 10..13 {
        let r = a
            .send_text(Target::User("bob"), &format!("x{i}"), "after")
            .await;
        assert_eq!(r["op"], "ack", "{r}");
        acked.insert(
            format!("x{i}"),
            r["server_msg_id"].as_str().unwrap().to_string(),
        );
        a.stored(&r).await;
    }
    let r = a
        .request(
            json!({"op": "pull", "conversation_id": "si_alice_bob", "from_seq": 1, "to_seq": 100}),
        )
        .await;
    common::load::check_stored("si_alice_bob", r["messages"].as_array().unwrap(), &acked);

    let load = Load::start(&endpoint, "sc", "p2", 24, 20.0, 4, &first).await;
    load.wait_acked(24 * 10).await;
    let second = load.finish().await;
    assert!(common::load::acked(&second) >= 240);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_failed_past_the_message_timeout_is_retried_and_never_wedges_its_partition() {
    use common::load::{Endpoint, Load};
    let kafka = Private::kafka().await;
    let mongo = Private::mongo().await;
    let (k_addr, m_addr) = (kafka.addr(), mongo.addr());
    let s = cluster_server(|c| {
        if let Some(k) = c.kafka.as_mut() {
            k.addr = vec![k_addr.clone()];
            // Writes fail soon after the broker stops answering.
            k.message_timeout_ms = 1500;
        }
        if let Some(m) = c.mongo.as_mut() {
            m.db_address = vec![m_addr.clone()];
        }
    })
    .await;
    let endpoint = Endpoint::new(&s.ws, &s.api);
    let load = Load::start(&endpoint, "mt", "p", 16, 20.0, 4, &[]).await;
    load.wait_acked(16 * 5).await;
    // Items pile up in the history stage (fetched from msg_to_mongo, not
    // yet stored) while MongoDB is away ...
    mongo.signal("-STOP");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let own = s
        .cfg
        .kafka
        .as_ref()
        .unwrap()
        .group_prefix
        .replace("test-", "");
    while s
        .metric(
            "imflow_kafka_uncommitted",
            &format!("stage=\"history\",topic=\"msg_to_mongo-{own}"),
        )
        .await
        < 50.0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing piled up in the history stage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ... and when it is back, the broker is away: their writes onward
    // (ms2ps_chat) time out, and the consumer hands them over again (and
    // again, while the broker is away).
    kafka.signal("-STOP");
    mongo.signal("-CONT");
    let deadline = tokio::time::Instant::now() + PATIENCE * 2;
    while s.metric("imflow_kafka_items_retried_total", &own).await < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no item was ever handed over again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    kafka.signal("-CONT");
    // Everything acked is stored once, and each receiver got every message
    // by push (a write that timed out is retried after later ones of its
    // conversation went through: it arrives late, but it arrives).
    let logs = load.finish().await;
    common::load::assert_all_pushed(&logs);
    // Every partition's offsets move past the failures: nothing handed over
    // stays uncommitted (a wedged partition would hold it forever and
    // replay everything since after a restart). (This server's topics: the
    // metrics of other tests' servers in this process are there too.)
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let left = s.metric("imflow_kafka_uncommitted", &own).await;
        if left == 0.0 {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let text = s
                .http
                .get(format!("{}/metrics", s.api))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("imflow_kafka_uncommitted") && l.contains(&own))
                .collect();
            panic!("{left} items stay uncommitted: {lines:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop_before_the_broker(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_away_for_a_while_under_load_loses_nothing() {
    use common::load::{Endpoint, Load};
    let redis = Private::redis().await;
    let addr = redis.addr();
    let s = cluster_server(|c| {
        if let Some(r) = c.redis.as_mut() {
            r.db_address = vec![addr.clone()];
        }
    })
    .await;
    let endpoint = Endpoint::new(&s.ws, &s.api);
    let load = Load::start(&endpoint, "ra", "p", 12, 20.0, 4, &[]).await;
    load.wait_acked(12 * 5).await;
    // Redis stops answering: resend claims and seq counters wait (sends are
    // refused as unavailable and resent), nothing is skipped.
    redis.signal("-STOP");
    load.wait_refused(12).await;
    redis.signal("-CONT");
    let logs = load.finish().await;
    common::load::assert_all_pushed(&logs);
}

/// A verify that read the old token generation from MySQL just before a
/// logout must not put it back into the cache after the logout wrote the
/// new one (a revoked token would pass for an hour): the cache keeps the
/// larger generation, whatever the order the two writes land in.
#[tokio::test]
async fn a_stale_token_generation_never_replaces_a_newer_one_in_the_cache() {
    use imflow_stages::store::redis::{Redis, RedisSettings};
    let redis = Redis::connect(RedisSettings {
        prefix: common::unique(),
        ..Default::default()
    })
    .await
    .expect("the infra Redis");
    // The logout's write lands first, the racing verify's second.
    redis.cache_generation("alice", 1, 5).await.unwrap();
    redis.cache_generation("alice", 1, 4).await.unwrap();
    assert_eq!(redis.cached_generation("alice", 1).await.unwrap(), Some(5));
    redis.cache_generation("alice", 1, 6).await.unwrap();
    assert_eq!(redis.cached_generation("alice", 1).await.unwrap(), Some(6));
}

/// A sequenced single-chat message from `a` to `b`, as the history stores it.
fn sequenced(
    conversation: &str,
    seq: u64,
    id: &str,
    body: String,
) -> imflow_stages::model::Sequenced {
    use imflow_stages::model::{Sequenced, Stamped, Target};
    Sequenced {
        msg: Stamped {
            conversation_id: conversation.into(),
            server_msg_id: id.into(),
            client_msg_id: format!("c-{id}").into(),
            sender: "a".into(),
            target: Target::User("b".into()),
            content_type: 101,
            content: "{}".into(),
            send_time: 0,
        },
        seq,
        body: body.into(),
    }
}

/// A replayed batch in MongoDB: each message met as a duplicate is either
/// its own earlier copy (done) or another message's seq (taken), told apart
/// across conversations by one index lookup per conversation.
#[tokio::test]
async fn a_replayed_batch_in_mongodb_tells_its_own_copies_from_taken_seqs() {
    use imflow_stages::store::mongo::{MongoHistory, MongoSettings};
    use imflow_stages::store::History;
    let history = MongoHistory::connect(&MongoSettings {
        database: common::unique(),
        ..Default::default()
    })
    .await
    .expect("the infra MongoDB");
    let sequenced =
        |conv: &str, seq: u64, id: &str| sequenced(conv, seq, id, format!("{{\"id\":\"{id}\"}}"));
    let first = vec![
        sequenced("si_a_b", 1, "m1"),
        sequenced("si_a_b", 2, "m2"),
        sequenced("si_a_c", 1, "n1"),
    ];
    assert!(history.commit(first).await.expect("commit").is_empty());
    let replay = vec![
        sequenced("si_a_b", 1, "m1"),
        sequenced("si_a_b", 2, "other"),
        sequenced("si_a_c", 1, "n1"),
        sequenced("si_a_c", 2, "n2"),
        sequenced("si_a_c", 1, "another"),
    ];
    assert_eq!(history.commit(replay).await.expect("commit"), vec![1, 4]);
    let stored = history.range("si_a_c", 1, 9).await.expect("range");
    let bodies: Vec<&str> = stored.iter().map(|(_, b)| &**b).collect();
    assert_eq!(bodies, [r#"{"id":"n1"}"#, r#"{"id":"n2"}"#]);
    let stored = history.range("si_a_b", 1, 9).await.expect("range");
    assert_eq!(stored[1].1.as_ref(), r#"{"id":"m2"}"#);
}

/// A partition that moves (a crash, a rebalance) while seqs handed out by
/// its old owner are still on their way to the history: the new owner
/// starts above them, so no seq is handed out twice and nothing has to be
/// given a new seq (and pushed out of order) later. A counter ahead of the
/// history with nothing on its way is still brought back to the history.
#[tokio::test]
async fn seqs_still_in_flight_when_a_partition_moves_are_not_handed_out_again() {
    use imflow_stages::store::mongo::{MongoHistory, MongoSettings};
    use imflow_stages::store::redis::{Redis, RedisSequencer, RedisSettings};
    use imflow_stages::store::{seq_memory, History, Sequencer};
    use std::sync::Arc;
    let id = common::unique();
    let redis = Redis::connect(RedisSettings {
        prefix: id.clone(),
        ..Default::default()
    })
    .await
    .expect("the infra Redis");
    let history: Arc<dyn History> = MongoHistory::connect(&MongoSettings {
        database: id.clone(),
        ..Default::default()
    })
    .await
    .expect("the infra MongoDB");
    let sequencer = RedisSequencer::new(redis.clone(), history.clone());
    let conv: Arc<str> = "si_a_b".into();
    let msg = |i: usize| -> (Arc<str>, Arc<str>) { (conv.clone(), format!("m{i}").into()) };
    let sequenced =
        |i: usize, seq: u64| sequenced(&conv, seq, &format!("m{i}"), format!("{{\"seq\":{seq}}}"));

    // The old owner hands out 1..=5; the history has stored 1..=2 when the
    // partition moves.
    let mut old_owner = seq_memory(16);
    let first: Vec<_> = (1..=5).map(msg).collect();
    assert_eq!(
        sequencer.assign(&mut old_owner, &first).await.unwrap(),
        vec![1, 2, 3, 4, 5]
    );
    let taken = history
        .commit(vec![sequenced(1, 1), sequenced(2, 2)])
        .await
        .unwrap();
    assert!(taken.is_empty());
    sequencer.stored(&[(conv.clone(), 2)]).await.unwrap();

    // The new owner meets the conversation for the first time.
    let mut new_owner = seq_memory(16);
    assert_eq!(
        sequencer.assign(&mut new_owner, &[msg(6)]).await.unwrap(),
        vec![6],
        "3..=5 are still on their way: not handed out again"
    );
    // The replays of 3..=5 and the new message all find their seqs free.
    let taken = history
        .commit((3..=6).map(|i| sequenced(i, i as u64)).collect())
        .await
        .unwrap();
    assert!(taken.is_empty(), "no seq was taken twice");
    sequencer.stored(&[(conv.clone(), 6)]).await.unwrap();

    // A batch stored between a new owner's read of the history's max and
    // its first seq (simulated: the history is told of 7..=9 and the
    // owner reads 6): the stored mark still keeps it above them.
    sequencer.stored(&[(conv.clone(), 9)]).await.unwrap();
    let mut racing_owner = seq_memory(16);
    assert_eq!(
        sequencer
            .assign(&mut racing_owner, &[msg(10)])
            .await
            .unwrap(),
        vec![10]
    );
    let _ = history
        .commit((7..=10).map(|i| sequenced(i, i as u64)).collect())
        .await
        .unwrap();
    sequencer.stored(&[(conv.clone(), 10)]).await.unwrap();

    // Nothing on its way, and a counter ahead of the history (seqs handed
    // out and lost): the next owner starts from the history, leaving no hole.
    let key = format!("{id}:seq:{{si_a_b}}");
    assert_eq!(
        redis_cmd("127.0.0.1:16379", &["SET", &key, "40"]).await,
        "OK"
    );
    let mut third_owner = seq_memory(16);
    assert_eq!(
        sequencer
            .assign(&mut third_owner, &[msg(11)])
            .await
            .unwrap(),
        vec![11]
    );
}

/// MySQL holds the directory (users, groups, tokens); the send path reads
/// it through caches. Frozen, it must neither stop messages in
/// conversations already going nor hang what needs it: those requests are
/// answered `unavailable` within seconds. Back, everything works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_frozen_for_a_while_stops_no_conversation_and_hangs_no_request() {
    use common::load::{Endpoint, Load};
    let mysql = Private::mysql().await;
    let addr = mysql.addr();
    let s = cluster_server(|c| {
        if let Some(m) = c.mysql.as_mut() {
            m.db_mysql_address = vec![addr.clone()];
        }
    })
    .await;
    let endpoint = Endpoint::new(&s.ws, &s.api);
    let load = Load::start(&endpoint, "my", "p", 8, 10.0, 4, &[]).await;
    load.wait_acked(8 * 5).await;
    mysql.signal("-STOP");
    // Conversations already going keep going (80 msg/s: some 3 s).
    let before = load.acked_so_far();
    load.wait_acked(before + 8 * 10 * 3).await;
    // What needs MySQL is refused, not left hanging.
    let http = reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .unwrap();
    let started = tokio::time::Instant::now();
    let r = http
        .post(format!("{}/auth/register", s.api))
        .header("X-Admin-Secret", common::ADMIN)
        .json(&json!({"users": [{"user_id": "newcomer"}]}))
        .send()
        .await
        .expect("an answer while MySQL is frozen");
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    assert_eq!(
        (status, &body["code"]),
        (503, &json!("unavailable")),
        "{body}"
    );
    let took = started.elapsed();
    // The pool's acquire timeout (5 s) answers, not the REST deadline (30 s).
    assert!(
        took < Duration::from_secs(15),
        "refused only after {took:?}"
    );
    mysql.signal("-CONT");
    let logs = load.finish().await;
    common::load::assert_all_pushed(&logs);
    let r = http
        .post(format!("{}/auth/register", s.api))
        .header("X-Admin-Secret", common::ADMIN)
        .json(&json!({"users": [{"user_id": "newcomer"}]}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    eprintln!("the refusal took {took:?}");
}

/// A send in flight through an ingest process that dies holds its resend
/// claim; the client's resend through another process takes it over as
/// soon as the first process is known dead (its heartbeat key expired), not
/// after the takeover time (here a minute, so only the death can explain
/// the takeover). While the first process lives, the claim holds.
#[tokio::test]
async fn a_resend_claim_of_a_dead_process_is_taken_over_at_once() {
    use imflow_stages::model::{Stamped, Target as To};
    use imflow_stages::store::redis::{Redis, RedisSettings, ResendClaim};
    let settings = RedisSettings {
        prefix: common::unique(),
        resend_takeover: Duration::from_secs(60),
        ..Default::default()
    };
    let first = Redis::connect(settings.clone())
        .await
        .expect("the infra Redis");
    let second = Redis::connect(settings).await.expect("the infra Redis");
    let msg = Stamped {
        conversation_id: "si_alice_bob".into(),
        server_msg_id: "first-id".into(),
        client_msg_id: "c1".into(),
        sender: "alice".into(),
        target: To::User("bob".into()),
        content_type: 101,
        content: r#"{"text":"hi"}"#.into(),
        send_time: 1,
    };
    assert!(matches!(
        first.claim_resend(&msg).await.unwrap(),
        ResendClaim::New { .. }
    ));
    let mut resend = msg.clone();
    resend.server_msg_id = "second-id".into();
    assert!(matches!(
        second.claim_resend(&resend).await.unwrap(),
        ResendClaim::Pending
    ));
    // The first process dies: its heartbeat stops.
    drop(first);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match second.claim_resend(&resend).await.unwrap() {
            ResendClaim::TakeOver { first, .. } => {
                assert_eq!(first.server_msg_id, "first-id", "the first's ids");
                break;
            }
            ResendClaim::Pending => {}
            _ => panic!("neither held nor taken over"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dead process's claim was never taken over"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
