//! Edges between stages.
//!
//! An edge is partitioned: the producer gives every item a key, and items with
//! the same key always reach the same partition, so per-key order holds (one
//! conversation's messages stay in order). The consumer runs one task per
//! partition. Each in-memory partition is a bounded queue: a producer that
//! outruns its consumer waits, nothing grows without bound.
//!
//! The same shape carries a Kafka edge: a partition is a topic partition, the
//! key picks it, and an item's [`Ack`] is what lets the consumer commit its
//! offset once everything downstream of it is durable.

use std::sync::Arc;

use metrics::Counter;
use tokio::sync::mpsc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::ack::Ack;
use crate::kafka::KafkaOut;

/// An item on an edge.
#[derive(Debug)]
pub struct Envelope<T> {
    /// Partitioning key (a stable hash chosen by the producer).
    pub key: u64,
    pub item: T,
    pub ack: Ack,
}

impl<T> Envelope<T> {
    pub fn new(key: u64, item: T, ack: Ack) -> Self {
        Envelope { key, item, ack }
    }
}

/// The downstream side of an edge has gone: its consumer stopped.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the downstream stage is no longer running")]
pub struct Closed;

/// Items an edge carries: in-memory, or serialised onto a Kafka topic.
pub trait Payload: Clone + Send + Serialize + DeserializeOwned + 'static {}
impl<T: Clone + Send + Serialize + DeserializeOwned + 'static> Payload for T {}

pub(crate) enum EdgeSenders<T> {
    Memory {
        partitions: Vec<mpsc::Sender<Envelope<T>>>,
    },
    Kafka(KafkaOut),
}

/// Where a stage sends what it produces. Cloning is cheap; the edge closes
/// (and its consumers drain and stop) when the last clone is dropped.
pub struct Output<T> {
    inner: Arc<OutputInner<T>>,
}

impl<T> Clone for Output<T> {
    fn clone(&self) -> Self {
        Output {
            inner: self.inner.clone(),
        }
    }
}

struct OutputInner<T> {
    /// The stage that sends (for taps).
    stage: Arc<str>,
    edges: Vec<EdgeSenders<T>>,
    sent: Counter,
    /// Fault injection (`crate::fault`): never send.
    stalled: bool,
}

impl<T: Payload> Output<T> {
    #[cfg(test)]
    pub(crate) fn new(edges: Vec<EdgeSenders<T>>, sent: Counter) -> Self {
        Self::with_fault("test".into(), edges, sent, false)
    }

    pub(crate) fn with_fault(
        stage: Arc<str>,
        edges: Vec<EdgeSenders<T>>,
        sent: Counter,
        stalled: bool,
    ) -> Self {
        Output {
            inner: Arc::new(OutputInner {
                stage,
                edges,
                sent,
                stalled,
            }),
        }
    }

    /// Send one item to every consumer of this output, waiting while the
    /// target partition is full. If a consumer is gone, the item's ack is
    /// failed and `Closed` returned.
    pub async fn send(&self, env: Envelope<T>) -> Result<(), Closed> {
        if self.inner.stalled {
            let _held = env;
            return std::future::pending().await;
        }
        if crate::tap::active() {
            crate::tap::observe(&self.inner.stage, "out", env.key, &env.item);
        }
        let edges = &self.inner.edges;
        let Some((last, rest)) = edges.split_last() else {
            // A stage whose output nobody consumes: the item ends here.
            env.ack.release();
            return Ok(());
        };
        for edge in rest {
            let copy = Envelope {
                key: env.key,
                item: env.item.clone(),
                ack: env.ack.clone(),
            };
            Self::send_to(edge, copy).await?;
        }
        Self::send_to(last, env).await?;
        self.inner.sent.increment(1);
        Ok(())
    }

    async fn send_to(edge: &EdgeSenders<T>, env: Envelope<T>) -> Result<(), Closed> {
        let partitions = match edge {
            EdgeSenders::Memory { partitions } => partitions,
            EdgeSenders::Kafka(k) => return k.send(env).await,
        };
        let n = partitions.len() as u64;
        let idx = (env.key % n.max(1)) as usize;
        match partitions[idx].send(env).await {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendError(env)) => {
                env.ack.fail("the downstream stage is no longer running");
                env.ack.release();
                Err(Closed)
            }
        }
    }
}

/// One partition of one input edge.
pub struct Input<T> {
    rx: mpsc::Receiver<Envelope<T>>,
    received: Counter,
    partition: u32,
    /// The stage that reads it (for taps).
    stage: Arc<str>,
}

