//! Kafka edges: an edge with a `topic` in pipeline.yaml, run in cluster mode.
//!
//! Producing side: every item is serialised (JSON) and produced to the
//! partition its key picks, with `acks=all` and idempotence; the item's
//! [`Ack`] is released when the broker confirms the write, so whoever waits
//! on it (a client's "ack", an upstream consumer's offset) waits for
//! durability in Kafka.
//!
//! Consuming side: one consumer per consuming stage (group `PREFIX.STAGE`)
//! feeds the stage's partition queues. Each item carries an [`Ack`] that marks
//! its offset done; offsets are committed only up to the first item not yet
//! done, so a crash replays whatever was not finished downstream
//! (at-least-once between stages). An item whose ack failed is never passed:
//! it is replayed after a restart.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use metrics::Counter;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ack::{Ack, AckStatus};
use crate::edge::{Closed, Envelope};
use crate::registry::StageResult;

/// Where the brokers are and how to talk to them.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `host:port,host:port`.
    pub brokers: String,
    /// Consumer groups are named `PREFIX.STAGE`.
    pub group_prefix: String,
    /// How long the producer waits to fill a batch.
    pub linger_ms: u32,
    /// Longest time a fetch may wait on the broker for data
    /// (`fetch.wait.max.ms`). Some brokers hold a fetch this long even when
    /// data is there, so it bounds each hop's latency.
    pub fetch_wait_ms: u32,
    /// Most messages in one produce batch per partition
    /// (`batch.num.messages`).
    pub batch_messages: u32,
    /// How often consumers commit finished offsets.
    pub commit_interval: Duration,
    /// How long a producer keeps trying to write an item before failing it
    /// (`message.timeout.ms`); the consumer that handed it over then hands
    /// it to the stage again.
    pub message_timeout: Duration,
    /// How long the broker waits for a consumer that stopped answering
    /// before giving its partitions to the others (`session.timeout.ms`).
    pub session_timeout: Duration,
    /// `partition.assignment.strategy`: `cooperative-sticky` (a member that
    /// joins or dies moves only its own partitions) or an eager one
    /// (`range`, `roundrobin`: every member stops while the group settles).
    pub assignment: String,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        KafkaSettings {
            brokers: "127.0.0.1:9092".into(),
            group_prefix: "imflow".into(),
            linger_ms: 10,
            fetch_wait_ms: 100,
            batch_messages: 10_000,
            commit_interval: Duration::from_millis(200),
            message_timeout: Duration::from_secs(30),
            session_timeout: Duration::from_secs(6),
            assignment: "cooperative-sticky".into(),
        }
    }
}

/// The producing end of one Kafka edge.
pub(crate) struct KafkaOut {
    shared: Arc<Producing>,
    topic: String,
    partitions: u32,
    deliveries: mpsc::UnboundedSender<(DeliveryFuture, Ack, (u64, FutureProducer))>,
}

/// The edge's producer, replaced when it hits a fatal error. An idempotent
/// producer whose writes timed out (a broker away longer than
/// `message.timeout.ms`) may be fenced for good (`ProducerFenced`) and fail
/// every later write: without a new one, the edge would stay down after the
/// broker came back.
struct Producing {
    config: ClientConfig,
    current: std::sync::RwLock<(u64, FutureProducer)>,
    replaced: Counter,
}

