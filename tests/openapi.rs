//! The REST API's OpenAPI document (`/openapi.json`, generated from the
//! handlers) and schemathesis, a property-based fuzzer, run against it: no
//! request it generates may get a 5xx, and every response must match the
//! document (its status documented, its body the documented schema).
//! In both run modes (`IMFLOW_TEST_MODE=cluster` too).

mod common;

use std::process::Stdio;

use common::{Target, TestServer, ADMIN};
use serde_json::Value;

/// The schemathesis of `script/infra.sh` (its virtual environment).
fn schemathesis() -> String {
    std::env::var("IMFLOW_SCHEMATHESIS").unwrap_or_else(|_| {
        let tools = std::env::var("IMFLOW_TOOLS_DIR").unwrap_or_else(|_| {
            format!(
                "{}/.cache/imflow",
                std::env::var("HOME").unwrap_or_default()
            )
        });
        format!("{tools}/venv/bin/schemathesis")
    })
}

/// Run schemathesis on `s` with alice's token and the admin secret; `args`
/// narrow it. Returns whether it passed, and what it printed.
async fn fuzz(s: &TestServer, token: &str, args: &[&str]) -> (bool, String) {
    // A fixed seed: CI repeats the same cases; IMFLOW_FUZZ_SEED tries others.
    let seed = std::env::var("IMFLOW_FUZZ_SEED").unwrap_or_else(|_| "20261128".into());
    let out = tokio::process::Command::new(schemathesis())
        .arg("run")
        .arg(format!("{}/openapi.json", s.api))
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args(["-H", &format!("X-Admin-Secret: {ADMIN}")])
        .args([
            "--checks",
            "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance",
        ])
        .args(["--max-examples", "25", "--seed", &seed, "--no-color"])
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    // A wedged server fails the test rather than hanging CI.
    let out = tokio::time::timeout(std::time::Duration::from_secs(600), out)
        .await
        .expect("schemathesis finished within 10 minutes")
        .unwrap_or_else(|e| panic!("{} (script/infra.sh installs it): {e}", schemathesis()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The count of cases, for the log (`-- --nocapture`).
    for l in text.lines().filter(|l| l.contains(" generated,")) {
        eprintln!("schemathesis {args:?}: {}", l.trim());
    }
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_api_keeps_to_its_openapi_document_under_fuzzing() {
    let s = TestServer::start_with(|c| {
        // The fuzzer sends thousands of requests as one user.
        c.rest.rate_limit_per_sec = 100_000;
        c.rest.rate_limit_burst = 100_000;
    })
    .await;
    let doc: Value = reqwest::get(format!("{}/openapi.json", s.api))
        .await
        .expect("/openapi.json")
        .json()
        .await
        .expect("a JSON document");
    assert_eq!(doc["openapi"], "3.1.0");
    for path in [
        "/auth/register",
        "/msg/send",
        "/conversations",
        "/conversations/{conversation_id}/messages",
        "/groups/{group_id}/members",
        "/users/me/devices/{platform}",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} is documented");
    }
    // Something to find: users, a group, a conversation with messages
    // (the document's examples name them).
    s.register(&["alice", "bob", "carol"]).await;
    let token = s.token("alice", 5).await;
    assert_eq!(s.create_group(&token, "team", &["bob", "carol"]).await, 201);
    let mut alice = s.connect("alice", 1).await;
    for i in 0..3 {
        let ack = alice
            .send_text(Target::User("bob"), &format!("seed{i}"), "hello")
            .await;
        assert_eq!(ack["op"], "ack", "{ack}");
        alice.stored(&ack).await;
    }
    // Everything but logout first (it would revoke the token the rest
    // needs), then logout alone. /tap streams for as long as its caller
    // reads: tests/operator_tools.rs reads it.
    let (ok, out) = fuzz(
        &s,
        &token,
        &["--exclude-path", "/auth/logout", "--exclude-path", "/tap"],
    )
    .await;
    assert!(ok, "schemathesis found problems:\n{out}");
    let (ok, out) = fuzz(&s, &token, &["--include-path", "/auth/logout"]).await;
    assert!(ok, "schemathesis found problems with logout:\n{out}");
    // Still serving.
    let r = reqwest::get(format!("{}/healthz", s.api)).await.unwrap();
    assert_eq!(r.status(), 200);
}
