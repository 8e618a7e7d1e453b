//! The `imflow` command line: validate, graph, and config errors.

mod common;

use std::process::Command;

use common::imflow;

#[test]
fn validate_accepts_the_shipped_pipeline() {
    let (code, out, err) = imflow(&["validate", "pipeline.yaml"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("pipeline.yaml: ok, 6 stages, 5 edges"),
        "{out}"
    );
    // The benchmark's variant: the shipped webhook example, uncommented.
    let (code, out, err) = imflow(&["validate", "benches/pipelines/webhook.yaml"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("process im_webhook ×2: after_send"), "{out}");
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
fn the_worker_count_is_taken_before_or_after_the_command_and_zero_is_refused() {
    for args in [
        &["--workers", "1", "validate", "pipeline.yaml"][..],
        &["validate", "--workers", "3", "pipeline.yaml"][..],
    ] {
        let (code, _out, err) = imflow(args);
        assert_eq!(code, 0, "{args:?}: {err}");
    }
    let (code, _out, err) = imflow(&["--workers", "0", "validate"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--workers"), "{err}");
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

#[test]
fn a_strict_plan_refuses_the_secrets_every_process_would_refuse() {
    let plan = |config: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_imflow"))
            .args(["plan", "--strict", "--config", config])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("IMFLOW_ADMIN_SECRET")
            .env_remove("IMFLOW_CLUSTER_SECRET")
            .output()
            .expect("run imflow");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = plan("config/config.yaml");
    assert_eq!(code, 1);
    assert!(
        err.contains("config/config.yaml: admin_secret is the shipped default"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(&cfg, "admin_secret: an-operators-own-secret\n").unwrap();
    let (code, err) = plan(cfg.to_str().unwrap());
    assert_eq!(code, 1);
    assert!(err.contains("cluster_secret must be set"), "{err}");

    std::fs::write(
        &cfg,
        "admin_secret: an-operators-own-secret\ncluster_secret: the-processes-own-secret\n",
    )
    .unwrap();
    let (code, err) = plan(cfg.to_str().unwrap());
    assert_eq!(code, 0, "{err}");
}

#[test]
fn plan_lists_the_seeds_processes_per_host_and_subsets() {
    let (code, out, err) = imflow(&["plan", "--config", "config/config.yaml"]);
    assert_eq!(code, 0, "{err}");
    let count = |kind: &str| {
        out.lines()
            .filter(|l| l.starts_with(&format!("{kind} ")))
            .count()
    };
    assert_eq!(count("im_msg"), 6, "{out}");
    assert_eq!(count("im_msg_transfer"), 4, "{out}");
    assert_eq!(count("im_push"), 5, "{out}");
    assert!(out.contains("im_msg 5 10135\n"), "{out}");
    assert!(out.contains("im_push 0 10170\n"), "{out}");
    assert!(out.contains("im_msg_transfer 3 -\n"), "{out}");
    assert!(out.contains("gateway 0 10001\n") && out.contains("api 0 10002\n"));

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        "hosts:\n  - addr: 10.0.0.1\n  - addr: 10.0.0.2\n    processes: [gateway, im_push]\n",
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    let (code, out, err) = imflow(&["plan", "--config", cfg, "--host", "10.0.0.2"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 6, "{out}");
    let (code, _, err) = imflow(&["plan", "--config", cfg, "--host", "10.0.0.9"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("not in the config's `hosts` (10.0.0.1, 10.0.0.2)"),
        "{err}"
    );

    std::fs::write(
        dir.path().join("bad.yaml"),
        "hosts:\n  - addr: 10.0.0.1\n    processes: [im_mgs]\n",
    )
    .unwrap();
    let (code, _, err) = imflow(&[
        "plan",
        "--config",
        dir.path().join("bad.yaml").to_str().unwrap(),
        "--host",
        "10.0.0.1",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("lists process `im_mgs`"), "{err}");
}

#[test]
fn every_operator_script_has_help() {
    for s in [
        "start_all.sh",
        "stop_all.sh",
        "check_all.sh",
        "batch_build_all_service.sh",
    ] {
        let out = Command::new(format!("{}/script/{s}", env!("CARGO_MANIFEST_DIR")))
            .arg("--help")
            .output()
            .expect("run script");
        assert!(out.status.success(), "{s} --help");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{s} --help prints usage"
        );
    }
}

/// Needs the servers of `script/infra.sh up` (MySQL, MongoDB, Redis, Kafka
/// on the seed's ports): only etcd is wrong here.
#[test]
fn a_cluster_process_with_an_unreachable_etcd_fails_fast_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let text = std::fs::read_to_string(format!("{root}/config/config.yaml"))
        .unwrap()
        .replace("etcdAddr: [ 127.0.0.1:2379 ]", "etcdAddr: [ 127.0.0.1:1 ]")
        .replace(
            "admin_secret: imflow-admin-secret",
            "admin_secret: a-real-admin-secret",
        )
        .replace(
            "cluster_secret: \"\"",
            "cluster_secret: a-real-cluster-secret",
        );
    let cfg = dir.path().join("c.yaml");
    std::fs::write(&cfg, text).unwrap();
    let started = std::time::Instant::now();
    let (code, _, err) = imflow(&[
        "serve",
        "--config",
        cfg.to_str().unwrap(),
        "--process",
        "api",
        "--host",
        "127.0.0.1",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("etcd.etcdAddr (127.0.0.1:1)"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
}

/// The shipped config as a cluster process would read it: refused, naming
/// the file, the field and the fix, before anything is contacted.
#[test]
fn a_cluster_process_refuses_the_shipped_secrets() {
    let root = env!("CARGO_MANIFEST_DIR");
    let shipped = format!("{root}/config/config.yaml");
    let dir = tempfile::tempdir().unwrap();
    let own_admin = dir.path().join("admin-only.yaml");
    std::fs::write(
        &own_admin,
        std::fs::read_to_string(&shipped).unwrap().replace(
            "admin_secret: imflow-admin-secret",
            "admin_secret: a-real-admin-secret",
        ),
    )
    .unwrap();
    let reused = dir.path().join("reused.yaml");
    std::fs::write(
        &reused,
        std::fs::read_to_string(&own_admin).unwrap().replace(
            "cluster_secret: \"\"",
            "cluster_secret: a-real-admin-secret",
        ),
    )
    .unwrap();
    for (file, says) in [
        (shipped.as_str(), "admin_secret is the shipped default"),
        (own_admin.to_str().unwrap(), "cluster_secret must be set"),
        (
            reused.to_str().unwrap(),
            "cluster_secret must differ from admin_secret",
        ),
    ] {
        let (code, _, err) = imflow(&["serve", "--config", file, "--process", "api"]);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains(says) && err.contains(file), "{file}: {err}");
    }
}

/// `imflow test`: the shipped pipeline tests of the six kinds pass, and a
/// failing test says which field differs (a diff) and exits 1.
#[test]
fn pipeline_tests_pass_and_a_failing_one_shows_a_diff() {
    let shipped: Vec<String> =
        std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pipeline"))
            .expect("tests/pipeline")
            .filter_map(|e| e.ok())
            .map(|e| e.path().display().to_string())
            .filter(|p| p.ends_with(".yaml"))
            .collect();
    for kind in [
        "ingest",
        "seq_assign",
        "persist_mongo",
        "persist_redis",
        "fanout",
        "push",
    ] {
        assert!(
            shipped
                .iter()
                .any(|p| p.ends_with(&format!("/{kind}.yaml"))),
            "no pipeline test for {kind}"
        );
    }
    let mut args = vec!["test"];
    args.extend(shipped.iter().map(String::as_str));
    let (code, out, err) = imflow(&args);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(" passed, 0 failed"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wrong.yaml");
    std::fs::write(
        &file,
        format!(
            "pipeline: {}/pipeline.yaml\ntests:\n  - name: wrong seq\n    stages: [seq]\n    input:\n      - {{conversation_id: si_a_b, server_msg_id: s1, client_msg_id: c1, sender: a, target: {{user: b}}, content_type: 101, content: '{{}}', send_time: 1}}\n    expect:\n      output:\n        - {{seq: 2, msg: {{sender: a}}}}\n      acks: [failed]\n",
            env!("CARGO_MANIFEST_DIR")
        ),
    )
    .unwrap();
    let (code, out, _) = imflow(&["test", file.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL") && out.contains("wrong seq"), "{out}");
    assert!(
        out.contains("-  \"seq\": 2") && out.contains("+  \"seq\": 1"),
        "{out}"
    );
    assert!(
        out.contains("acks: expected [\"failed\"], got [\"delivered\"]"),
        "{out}"
    );
    assert!(out.contains("0 passed, 1 failed"), "{out}");

    // A filter that matches nothing, and a test that checks nothing, fail
    // instead of passing silently.
    let (code, _, err) = imflow(&["test", "--only", "no such test", file.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no test matches --only"), "{err}");
    let empty = dir.path().join("empty.yaml");
    std::fs::write(
        &empty,
        format!(
            "pipeline: {}/pipeline.yaml\ntests:\n  - name: checks nothing\n    stages: [seq]\n    input: []\n",
            env!("CARGO_MANIFEST_DIR")
        ),
    )
    .unwrap();
    let (code, out, _) = imflow(&["test", empty.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("nothing would be checked"), "{out}");
}