impl Producing {
    fn get(&self) -> (u64, FutureProducer) {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// If generation `seen` is still current and its producer hit a fatal
    /// error (or `error` says it was fenced, which some brokers answer for
    /// good after a timed-out write), replace it (once, whoever notices
    /// first).
    fn replace_if_fatal(&self, seen: u64, producer: &FutureProducer, error: Option<&KafkaError>) {
        let fenced = error.and_then(KafkaError::rdkafka_error_code).filter(|c| {
            matches!(
                c,
                RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
                    | RDKafkaErrorCode::OutOfOrderSequenceNumber
                    | RDKafkaErrorCode::UnknownProducerId
                    | RDKafkaErrorCode::InvalidProducerIdMapping
            )
        });
        let Some((code, why)) = producer
            .client()
            .fatal_error()
            .or_else(|| fenced.map(|c| (c, "the broker fenced this producer".to_string())))
        else {
            return;
        };
        let mut cur = match self.current.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if cur.0 != seen {
            return;
        }
        match self.config.create::<FutureProducer>() {
            Ok(fresh) => {
                tracing::warn!(error = %code, reason = %why, "kafka producer hit a fatal error; replaced by a new one");
                self.replaced.increment(1);
                *cur = (seen + 1, fresh);
            }
            Err(e) => tracing::error!(error = %e, "cannot replace a failed kafka producer"),
        }
    }
}

pub(crate) fn producer(
    settings: &KafkaSettings,
    topic: &str,
    partitions: u32,
) -> Result<KafkaOut, KafkaError> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", settings.linger_ms.to_string())
        .set("batch.num.messages", settings.batch_messages.to_string())
        .set(
            "message.timeout.ms",
            settings.message_timeout.as_millis().max(1).to_string(),
        );
    let producer: FutureProducer = config.create()?;
    let shared = Arc::new(Producing {
        config,
        current: std::sync::RwLock::new((0, producer)),
        replaced: metrics::counter!("imflow_kafka_producers_replaced_total", "topic" => topic.to_string()),
    });
    let (tx, mut rx) = mpsc::unbounded_channel::<(DeliveryFuture, Ack, (u64, FutureProducer))>();
    // Settles acks as the broker confirms writes. It ends once the edge is
    // dropped and every write in flight is settled; each write keeps the
    // producer it went through (and its delivery thread) alive until then.
    let watcher = shared.clone();
    tokio::spawn(async move {
        let mut inflight = FuturesUnordered::new();
        let settle =
            |res: DeliveryOutcome, ack: Ack, (generation, producer): (u64, FutureProducer)| {
                match &res {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, _))) => watcher.replace_if_fatal(generation, &producer, Some(e)),
                    Err(_) => watcher.replace_if_fatal(generation, &producer, None),
                }
                settle(res, ack);
            };
        loop {
            tokio::select! {
                next = rx.recv() => match next {
                    Some((fut, ack, p)) => inflight.push(async move { (fut.await, ack, p) }),
                    None => break,
                },
                Some((res, ack, p)) = inflight.next(), if !inflight.is_empty() => settle(res, ack, p),
            }
        }
        while let Some((res, ack, p)) = inflight.next().await {
            settle(res, ack, p);
        }
    });
    Ok(KafkaOut {
        shared,
        topic: topic.to_string(),
        partitions: partitions.max(1),
        deliveries: tx,
    })
}

type DeliveryOutcome = Result<
    rdkafka::producer::future_producer::OwnedDeliveryResult,
    futures::channel::oneshot::Canceled,
>;

fn settle(res: DeliveryOutcome, ack: Ack) {
    match res {
        Ok(Ok(_)) => {}
        Ok(Err((e, _))) => ack.fail(format!("kafka write failed: {e}")),
        Err(_) => ack.fail("kafka producer went away before confirming the write"),
    }
    ack.release();
}

