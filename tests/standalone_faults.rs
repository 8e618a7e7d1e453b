//! The standalone server as its own process under a pipelined load: killed
//! with SIGKILL right after acks, and stopped with SIGTERM, then started
//! again on the same data directory. Nothing acked is lost or stored
//! twice, seqs stay 1..n, and a graceful stop drains before it exits.

mod common;

use std::path::Path;
use std::process::Stdio;

use common::load::{Endpoint, Load};
use common::{ADMIN, PATIENCE};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `imflow serve` on `data`, on fixed ports (the load reconnects to them).
async fn start(data: &Path, gateway: u16, api: u16) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_imflow"))
        .args(["serve", "--log-json", "--data-dir"])
        .arg(data)
        .args(["--gateway-addr", &format!("127.0.0.1:{gateway}")])
        .args(["--api-addr", &format!("127.0.0.1:{api}")])
        .env("IMFLOW_ADMIN_SECRET", ADMIN)
        .env("IMFLOW_LOG", "info")
        // No config file: defaults (a missing config/standalone.yaml).
        .current_dir(data)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the imflow binary");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::time::timeout(PATIENCE * 3, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if v["fields"]["message"] == "imflow serving" {
                    return;
                }
            }
        }
        panic!("imflow exited before serving");
    })
    .await
    .expect("imflow serves");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    child
}

fn signal(child: &Child, sig: &str) {
    let pid = child.id().expect("running").to_string();
    let ok = std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig} {pid}");
}

async fn fault_under_load(sig: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (gw, api) = (free_port(), free_port());
    let mut server = start(dir.path(), gw, api).await;
    let endpoint = Endpoint::new(
        &format!("ws://127.0.0.1:{gw}/ws"),
        &format!("http://127.0.0.1:{api}"),
    );
    let load = Load::start(&endpoint, "sf", "p", 12, 40.0, 6, &[]).await;
    load.wait_acked(12 * 10).await;
    signal(&server, sig);
    let status = tokio::time::timeout(PATIENCE, server.wait())
        .await
        .expect("the server ends")
        .expect("its status");
    if sig == "-TERM" {
        // Drained and stopped cleanly within its deadline.
        assert!(status.success(), "{status}");
    }
    let before = load.acked_so_far();
    server = start(dir.path(), gw, api).await;
    // The load reconnects, resends what had no answer, and goes on.
    load.wait_acked(before + 12 * 10).await;
    let logs = load.finish().await;
    assert!(common::load::acked(&logs) >= before + 120);
    signal(&server, "-TERM");
    let _ = server.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_right_after_acks_loses_nothing_acked() {
    fault_under_load("-KILL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_and_loses_nothing() {
    fault_under_load("-TERM").await;
}
