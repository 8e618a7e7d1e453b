//! A short run of the load generator against a real in-process server: part
//! of the test suite so that a change that loses or duplicates messages under
//! concurrent load fails here, not only in a benchmark run.

use imflow_bench::scenario::{self, Load, Target};

async fn server() -> (imflow::Server, tempfile::TempDir, Target) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = imflow::Config {
        pipeline: concat!(env!("CARGO_MANIFEST_DIR"), "/../pipeline.yaml").into(),
        data_dir: dir.path().join("data"),
        admin_secret: "smoke-admin-secret".into(),
        ..Default::default()
    };
    cfg.listen.gateway = "127.0.0.1:0".parse().unwrap();
    cfg.listen.api = "127.0.0.1:0".parse().unwrap();
    let s = imflow::Server::start(cfg).await.unwrap();
    let target = Target {
        api: format!("http://{}", s.api_addr),
        ws: format!("ws://{}/ws", s.gateway_addr),
        admin_secret: "smoke-admin-secret".into(),
        server_pid: Some(std::process::id()),
        progress: false,
    };
    (s, dir, target)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_chat_smoke_run_loses_nothing() {
    let (s, _dir, target) = server().await;
    let load = Load {
        rate: 400.0,
        duration_secs: 3.0,
        drain_secs: 15.0,
    };
    let r = scenario::single(&target, 300, load, None).await.unwrap();
    let step = r.result.clone().expect("a result");
    assert_eq!(step.sent, 1200);
    assert_eq!(step.acked, step.sent, "{}", r.summary());
    assert_eq!(
        (step.lost, step.duplicates, step.failed),
        (0, 0, 0),
        "{}",
        r.summary()
    );
    assert_eq!(step.delivered, step.sent);
    assert!(step.latency_ms.p50 > 0.0);
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_smoke_run_loses_nothing() {
    let (s, _dir, target) = server().await;
    let load = Load {
        rate: 100.0,
        duration_secs: 2.0,
        drain_secs: 15.0,
    };
    let r = scenario::group(&target, 1200, 60, load, None)
        .await
        .unwrap();
    let step = r.result.clone().expect("a result");
    assert_eq!(step.acked, 200, "{}", r.summary());
    assert_eq!(step.expected_deliveries, 200 * 59);
    assert_eq!(
        (step.lost, step.duplicates, step.failed),
        (0, 0, 0),
        "{}",
        r.summary()
    );
    s.stop().await.unwrap();
}

/// `--baseline`: the ideal relay answers the same scenario with the frames
/// the load generator counts (nothing lost there either), and a comparison
/// carries both sides and their ratios.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ideal_relay_loses_nothing_and_compares() {
    let (bound, addrs) = tokio::sync::oneshot::channel();
    let any = "127.0.0.1:0".parse().unwrap();
    tokio::spawn(imflow_bench::relay::serve(any, any, move |b| {
        let _ = bound.send((b.api, b.ws));
    }));
    let (api, ws) = addrs.await.unwrap();
    let (s, _dir, target) = server().await;
    let relay = Target {
        api: format!("http://{api}"),
        ws: format!("ws://{ws}/ws"),
        ..target.clone()
    };
    let load = Load {
        rate: 200.0,
        duration_secs: 2.0,
        drain_secs: 15.0,
    };
    let base = scenario::single(&relay, 100, load, None).await.unwrap();
    let b = base.result.clone().expect("a result");
    assert_eq!(
        (b.acked, b.delivered, b.lost, b.duplicates, b.failed),
        (400, 400, 0, 0, 0),
        "{}",
        base.summary()
    );
    let group = scenario::group(&relay, 300, 20, Load { rate: 50.0, ..load }, None)
        .await
        .unwrap();
    let g = group.result.clone().expect("a result");
    assert_eq!((g.delivered, g.lost), (100 * 19, 0), "{}", group.summary());

    let mine = scenario::single(&target, 100, load, None).await.unwrap();
    let c = imflow_bench::report::Comparison::new(base, mine);
    let p99 = c.ratios.p99_ms.expect("p99 on both sides");
    assert!(p99.baseline > 0.0 && p99.imflow > 0.0, "{}", c.summary());
    assert!(c.ratios.cpu_us_per_message.is_some(), "{}", c.summary());
    assert!(c.summary().contains("imflow / baseline"), "{}", c.summary());
    s.stop().await.unwrap();
}