impl KafkaOut {
    pub(crate) async fn send<T: Serialize>(&self, env: Envelope<T>) -> Result<(), Closed> {
        let payload = match serde_json::to_vec(&env.item) {
            Ok(p) => p,
            Err(e) => {
                env.ack.fail(format!("cannot serialise item: {e}"));
                env.ack.release();
                return Ok(());
            }
        };
        let key = env.key.to_be_bytes();
        let partition = (env.key % self.partitions as u64) as i32;
        loop {
            let (generation, producer) = self.shared.get();
            let record = FutureRecord::to(&self.topic)
                .partition(partition)
                .key(&key[..])
                .payload(&payload);
            match producer.send_result(record) {
                Ok(fut) => {
                    return self
                        .deliveries
                        .send((fut, env.ack, (generation, producer)))
                        .map_err(|mpsc::error::SendError((_, ack, _))| {
                            ack.fail("kafka edge closed");
                            ack.release();
                            Closed
                        });
                }
                // The producer's queue is full: the broker is behind. Wait
                // (backpressure) rather than drop.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((e, _)) => {
                    self.shared
                        .replace_if_fatal(generation, &producer, Some(&e));
                    env.ack.fail(format!("kafka produce failed: {e}"));
                    env.ack.release();
                    return Ok(());
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Done,
    /// Failed downstream: never committed past; handed to the stage again.
    Failed,
}

/// Counts consumers that have not received their partitions yet. A process
/// consuming Kafka is not ready to serve before they have (joining a group
/// takes seconds on some brokers; messages produced meanwhile would wait).
#[derive(Default)]
pub struct Readiness {
    waiting: std::sync::atomic::AtomicUsize,
    changed: tokio::sync::Notify,
}

impl Readiness {
    fn one_more(&self) {
        self.waiting
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn one_done(&self) {
        self.waiting
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Resolves once every consumer has partitions.
    pub async fn wait(&self) {
        loop {
            let changed = self.changed.notified();
            if self.waiting.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return;
            }
            changed.await;
        }
    }
}

/// One item handed to the stage: its offset, what became of it, and what
/// it takes to hand it over again (kept until it is done).
struct Tracked {
    offset: i64,
    /// Which handing-over of the partition this is (see `Offsets::track`).
    epoch: u64,
    state: State,
    key: u64,
    payload: Arc<[u8]>,
    /// How many times it failed so far (its next retry waits longer).
    failures: u32,
}

/// Offsets handed to the stage and what became of each, per partition.
#[derive(Default)]
struct Offsets {
    parts: HashMap<i32, VecDeque<Tracked>>,
    epoch: u64,
    /// The last offset committed per partition.
    committed: HashMap<i32, i64>,
}

impl Offsets {
    /// Track an item; returns its epoch, which its ack must name. A
    /// partition that starts again at or below what it handed over (it
    /// went to another consumer and came back, from the committed offset)
    /// is tracked afresh: acks of the earlier handing-over no longer count.
    fn track(&mut self, partition: i32, offset: i64, key: u64, payload: Arc<[u8]>) -> u64 {
        let q = self.parts.entry(partition).or_default();
        if q.back().is_some_and(|t| t.offset >= offset) {
            q.clear();
            self.epoch += 1;
        }
        q.push_back(Tracked {
            offset,
            epoch: self.epoch,
            state: State::Pending,
            key,
            payload,
            failures: 0,
        });
        self.epoch
    }

    /// Forget the partitions `owned` says are no longer this consumer's:
    /// their new owner replays them from the committed offset. Acks of what
    /// was handed over before no longer count (a new epoch), should one of
    /// them come back here.
    fn forget_unowned(&mut self, owned: impl Fn(i32) -> bool) {
        let before = self.parts.len();
        self.parts.retain(|p, _| owned(*p));
        self.committed.retain(|p, _| owned(*p));
        if self.parts.len() != before {
            self.epoch += 1;
        }
    }

    fn get(&mut self, partition: i32, offset: i64) -> Option<&mut Tracked> {
        let q = self.parts.get_mut(&partition)?;
        let i = q.binary_search_by_key(&offset, |t| t.offset).ok()?;
        q.get_mut(i)
    }

    fn mark(&mut self, partition: i32, offset: i64, epoch: u64, state: State) {
        if let Some(t) = self.get(partition, offset).filter(|t| t.epoch == epoch) {
            t.state = state;
            if state == State::Failed {
                t.failures += 1;
            }
        }
    }

    /// Drop the finished prefix of each partition; the offsets to commit
    /// (one past the last finished item of the prefix).
    fn committable(&mut self) -> Vec<(i32, i64)> {
        let mut out = Vec::new();
        for (p, q) in self.parts.iter_mut() {
            let mut last = None;
            while let Some(Tracked {
                offset,
                state: State::Done,
                ..
            }) = q.front()
            {
                last = Some(*offset);
                q.pop_front();
            }
            if let Some(o) = last {
                out.push((*p, o + 1));
            }
        }
        out
    }

    /// Items handed over whose offsets are not committed yet.
    fn uncommitted(&self) -> usize {
        self.parts.values().map(VecDeque::len).sum()
    }

    /// Items the stage still holds.
    fn pending(&self) -> usize {
        self.parts
            .values()
            .flat_map(|q| q.iter())
            .filter(|t| t.state == State::Pending)
            .count()
    }
}

/// How long a gap is read again before it is taken as real.
const GAP_PATIENCE: Duration = Duration::from_secs(5);

/// The next offset expected per partition. Offsets of imflow's topics are
/// contiguous (no transactions, no compaction), so a record past the next
/// expected offset means the broker let this consumer read past records not
/// yet visible to it (seen with tansu's in-memory engine under concurrent
/// producers: two records of one producer's batch skipped while a later
/// batch was read): they would be lost for good, since the commit moves
/// past them. The gap is read again (a seek back), and taken as real only
/// when reads still miss it after [`GAP_PATIENCE`].
#[derive(Default)]
struct Gaps {
    next: HashMap<i32, i64>,
    /// The gap being read again per partition: its first offset, and since
    /// when.
    reading: HashMap<i32, (i64, std::time::Instant)>,
}

#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// In order (or the partition started again lower): hand it over.
    Take,
    /// Records before it are missing: read again from this offset.
    ReadAgain(i64),
    /// Still missing after reading again for long: go on without them
    /// (missing from this offset).
    Skip(i64),
}

impl Gaps {
    fn seen(&mut self, partition: i32, offset: i64, now: std::time::Instant) -> Seen {
        match self.next.get(&partition).copied() {
            Some(next) if offset > next => {
                let r = self.reading.entry(partition).or_insert((next, now));
                if r.0 != next {
                    *r = (next, now);
                }
                if now.duration_since(r.1) < GAP_PATIENCE {
                    return Seen::ReadAgain(next);
                }
                self.accept(partition, offset);
                Seen::Skip(next)
            }
            _ => {
                self.accept(partition, offset);
                Seen::Take
            }
        }
    }

    /// Go on from `offset`, whatever came before it.
    fn accept(&mut self, partition: i32, offset: i64) {
        self.next.insert(partition, offset + 1);
        self.reading.remove(&partition);
    }

    /// Forget partitions no longer this consumer's: their next owner starts
    /// wherever the group's commit says.
    fn forget_unowned(&mut self, owned: impl Fn(i32) -> bool) {
        self.next.retain(|p, _| owned(*p));
        self.reading.retain(|p, _| owned(*p));
    }
}

/// Delay before a failed item is handed over again: 100 ms doubling to 10 s.
fn retry_delay(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(8).saturating_sub(1)))
        .min(Duration::from_secs(10))
}

fn lock(o: &Mutex<Offsets>) -> std::sync::MutexGuard<'_, Offsets> {
    match o.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Consume `topic` for stage `stage` into `queues` (index = partition modulo
/// their number) until `shutdown`; then wait (bounded by the topology's
/// deadline) for the handed-out items to finish and commit them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn consumer_task<T: DeserializeOwned + Send + 'static>(
    settings: &KafkaSettings,
    stage: &str,
    topic: &str,
    queues: Vec<mpsc::Sender<Envelope<T>>>,
    shutdown: CancellationToken,
    errors: Counter,
    ready: Arc<Readiness>,
) -> Result<crate::registry::StageTask, KafkaError> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .set("group.id", format!("{}.{}", settings.group_prefix, stage))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        // A member that dies (or joins) moves only its own partitions; the
        // others keep consuming through the rebalance instead of all
        // stopping until it settles (KIP-429).
        .set("partition.assignment.strategy", &settings.assignment)
        .set(
            "heartbeat.interval.ms",
            (settings.session_timeout.as_millis() / 3)
                .clamp(100, 1000)
                .to_string(),
        )
        .set(
            "session.timeout.ms",
            settings.session_timeout.as_millis().max(1).to_string(),
        )
        .set("fetch.wait.max.ms", settings.fetch_wait_ms.to_string())
        .create()?;
    consumer.subscribe(&[topic])?;
    let consumer = Arc::new(consumer);
    let topic = topic.to_string();
    let stage = stage.to_string();
    let every = settings.commit_interval;
    // Counted now, not when the task first runs: a readiness check made
    // before the task is polled must already wait for it.
    ready.one_more();
    Ok(Box::pin(async move {
        let offsets = Arc::new(Mutex::new(Offsets::default()));
        // Items whose ack failed, to hand to the stage again.
        let (failed_tx, mut failed_rx) = mpsc::unbounded_channel::<(i32, i64, u64)>();
        let retried = metrics::counter!("imflow_kafka_items_retried_total", "stage" => stage.clone(), "topic" => topic.clone());
        // Zero once everything handed over is committed; a partition that
        // never gets there is stuck.
        let uncommitted = metrics::gauge!("imflow_kafka_uncommitted", "stage" => stage.clone(), "topic" => topic.clone());
        let mut tick = tokio::time::interval(every);
        let mut ticks = 0u64;
        let mut assigned = false;
        let n = queues.len().max(1) as i32;
        // The ack of one handed-over item: done, or failed and retried.
        let ack_for = |partition: i32, offset: i64, epoch: u64| {
            let marks = offsets.clone();
            let failed = failed_tx.clone();
            Ack::new(move |status| match status {
                AckStatus::Failed(why) => {
                    tracing::warn!(partition, offset, reason = %why, "item failed downstream; it will be handed over again");
                    lock(&marks).mark(partition, offset, epoch, State::Failed);
                    let _ = failed.send((partition, offset, epoch));
                }
                _ => lock(&marks).mark(partition, offset, epoch, State::Done),
            })
        };
        let decode = |payload: &[u8], partition: i32, offset: i64| -> Option<T> {
            match serde_json::from_slice(payload) {
                Ok(v) => Some(v),
                Err(e) => {
                    errors.increment(1);
                    tracing::error!(%stage, %topic, partition, offset, error = %e, "undecodable item skipped");
                    None
                }
            }
        };
        let mut gaps = Gaps::default();
        let read_again = metrics::counter!("imflow_kafka_gaps_read_again_total", "stage" => stage.clone(), "topic" => topic.clone());
        let skipped = metrics::counter!("imflow_kafka_gaps_skipped_total", "stage" => stage.clone(), "topic" => topic.clone());
        let mut retries: FuturesUnordered<futures::future::BoxFuture<'static, (i32, i64, u64)>> =
            FuturesUnordered::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {
                    ticks += 1;
                    commit(&consumer, &topic, &offsets, CommitMode::Async, ticks % 10 == 0);
                    if let Ok(owned) = consumer.assignment() {
                        lock(&offsets).forget_unowned(|p| owned.find_partition(&topic, p).is_some());
                        gaps.forget_unowned(|p| owned.find_partition(&topic, p).is_some());
                    }
                    uncommitted.set(lock(&offsets).uncommitted() as f64);
                    if !assigned && consumer.assignment().is_ok_and(|a| a.count() > 0) {
                        assigned = true;
                        tracing::info!(%stage, %topic, "kafka consumer has its partitions");
                        ready.one_done();
                    }
                }
                Some((partition, offset, epoch)) = failed_rx.recv() => {
                    let failures = lock(&offsets).get(partition, offset).map(|t| t.failures).unwrap_or(1);
                    retries.push(Box::pin(async move {
                        tokio::time::sleep(retry_delay(failures)).await;
                        (partition, offset, epoch)
                    }));
                }
                Some((partition, offset, epoch)) = retries.next(), if !retries.is_empty() => {
                    // Not if the partition went to another consumer meanwhile
                    // (it replays from the committed offset; the next tick
                    // forgets it here). Unsure (no answer): later.
                    let ours = match consumer.assignment() {
                        Ok(a) => a.find_partition(&topic, partition).is_some(),
                        Err(_) => {
                            retries.push(Box::pin(async move {
                                tokio::time::sleep(Duration::from_secs(1)).await;
                                (partition, offset, epoch)
                            }));
                            continue;
                        }
                    };
                    let again = {
                        let mut o = lock(&offsets);
                        o.get(partition, offset).filter(|t| ours && t.epoch == epoch).map(|t| {
                            t.state = State::Pending;
                            (t.key, t.payload.clone())
                        })
                    };
                    let Some((key, payload)) = again else { continue };
                    let Some(item) = decode(&payload, partition, offset) else {
                        lock(&offsets).mark(partition, offset, epoch, State::Done);
                        continue;
                    };
                    retried.increment(1);
                    let q = &queues[(partition.rem_euclid(n)) as usize];
                    tokio::select! {
                        sent = q.send(Envelope::new(key, item, ack_for(partition, offset, epoch))) => if sent.is_err() { break },
                        _ = shutdown.cancelled() => break,
                    }
                }
                msg = consumer.recv() => {
                    let msg = match msg {
                        Ok(m) => m,
                        Err(e) => {
                            errors.increment(1);
                            tracing::warn!(%stage, %topic, error = %e, "kafka consume error");
                            continue;
                        }
                    };
                    let (partition, offset) = (msg.partition(), msg.offset());
                    match gaps.seen(partition, offset, std::time::Instant::now()) {
                        Seen::Take => {}
                        Seen::ReadAgain(from) => {
                            // librdkafka's seek blocks its thread up to the
                            // timeout: not a worker's (there may be one).
                            let (seeking, t) = (consumer.clone(), topic.clone());
                            let sought = tokio::task::spawn_blocking(move || {
                                seeking.seek(&t, partition, Offset::Offset(from), Duration::from_secs(1))
                            })
                            .await
                            .unwrap_or(Err(KafkaError::Canceled));
                            match sought {
                                Ok(()) => {
                                    // This record comes again after the missing ones.
                                    read_again.increment(1);
                                    tracing::warn!(%stage, %topic, partition, from, to = offset, "the broker skipped records; reading them again");
                                    continue;
                                }
                                Err(e) => {
                                    // Never drop what was read: go on from here.
                                    gaps.accept(partition, offset);
                                    skipped.increment(1);
                                    errors.increment(1);
                                    tracing::error!(%stage, %topic, partition, from, to = offset, error = %e, "the broker skipped records and they cannot be read again; going on without them");
                                }
                            }
                        }
                        Seen::Skip(from) => {
                            skipped.increment(1);
                            errors.increment(1);
                            tracing::error!(%stage, %topic, partition, from, to = offset, "records missing from the partition after every read; going on without them");
                        }
                    }
                    let key = msg
                        .key()
                        .and_then(|k| <[u8; 8]>::try_from(k).ok())
                        .map(u64::from_be_bytes)
                        .unwrap_or(partition as u64);
                    let payload: Arc<[u8]> = Arc::from(msg.payload().unwrap_or_default());
                    let epoch = lock(&offsets).track(partition, offset, key, payload.clone());
                    let Some(item) = decode(&payload, partition, offset) else {
                        lock(&offsets).mark(partition, offset, epoch, State::Done);
                        continue;
                    };
                    let q = &queues[(partition.rem_euclid(n)) as usize];
                    tokio::select! {
                        sent = q.send(Envelope::new(key, item, ack_for(partition, offset, epoch))) => if sent.is_err() { break },
                        _ = shutdown.cancelled() => break,
                    }
                }
            }
        }
        // Let the stage drain what it was given, then commit what finished.
        // (A failed item is not retried any more: the next run replays it.)
        drop(queues);
        while lock(&offsets).pending() > 0 {
            commit(&consumer, &topic, &offsets, CommitMode::Async, false);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A synchronous commit waits for the broker: off the workers, so
        // the other stages' drains go on meanwhile.
        let (last, t, o) = (consumer.clone(), topic.clone(), offsets.clone());
        let _ = tokio::task::spawn_blocking(move || {
            commit(&last, &t, &o, CommitMode::Sync, true);
        })
        .await;
        consumer.unsubscribe();
        StageResult::Ok(())
    }))
}

