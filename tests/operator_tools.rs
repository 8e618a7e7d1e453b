//! `imflow top` and `imflow token` against a running server, as an operator
//! or a client developer runs them: the binary in a subprocess.

mod common;

use std::process::Command;

use common::{Target, TestServer, ADMIN};
use serde_json::Value;

fn imflow(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_imflow"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run imflow");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

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