impl<T: Serialize> Input<T> {
    pub(crate) fn new(
        rx: mpsc::Receiver<Envelope<T>>,
        received: Counter,
        partition: u32,
        stage: Arc<str>,
    ) -> Self {
        Input {
            rx,
            received,
            partition,
            stage,
        }
    }

    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// Wait for at least one item, then take whatever else is already queued,
    /// up to `max` in all. Batches grow with load and cost no latency when the
    /// edge is idle. Returns `false` once the edge is closed and drained.
    pub async fn recv_batch(&mut self, buf: &mut Vec<Envelope<T>>, max: usize) -> bool {
        let n = self.rx.recv_many(buf, max.max(1)).await;
        self.received.increment(n as u64);
        if crate::tap::active() {
            for env in &buf[buf.len() - n..] {
                crate::tap::observe(&self.stage, "in", env.key, &env.item);
            }
        }
        n > 0
    }

    pub async fn recv(&mut self) -> Option<Envelope<T>> {
        let env = self.rx.recv().await;
        if let Some(env) = &env {
            self.received.increment(1);
            if crate::tap::active() {
                crate::tap::observe(&self.stage, "in", env.key, &env.item);
            }
        }
        env
    }
}

/// Reads the depth of one queue for `/metrics` without keeping it open.
pub(crate) struct QueueProbe {
    pub(crate) edge: String,
    pub(crate) partition: u32,
    pub(crate) depth: Box<dyn Fn() -> Option<usize> + Send + Sync>,
}

pub(crate) fn memory_partition<T: Send + Serialize + 'static>(
    capacity: usize,
    edge: &str,
    partition: u32,
    received: Counter,
    consumer: Arc<str>,
) -> (mpsc::Sender<Envelope<T>>, Input<T>, QueueProbe) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let weak = tx.downgrade();
    let probe = QueueProbe {
        edge: edge.to_string(),
        partition,
        depth: Box::new(move || weak.upgrade().map(|tx| tx.max_capacity() - tx.capacity())),
    };
    (tx, Input::new(rx, received, partition, consumer), probe)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ack::AckStatus;

    fn counter() -> Counter {
        Counter::noop()
    }

    #[tokio::test]
    async fn same_key_same_partition_and_order() {
        let mut txs = Vec::new();
        let mut inputs = Vec::new();
        for p in 0..4 {
            let (tx, input, _) = memory_partition::<u32>(16, "a->b", p, counter(), "b".into());
            txs.push(tx);
            inputs.push(input);
        }
        let out = Output::new(vec![EdgeSenders::Memory { partitions: txs }], counter());
        for i in 0..8u32 {
            out.send(Envelope::new(7, i, Ack::none())).await.unwrap();
        }
        drop(out);
        let mut buf = Vec::new();
        let p = &mut inputs[(7 % 4) as usize];
        while p.recv_batch(&mut buf, 100).await {}
        let got: Vec<u32> = buf.iter().map(|e| e.item).collect();
        assert_eq!(got, (0..8).collect::<Vec<_>>());
        for e in buf {
            e.ack.release();
        }
    }

    #[tokio::test]
    async fn bounded_queue_applies_backpressure() {
        let (tx, mut input, probe) = memory_partition::<u32>(2, "a->b", 0, counter(), "b".into());
        let out = Output::new(
            vec![EdgeSenders::Memory {
                partitions: vec![tx],
            }],
            counter(),
        );
        out.send(Envelope::new(0, 1, Ack::none())).await.unwrap();
        out.send(Envelope::new(0, 2, Ack::none())).await.unwrap();
        assert_eq!((probe.depth)(), Some(2));
        let third = out.send(Envelope::new(0, 3, Ack::none()));
        tokio::pin!(third);
        assert!(
            futures::poll!(third.as_mut()).is_pending(),
            "full queue must make the producer wait"
        );
        input.recv().await.unwrap().ack.release();
        third.await.unwrap();
    }

    #[tokio::test]
    async fn send_to_a_stopped_consumer_fails_the_ack() {
        let (tx, input, _) = memory_partition::<u32>(2, "a->b", 0, counter(), "b".into());
        drop(input);
        let out = Output::new(
            vec![EdgeSenders::Memory {
                partitions: vec![tx],
            }],
            counter(),
        );
        let (stx, srx) = std::sync::mpsc::channel();
        let ack = Ack::new(move |s| stx.send(s).unwrap());
        assert!(out.send(Envelope::new(0, 1, ack)).await.is_err());
        assert!(matches!(srx.recv().unwrap(), AckStatus::Failed(_)));
    }
}
