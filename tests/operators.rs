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

const HOSTS: [&str; 2] = ["127.0.0.2", "127.0.0.3"];

struct Cluster {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Cluster {
    /// config/config.yaml with this test's own topics, consumer groups,
    /// databases, Redis keys and etcd prefix, and the two hosts.
    fn new() -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
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
            .replace("group_prefix: imflow", &format!("group_prefix: {id}"))
            .replace("etcdSchema: imflow", &format!("etcdSchema: {id}"))
            .replace(
                "dbMysqlDatabaseName: imflow",
                &format!("dbMysqlDatabaseName: {id}"),
            )
            .replace("dbDatabase: imflow", &format!("dbDatabase: {id}"))
            .replace("keyPrefix: imflow", &format!("keyPrefix: {id}"))
            .replace("rate_limit_per_sec: 100", "rate_limit_per_sec: 10000")
            + "\nhosts:\n  - addr: 127.0.0.2\n  - addr: 127.0.0.3\n";
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, text).expect("write config");
        Cluster { dir, config }
    }

    fn run_dir(&self, host: &str) -> PathBuf {
        self.dir.path().join(format!("run-{host}"))
    }

    /// Run one of the operators' scripts for `host`: (success, stdout).
    async fn script(&self, name: &str, host: &str) -> (bool, String) {
        let root = env!("CARGO_MANIFEST_DIR");
        let out = tokio::process::Command::new(format!("{root}/script/{name}"))
            .args(["--config", &self.config.display().to_string()])
            .args(["--host", host])
            .args(["--bin", env!("CARGO_BIN_EXE_imflow")])
            .args(["--run-dir", &self.run_dir(host).display().to_string()])
            .args([
                "--log-dir",
                &self
                    .dir
                    .path()
                    .join(format!("logs-{host}"))
                    .display()
                    .to_string(),
            ])
            .args(["--timeout", "120"])
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
        let root = env!("CARGO_MANIFEST_DIR");
        for h in HOSTS {
            let _ = std::process::Command::new(format!("{root}/script/stop_all.sh"))
                .args(["--config", &self.config.display().to_string()])
                .args(["--host", h])
                .args(["--bin", env!("CARGO_BIN_EXE_imflow")])
                .args(["--run-dir", &self.run_dir(h).display().to_string()])
                .args(["--timeout", "20"])
                .stdout(std::process::Stdio::null())
                .status();
        }
    }
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
        let got = tokio::time::timeout(
            Duration::from_millis(500),
            to.next_where(|f| {
                f["op"] == "push"
                    && f["messages"]
                        .as_array()
                        .is_some_and(|m| m.iter().any(|m| m["server_msg_id"] == id))
            }),
        )
        .await;
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
    for member in [&mut bob, &mut carol] {
        let got: Vec<String> = pushed_with(member, "g", 10)
            .await
            .into_iter()
            .map(|m| m["content"]["text"].as_str().unwrap().to_string())
            .collect();
        let want: Vec<String> = (0..10).map(|i| format!("to all {i}")).collect();
        assert_eq!(got, want);
    }
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
