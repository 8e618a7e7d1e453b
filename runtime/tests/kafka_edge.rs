//! Kafka edges against a real broker (tansu, started by `script/infra.sh
//! up`; `IMFLOW_KAFKA_BROKERS` overrides 127.0.0.1:9092). Each test makes its
//! own topic.

use std::time::Duration;

use imflow_runtime::registry::{OptionError, StageResult};
use imflow_runtime::{
    compile, Ack, AckStatus, BuildContext, BuildError, Envelope, KafkaSettings, PortType, Registry,
    RunningTopology, StageKind, StageTask,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Item {
    key: u64,
    n: u64,
}

fn brokers() -> String {
    std::env::var("IMFLOW_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

async fn topic(partitions: i32) -> String {
    let name = format!(
        "imflow-test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client");
    let res = admin
        .create_topics(
            &[NewTopic::new(&name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("the broker answers (is `script/infra.sh up` running?)");
    for r in res {
        r.expect("topic created");
    }
    name
}

/// Emits `items` with the given keys; records how each ack ended.
struct Source {
    items: Vec<Item>,
    acks: watch::Sender<Vec<AckStatus>>,
}

impl StageKind for Source {
    fn kind(&self) -> &'static str {
        "numbers"
    }
    fn input(&self) -> Option<PortType> {
        None
    }
    fn output(&self) -> Option<PortType> {
        Some(PortType::of::<Item>("item"))
    }
    fn check_options(&self, _: &serde_yaml::Value) -> Vec<OptionError> {
        vec![]
    }
    fn build(&self, cx: &mut BuildContext<'_>) -> Result<Vec<StageTask>, BuildError> {
        let out = cx.output::<Item>()?;
        let items = self.items.clone();
        let acks = self.acks.clone();
        Ok(vec![Box::pin(async move {
            for it in items {
                let acks = acks.clone();
                let ack = Ack::new(move |s| acks.send_modify(|v| v.push(s)));
                out.send(Envelope::new(it.key, it, ack)).await?;
            }
            StageResult::Ok(())
        })])
    }
}

/// Records what arrives; fails the acks of items with `n >= fail_from`.
struct Sink {
    seen: watch::Sender<Vec<Item>>,
    fail_from: u64,
}

impl StageKind for Sink {
    fn kind(&self) -> &'static str {
        "collect"
    }
    fn input(&self) -> Option<PortType> {
        Some(PortType::of::<Item>("item"))
    }
    fn output(&self) -> Option<PortType> {
        None
    }
    fn check_options(&self, _: &serde_yaml::Value) -> Vec<OptionError> {
        vec![]
    }
    fn build(&self, cx: &mut BuildContext<'_>) -> Result<Vec<StageTask>, BuildError> {
        let mut tasks: Vec<StageTask> = Vec::new();
        for mut input in cx.inputs::<Item>()? {
            let seen = self.seen.clone();
            let fail_from = self.fail_from;
            tasks.push(Box::pin(async move {
                while let Some(env) = input.recv().await {
                    if env.item.n >= fail_from {
                        env.ack.fail("test sink refuses it");
                    } else {
                        seen.send_modify(|v| v.push(env.item.clone()));
                    }
                    env.ack.release();
                }
                StageResult::Ok(())
            }));
        }
        Ok(tasks)
    }
}

struct Run {
    topology: RunningTopology,
    seen: watch::Receiver<Vec<Item>>,
    acks: watch::Receiver<Vec<AckStatus>>,
}

fn start(topic: &str, partitions: u32, group: &str, items: Vec<Item>, fail_from: u64) -> Run {
    let (acks_tx, acks) = watch::channel(Vec::new());
    let (seen_tx, seen) = watch::channel(Vec::new());
    let mut registry = Registry::new();
    registry.register(Source {
        items,
        acks: acks_tx,
    });
    registry.register(Sink {
        seen: seen_tx,
        fail_from,
    });
    let text = format!(
        "stages:\n  src:\n    kind: numbers\n  sink:\n    kind: collect\n    inputs:\n      - from: src\n        topic: {topic}\n        partitions: {partitions}\n"
    );
    let pipeline = compile("test.yaml", &text, &registry).expect("pipeline compiles");
    let settings = KafkaSettings {
        brokers: brokers(),
        group_prefix: group.to_string(),
        ..Default::default()
    };
    let topology =
        RunningTopology::start_with(&pipeline, &registry, &Default::default(), Some(&settings))
            .expect("starts");
    Run {
        topology,
        seen,
        acks,
    }
}

async fn until<T: Clone>(rx: &mut watch::Receiver<Vec<T>>, pred: impl Fn(&[T]) -> bool) -> Vec<T> {
    let v = tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|v| pred(v)))
        .await
        .expect("timed out waiting on the broker")
        .expect("sender alive");
    v.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_cross_a_kafka_edge_in_key_order_and_acks_wait_for_the_broker() {
    let topic = topic(4).await;
    let items: Vec<Item> = (0..400).map(|n| Item { key: n % 7, n }).collect();
    let mut run = start(&topic, 4, "order", items.clone(), u64::MAX);
    let acks = until(&mut run.acks, |v| v.len() == items.len()).await;
    assert!(
        acks.iter().all(|s| *s == AckStatus::Delivered),
        "every write confirmed by the broker"
    );
    let seen = until(&mut run.seen, |v| v.len() >= items.len()).await;
    assert_eq!(seen.len(), items.len(), "nothing twice");
    for k in 0..7 {
        let got: Vec<u64> = seen.iter().filter(|i| i.key == k).map(|i| i.n).collect();
        let want: Vec<u64> = items.iter().filter(|i| i.key == k).map(|i| i.n).collect();
        assert_eq!(got, want, "key {k} keeps its order");
    }
    assert!(run.topology.shutdown(Duration::from_secs(20)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_are_committed_only_past_finished_items_so_a_restart_replays_the_rest() {
    // One partition: the order of arrival is the order of the log.
    let topic = topic(1).await;
    let first: Vec<Item> = (0..20).map(|n| Item { key: 0, n }).collect();
    let mut run = start(&topic, 1, "replay", first, 10);
    let seen = until(&mut run.seen, |v| v.len() == 10).await;
    assert_eq!(
        seen.iter().map(|i| i.n).collect::<Vec<_>>(),
        (0..10).collect::<Vec<_>>()
    );
    until(&mut run.acks, |v| v.len() == 20).await;
    assert!(run.topology.shutdown(Duration::from_secs(20)).await);

    // Same consumer group, a sink that takes everything, and one new item.
    let marker = Item { key: 0, n: 1000 };
    let mut run = start(&topic, 1, "replay", vec![marker.clone()], u64::MAX);
    let seen = until(&mut run.seen, |v| v.last() == Some(&marker)).await;
    let replayed: Vec<u64> = seen.iter().map(|i| i.n).collect();
    let mut want: Vec<u64> = (10..20).collect();
    want.push(1000);
    assert_eq!(
        replayed, want,
        "exactly the unfinished items come back, then the new one"
    );
    assert!(run.topology.shutdown(Duration::from_secs(20)).await);
}
