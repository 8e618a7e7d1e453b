//! `imflow top` and `imflow token` against a running server, as an operator
//! or a client developer runs them: the binary in a subprocess.

mod common;

use common::{imflow, Target, TestServer, ADMIN};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_every_stage_with_what_went_through_it() {
    let s = TestServer::start().await;
    s.register(&["alice", "bob"]).await;
    let mut alice = s.connect("alice", 1).await;
    for i in 0..5 {
        let ack = alice
            .send_text(Target::User("bob"), &format!("t{i}"), "hello")
            .await;
        alice.stored(&ack).await;
    }
    let url = format!("{}/metrics", s.api);
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        imflow(&[
            "top",
            "--url",
            &url,
            "--once",
            "--json",
            "--interval",
            "0.2",
        ])
    })
    .await
    .expect("top ran");
    assert_eq!(code, 0, "{err}");
    let reading: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(reading["processes"][0]["up"], true);
    let stages: Vec<&str> = reading["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .filter_map(|s| s["stage"].as_str())
        .collect();
    for stage in ["ingest", "seq", "history", "hot", "fanout", "push"] {
        assert!(stages.contains(&stage), "{stage} missing from {stages:?}");
    }
    let total = |stage: &str, field: &str| {
        reading["stages"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["stage"] == stage)
            .and_then(|s| s[field].as_f64())
            .unwrap_or(0.0)
    };
    // Other tests of this binary share the metrics: at least ours.
    assert!(total("ingest", "out_total") >= 5.0, "{out}");
    assert!(total("push", "in_total") >= 5.0, "{out}");

    let url = format!("{}/metrics", s.api);
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        imflow(&["top", "--url", &url, "--once", "--interval", "0.1"])
    })
    .await
    .expect("top ran");
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("STAGE"), "{out}");
    assert!(out.contains("\npush "), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_gives_a_working_token_only_with_an_admin_secret_of_ones_own() {
    let s = TestServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, format!("admin_secret: {ADMIN}\n")).expect("config");
    let (config, api) = (config.display().to_string(), s.api.clone());
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        imflow(&[
            "token",
            "carol",
            "--register",
            "--platform",
            "5",
            "--config",
            &config,
            "--api",
            &api,
        ])
    })
    .await
    .expect("token ran");
    assert_eq!(code, 0, "{err}");
    let token = out.trim();
    assert!(!token.is_empty() && !token.contains('\n'), "{out}");
    let mut carol = s.connect_token(token).await.expect("the token signs in");
    let ack = carol
        .send_text(Target::User("carol"), "self", "note to self")
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");

    let shipped = dir.path().join("shipped.yaml");
    std::fs::write(&shipped, "admin_secret: imflow-admin-secret\n").expect("config");
    let shipped = shipped.display().to_string();
    let (code, _, err) = tokio::task::spawn_blocking(move || {
        imflow(&[
            "token",
            "carol",
            "--config",
            &shipped,
            "--api",
            "http://127.0.0.1:9",
        ])
    })
    .await
    .expect("token ran");
    assert_eq!(code, 1);
    assert!(err.contains("shipped default"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_follows_one_conversation_through_every_stage() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let s = TestServer::start().await;
    s.register(&["alice", "bob", "carol"]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.yaml");
    let api = s.api.trim_start_matches("http://");
    std::fs::write(
        &config,
        format!("admin_secret: {ADMIN}\nlisten:\n  api: {api}\n"),
    )
    .expect("config");
    let mut tap = tokio::process::Command::new(env!("CARGO_BIN_EXE_imflow"))
        .args([
            "tap",
            "--json",
            "--conversation",
            "si_alice_bob",
            "--config",
        ])
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("imflow tap");
    let mut err = BufReader::new(tap.stderr.take().expect("stderr")).lines();
    let said = tokio::time::timeout(common::PATIENCE, err.next_line())
        .await
        .expect("tap says it is tapping")
        .expect("stderr")
        .unwrap_or_default();
    assert!(
        said.starts_with("tapping si_alice_bob in 1 process"),
        "{said}"
    );

    let mut alice = s.connect("alice", 1).await;
    // Another conversation first: it must not show.
    let other = alice
        .send_text(Target::User("carol"), "o1", "not tapped")
        .await;
    alice.stored(&other).await;
    let ack = alice.send_text(Target::User("bob"), "t1", "tapped").await;
    alice.stored(&ack).await;

    let mut out = BufReader::new(tap.stdout.take().expect("stdout")).lines();
    let mut seen: Vec<(String, String)> = Vec::new();
    while !seen.contains(&("push".into(), "in".into())) {
        let line = tokio::time::timeout(common::PATIENCE, out.next_line())
            .await
            .expect("sightings in time")
            .expect("stdout")
            .expect("tap still running");
        let ev: Value = serde_json::from_str(&line).expect("a JSON line");
        let text = ev["item"].to_string();
        assert!(!text.contains("not tapped"), "{line}");
        seen.push((
            ev["stage"].as_str().unwrap_or_default().into(),
            ev["event"].as_str().unwrap_or_default().into(),
        ));
    }
    let expected: Vec<(String, String)> = [
        ("ingest", "out"),
        ("seq", "in"),
        ("seq", "out"),
        ("history", "in"),
        ("history", "out"),
        ("hot", "in"),
        ("hot", "out"),
        ("fanout", "in"),
        ("fanout", "out"),
        ("push", "in"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(seen, expected, "every hop, in the pipeline's order");
}
