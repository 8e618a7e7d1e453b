//! Live reload under load, in both run modes: a pipeline file refused for
//! its errors leaves the running graph serving; changed options, a stage
//! added (a webhook) and the same stage removed each swap the pipeline
//! while conversations keep sending, and nothing is lost, duplicated,
//! refused or disconnected. The ack latency around each reload is printed
//! beside the rest of the run's (`cargo test --test reload -- --nocapture`).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use common::load::{Endpoint, Load, PairLog};
use common::TestServer;
use imflow_gateways::reload::ReloadReport;
use serde_json::Value;
use tokio::sync::watch;
use tokio::time::Instant;

const STAGE: &str = "after_send";

/// A webhook receiver on loopback: counts the messages it was given.
async fn receiver() -> (watch::Receiver<usize>, String) {
    let (tx, rx) = watch::channel(0usize);
    let tx = Arc::new(tx);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: Bytes| {
            let tx = tx.clone();
            async move {
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let n = v["messages"].as_array().map_or(0, Vec::len);
                tx.send_modify(|seen| *seen += n);
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (rx, url)
}

/// The pipeline text with a webhook after `hot`, in a group of its own.
fn with_webhook(text: &str, url: &str, id: &str) -> String {
    let stage = format!(
        "  {STAGE}:\n    kind: webhook\n    inputs:\n      - from: hot\n        topic: reload-hook-{id}\n        partitions: 2\n    options: {{url: '{url}', secret: a-webhook-secret-of-the-tests, batch: 16}}\n\n"
    );
    text.replace("  fanout:\n", &format!("{stage}  fanout:\n"))
        .replace(
            "processes:\n",
            &format!("processes:\n  im_hook:\n    stages: [{STAGE}]\n    count: 1\n"),
        )
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write the pipeline file");
}

/// The p99 of the ack latencies of messages first sent in `[from, to)`.
fn p99(logs: &[PairLog], keep: impl Fn(Instant) -> bool) -> (usize, Duration) {
    let mut v: Vec<Duration> = logs
        .iter()
        .flat_map(|l| l.acks.iter())
        .filter(|(sent, _)| keep(*sent))
        .map(|(_, took)| *took)
        .collect();
    v.sort();
    let at = (v.len() * 99).div_ceil(100).saturating_sub(1);
    (v.len(), v.get(at).copied().unwrap_or_default())
}

#[tokio::test]
async fn three_reloads_under_load_lose_duplicate_refuse_and_disconnect_nothing() {
    let (mut hooked, url) = receiver().await;
    let id = common::unique();
    let s = TestServer::start_with(|cfg| {
        let text = std::fs::read_to_string(&cfg.pipeline).expect("pipeline");
        let path = cfg.data_dir.parent().expect("parent").join("pipeline.yaml");
        write(&path, &text);
        cfg.pipeline = path;
    })
    .await;
    let file = s.cfg.pipeline.clone();
    let original = std::fs::read_to_string(&file).expect("pipeline");
    let server = s.server.as_ref().expect("in-process server");
    let reload = || async { server.reload().await };

    let endpoint = Endpoint::new(&s.ws, &s.api);
    let load = Load::start(&endpoint, &format!("rl{id}"), "a", 10, 20.0, 8, &[]).await;
    load.wait_acked(100).await;

    // The same file: nothing to do, nothing paused.
    let same = reload().await;
    assert!(!same.refused() && !same.reloaded, "{same:?}");
    assert_eq!(same.paused_ms, 0);

    // A broken file: every error, and the graph keeps serving.
    let broken = original
        .replace("kind: fanout", "kind: fan-out")
        .replace("max_batch: 512", "max_batch: lots");
    write(&file, &broken);
    let refused = reload().await;
    assert!(refused.refused() && !refused.reloaded, "{refused:?}");
    let all = refused.errors.join("\n");
    assert!(
        all.contains("fan-out") && all.contains("max_batch"),
        "both errors named: {all}"
    );
    if common::cluster_mode() {
        // Kafka edges: moving an edge to another topic would strand what
        // is unread in the old one, and a topic's partition count cannot
        // change in place; both are refused, naming the way out.
        let moved = original.replace("topic: ms2ps_chat", "topic: moved-ms2ps_chat");
        write(&file, &moved);
        let r = reload().await;
        let all = r.errors.join("\n");
        assert!(
            !r.reloaded && all.contains("`hot` -> `fanout` would move from topic"),
            "{r:?}"
        );
        let wider = original.replace("partitions: 10", "partitions: 12");
        write(&file, &wider);
        let r = reload().await;
        let all = r.errors.join("\n");
        assert!(
            !r.reloaded && all.contains("with 12 partitions, but") && all.contains("has 10"),
            "{r:?}"
        );
    }
    // A stretch with no reload: the baseline the reloads are compared to.
    let before = load.acked_so_far();
    load.wait_acked(before + 600).await;

    let mut reloads: Vec<(Instant, ReloadReport)> = Vec::new();
    // 1: options changed.
    let options = original
        .replace("max_batch: 512", "max_batch: 256")
        .replace("max_batch: 1024", "max_batch: 500");
    write(&file, &options);
    let at = Instant::now();
    let r = reload().await;
    assert!(r.reloaded, "{r:?}");
    assert_eq!(r.changed, vec!["history", "seq"], "{r:?}");
    assert!(r.added.is_empty() && r.removed.is_empty(), "{r:?}");
    reloads.push((at, r));
    let before = load.acked_so_far();
    load.wait_acked(before + 100).await;

    // 2: a webhook added: it starts, and is given what is sent after.
    write(&file, &with_webhook(&options, &url, &id));
    let at = Instant::now();
    let r = reload().await;
    assert!(r.reloaded, "{r:?}");
    assert_eq!(r.added, vec![STAGE], "{r:?}");
    reloads.push((at, r));
    tokio::time::timeout(common::PATIENCE, hooked.wait_for(|n| *n >= 50))
        .await
        .expect("the added webhook is given messages")
        .expect("receiver alive");

    // 3: the webhook removed: it drains first, then the rest runs on.
    write(&file, &options);
    let at = Instant::now();
    let r = reload().await;
    assert!(r.reloaded, "{r:?}");
    assert_eq!(r.removed, vec![STAGE], "{r:?}");
    assert!(r.drained, "{r:?}");
    reloads.push((at, r));
    let before = load.acked_so_far();
    load.wait_acked(before + 100).await;

    let refused_sends = load.refused_so_far();
    // Finish checks every message acked once, stored once at seqs 1..n,
    // and pushed to its receiver (once, while connected).
    let logs = load.finish().await;
    common::load::assert_all_pushed(&logs);
    assert_eq!(refused_sends, 0, "sends answered unavailable");
    for l in &logs {
        assert!(
            !l.receiver_reconnected && l.sender_reconnects == 0,
            "{}: a connection dropped",
            l.conversation
        );
        assert_eq!(l.resends, 0, "{}: a send went unanswered", l.conversation);
    }

    let near = |t: Instant| {
        reloads
            .iter()
            .any(|(at, _)| t + Duration::from_secs(1) >= *at && t <= *at + Duration::from_secs(2))
    };
    let (n, base) = p99(&logs, |t| !near(t));
    println!("ack p99 away from reloads: {base:?} over {n} messages");
    for (i, (at, r)) in reloads.iter().enumerate() {
        let (n, p) = p99(&logs, |t| {
            t + Duration::from_secs(1) >= *at && t <= *at + Duration::from_secs(2)
        });
        println!(
            "reload {}: +{:?} -{:?} ~{:?}, sends paused {} ms; ack p99 from 1 s before to 2 s after: {p:?} over {n} messages",
            i + 1,
            r.added,
            r.removed,
            r.changed,
            r.paused_ms
        );
    }
}

/// The server as an operator runs it: `imflow serve -c FILE`, reloaded by
/// `imflow reload -c FILE` and by `kill -HUP`. (The swap itself is the
/// same code in both run modes, tested above; this is about the signal,
/// the command and the config, so it runs once, standalone.)
#[tokio::test]
async fn sighup_and_imflow_reload_apply_the_files_and_refuse_a_broken_pipeline() {
    if common::cluster_mode() {
        return;
    }
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let pipeline = dir.path().join("pipeline.yaml");
    let original =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/pipeline.yaml")).unwrap();
    write(&pipeline, &original);
    let config = dir.path().join("config.yaml");
    let config_text = |max_connections: u32| {
        format!(
            "pipeline: {}\ndata_dir: {}\nadmin_secret: {}\nlisten:\n  gateway: 127.0.0.1:0\n  api: 127.0.0.1:{port}\nwebsocket:\n  max_connections: {max_connections}\n",
            pipeline.display(),
            dir.path().join("data").display(),
            common::ADMIN
        )
    };
    std::fs::write(&config, config_text(1000)).unwrap();
    let cfg = config.to_str().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_imflow"))
        .args(["serve", "-c", cfg, "--log-json"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("imflow serve");
    // Killed when the test fails, not left serving.
    struct Kill(u32);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = std::process::Command::new("kill")
                .arg(self.0.to_string())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
    let _kill = Kill(child.id());
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    let seen = std::cell::RefCell::new(Vec::new());
    let wait_log = |what: &[&str]| loop {
        let line = lines.recv_timeout(common::PATIENCE).unwrap_or_else(|_| {
            panic!(
                "no log line with {what:?} in:\n{}",
                seen.borrow().join("\n")
            )
        });
        seen.borrow_mut().push(line.clone());
        if what.iter().all(|w| line.contains(w)) {
            return line;
        }
    };
    wait_log(&["imflow serving"]);

    // Broken: exit 1, every error, and the server still answers.
    write(
        &pipeline,
        &original
            .replace("kind: fanout", "kind: fan-out")
            .replace("max_batch: 512", "max_batch: lots"),
    );
    let (code, out, err) = common::imflow(&["reload", "-c", cfg]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("refused") && out.contains("fan-out") && out.contains("max_batch"),
        "{out}"
    );
    let health = reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
        .await
        .expect("healthz");
    assert!(health.status().is_success());

    // Options and a config setting changed: the options apply, the
    // setting is named as waiting for a restart.
    write(
        &pipeline,
        &original.replace("max_batch: 512", "max_batch: 256"),
    );
    std::fs::write(&config, config_text(2000)).unwrap();
    let (code, out, err) = common::imflow(&["reload", "-c", cfg]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("changed seq"), "{out}");
    assert!(
        out.contains("applied at the next restart: websocket"),
        "{out}"
    );

    // That reload's own log line, so the one below can only be SIGHUP's.
    wait_log(&["reload done", "seq"]);

    // SIGHUP does the same.
    write(
        &pipeline,
        &original.replace("max_batch: 512", "max_batch: 128"),
    );
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(hup.success());
    wait_log(&["reload done", "seq"]);

    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().expect("exit");
    assert!(
        status.success(),
        "{status}; log:\n{}",
        lines.try_iter().collect::<Vec<_>>().join("\n")
    );
}
