//! The `imflow` command line: validate, graph, and config errors.

use std::process::Command;

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

#[test]
fn validate_accepts_the_shipped_pipeline() {
    let (code, out, err) = imflow(&["validate", "pipeline.yaml"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("pipeline.yaml: ok, 6 stages, 5 edges"),
        "{out}"
    );
}

#[test]
fn validate_reports_every_error_with_its_line_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "stages:\n  in:\n    kind: ingest\n  seq:\n    kind: seq-assign\n    inputs: [in]\n    options:\n      max_batch: many\n  fan:\n    kind: fanout\n    inputs: [in, ghost]\n  loop1:\n    kind: persist-redis\n    inputs: [loop2]\n  loop2:\n    kind: persist-redis\n    inputs: [loop1]\n  x:\n    kind: teleport\n",
    )
    .unwrap();
    let (code, _out, err) = imflow(&["validate", file.to_str().unwrap()]);
    assert_eq!(code, 1);
    for want in [
        "bad.yaml:8: stages.seq.options.max_batch: bad option",
        "bad.yaml:11: stages.fan.inputs[0]: type mismatch",
        "bad.yaml:11: stages.fan.inputs[1]: input `ghost` names no stage",
        "cycle: ",
        "bad.yaml:19: stages.x.kind: unknown stage kind `teleport`",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
}

#[test]
fn graph_prints_dot_with_the_seeds_topics() {
    let (code, out, err) = imflow(&["graph"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("digraph imflow {"));
    for topic in [
        "kafka ws2ms_chat ×8",
        "kafka msg_to_mongo ×8",
        "kafka ms2ps_chat ×10",
    ] {
        assert!(out.contains(topic), "{out}");
    }
}

#[test]
fn a_bad_config_fails_fast_naming_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.yaml");
    std::fs::write(
        &file,
        "listen:\n  gateway: 127.0.0.1:0\n  apii: 127.0.0.1:0\n",
    )
    .unwrap();
    let (code, _out, err) = imflow(&["serve", "--config", file.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("c.yaml:3:") && err.contains("apii"), "{err}");
}

#[test]
fn an_unreachable_kafka_fails_start_up_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.yaml");
    let data = dir.path().join("data");
    // Port 1 on loopback: nothing listens there.
    std::fs::write(
        &file,
        format!(
            "data_dir: {}\nlisten:\n  gateway: 127.0.0.1:0\n  api: 127.0.0.1:0\nkafka:\n  addr: [127.0.0.1:1]\n",
            data.display()
        ),
    )
    .unwrap();
    let (code, _out, err) = imflow(&["serve", "--config", file.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("kafka.addr"), "{err}");
}