/// Commit what finished. With `again`, also the last offsets committed
/// before: an asynchronous commit can fail unseen (a rebalance in progress
/// answers ILLEGAL_GENERATION), and a partition that then goes quiet would
/// otherwise keep its older offset and replay the difference.
fn commit(
    consumer: &StreamConsumer,
    topic: &str,
    offsets: &Mutex<Offsets>,
    mode: CommitMode,
    again: bool,
) {
    // Only partitions still ours: an older offset committed for one that
    // moved to another consumer would set its group back.
    let owned = again.then(|| consumer.assignment().ok()).flatten();
    let ready = {
        let mut o = lock(offsets);
        let fresh = o.committable();
        for &(p, off) in &fresh {
            o.committed.insert(p, off);
        }
        match owned {
            Some(owned) => {
                o.committed
                    .retain(|p, _| owned.find_partition(topic, *p).is_some());
                o.committed.iter().map(|(p, off)| (*p, *off)).collect()
            }
            None => fresh,
        }
    };
    if ready.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (p, o) in ready {
        if let Err(e) = tpl.add_partition_offset(topic, p, Offset::Offset(o)) {
            tracing::warn!(%topic, partition = p, error = %e, "cannot prepare offset commit");
        }
    }
    if let Err(e) = consumer.commit(&tpl, mode) {
        tracing::warn!(%topic, error = %e, "offset commit failed; will retry");
    }
}

/// Create the topics of `pipeline`'s Kafka edges that do not exist yet, with
/// the partition counts pipeline.yaml gives (existing topics are left as
/// they are). Brokers such as tansu do not create topics on first use.
pub async fn ensure_topics(
    settings: &KafkaSettings,
    pipeline: &crate::CompiledPipeline,
) -> Result<Vec<String>, KafkaError> {
    let wanted: Vec<(String, u32)> = pipeline
        .graph
        .edge_weights()
        .filter_map(|e| e.topic.clone().map(|t| (t, e.partitions)))
        .collect();
    create_topics(settings, &wanted).await
}

/// Create those of `wanted` (topic, partitions) that do not exist yet;
/// returns the ones created.
pub async fn create_topics(
    settings: &KafkaSettings,
    wanted: &[(String, u32)],
) -> Result<Vec<String>, KafkaError> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .create()?;
    let topics: Vec<NewTopic<'_>> = wanted
        .iter()
        .map(|(t, p)| NewTopic::new(t, *p as i32, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let mut created = Vec::new();
    for r in admin.create_topics(&topics, &opts).await? {
        match r {
            Ok(t) => created.push(t),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => {
                tracing::error!(topic = %t, error = %code, "cannot create topic");
                return Err(KafkaError::AdminOp(code));
            }
        }
    }
    Ok(created)
}

/// How many partitions `topic` has (0 if the broker does not know it).
pub async fn topic_partitions(settings: &KafkaSettings, topic: &str) -> Result<u32, KafkaError> {
    let counts = partition_counts(settings, &[topic.to_string()]).await?;
    Ok(counts.get(topic).copied().unwrap_or(0))
}

/// How many partitions each of `topics` has on the broker (absent: unknown
/// to it), one metadata request per topic on one client.
pub async fn partition_counts(
    settings: &KafkaSettings,
    topics: &[String],
) -> Result<HashMap<String, u32>, KafkaError> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &settings.brokers);
    let topics = topics.to_vec();
    // librdkafka's metadata call blocks its thread.
    tokio::task::spawn_blocking(move || {
        let client: rdkafka::consumer::BaseConsumer = config.create()?;
        let mut counts = HashMap::new();
        for topic in &topics {
            let md = client.fetch_metadata(Some(topic), Duration::from_secs(10))?;
            for t in md.topics() {
                if t.name() == topic && !t.partitions().is_empty() {
                    counts.insert(topic.clone(), t.partitions().len() as u32);
                }
            }
        }
        Ok(counts)
    })
    .await
    .map_err(|_| KafkaError::Canceled)?
}

/// Writes records to one topic outside the pipeline's edges (e.g. dead
/// letters), with an edge's guarantees: acks=all, idempotent, a producer
/// replaced when fenced. `write` returns once the broker confirmed.
pub struct TopicWriter {
    out: KafkaOut,
}

impl TopicWriter {
    pub fn new(settings: &KafkaSettings, topic: &str, partitions: u32) -> Result<Self, KafkaError> {
        Ok(TopicWriter {
            out: producer(settings, topic, partitions)?,
        })
    }

    /// Write `item` as JSON to the partition of `key`; `Err` says why the
    /// broker did not take it.
    pub async fn write<T: Serialize>(&self, key: u64, item: T) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let ack = Ack::new(move |status| {
            let _ = tx.send(status);
        });
        self.out
            .send(Envelope::new(key, item, ack))
            .await
            .map_err(|e| e.to_string())?;
        match rx.await {
            Ok(AckStatus::Failed(why)) => Err(why.to_string()),
            Ok(_) => Ok(()),
            Err(_) => Err("the write was dropped unconfirmed".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_gap_is_read_again_and_taken_as_real_only_after_a_while() {
        use super::{Gaps, Seen, GAP_PATIENCE};
        let t = std::time::Instant::now();
        let mut g = Gaps::default();
        assert_eq!(g.seen(2, 4886, t), Seen::Take);
        // 4887 and 4888 skipped: read again from 4887.
        assert_eq!(g.seen(2, 4889, t), Seen::ReadAgain(4887));
        assert_eq!(g.seen(2, 4887, t), Seen::Take);
        assert_eq!(g.seen(2, 4888, t), Seen::Take);
        assert_eq!(g.seen(2, 4889, t), Seen::Take);
        // Another partition is its own.
        assert_eq!(g.seen(3, 10, t), Seen::Take);
        // A partition that starts again lower (it moved away and back).
        assert_eq!(g.seen(2, 4000, t), Seen::Take);
        assert_eq!(g.seen(2, 4001, t), Seen::Take);
        // A gap that stays: read again until the patience is spent, then
        // skipped.
        assert_eq!(g.seen(2, 4010, t), Seen::ReadAgain(4002));
        assert_eq!(g.seen(2, 4011, t + GAP_PATIENCE / 2), Seen::ReadAgain(4002));
        assert_eq!(g.seen(2, 4010, t + GAP_PATIENCE), Seen::Skip(4002));
        assert_eq!(g.seen(2, 4011, t + GAP_PATIENCE), Seen::Take);
        // A partition no longer ours starts afresh.
        g.forget_unowned(|p| p != 3);
        assert_eq!(g.seen(3, 50, t), Seen::Take);
    }

    use super::{retry_delay, Offsets, State};
    use std::sync::Arc;

    #[test]
    fn commits_only_the_finished_prefix_and_never_past_a_failure() {
        let mut o = Offsets::default();
        let mut e = 0;
        for off in 10..16 {
            e = o.track(0, off, 0, Arc::from(&b"{}"[..]));
        }
        o.mark(0, 11, e, State::Done);
        assert!(o.committable().is_empty(), "10 is not finished yet");
        o.mark(0, 10, e, State::Done);
        assert_eq!(o.committable(), vec![(0, 12)]);
        o.mark(0, 14, e, State::Done);
        assert!(o.committable().is_empty());
        o.mark(0, 12, e, State::Done);
        o.mark(0, 13, e, State::Failed);
        assert_eq!(o.committable(), vec![(0, 13)]);
        o.mark(0, 15, e, State::Done);
        assert!(o.committable().is_empty(), "13 failed: not committed past");
        assert_eq!(o.pending(), 0);
        // Handed over again and done this time: the partition moves on.
        o.mark(0, 13, e, State::Done);
        assert_eq!(o.committable(), vec![(0, 16)]);
    }

    #[test]
    fn a_partition_handed_over_again_forgets_the_earlier_acks() {
        let mut o = Offsets::default();
        let first = o.track(0, 10, 0, Arc::from(&b"{}"[..]));
        o.track(0, 11, 0, Arc::from(&b"{}"[..]));
        // It went elsewhere and came back from the committed offset 10.
        let second = o.track(0, 10, 0, Arc::from(&b"{}"[..]));
        assert_ne!(first, second);
        o.mark(0, 10, first, State::Done);
        assert!(o.committable().is_empty(), "a stale ack counts for nothing");
        o.mark(0, 10, second, State::Done);
        assert_eq!(o.committable(), vec![(0, 11)]);
    }

    #[test]
    fn retries_back_off_to_ten_seconds() {
        let ms: Vec<u128> = [1, 2, 3, 8, 30]
            .into_iter()
            .map(|f| retry_delay(f).as_millis())
            .collect();
        assert_eq!(ms, [100, 200, 400, 10_000, 10_000]);
    }
}
