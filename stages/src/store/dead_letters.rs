//! Where a sink stage puts what it gave up on (a webhook whose receiver
//! refused a message past its retries), so its partition can move on and
//! nothing is dropped unseen: a table of the embedded store (standalone), or
//! a Kafka topic (with Kafka edges, a cluster's log of record).

use std::sync::Arc;

use async_trait::async_trait;
use imflow_runtime::kafka::TopicWriter;
use imflow_runtime::KafkaSettings;
use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::error::{Error, Result};
use crate::model::partition_key;
use crate::store::SqliteStore;

/// One item given up on, with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The stage that gave up (its name in pipeline.yaml).
    pub stage: String,
    pub conversation_id: String,
    pub seq: u64,
    pub server_msg_id: String,
    /// The message JSON as it would have been delivered.
    pub body: String,
    /// The last failure.
    pub error: String,
    pub attempts: u32,
    pub at_ms: i64,
}

#[async_trait]
pub trait DeadLetters: Send + Sync + 'static {
    /// Keep `letters` durably; `Ok` only once they are.
    async fn put(&self, letters: &[DeadLetter]) -> Result<()>;
    /// Where they go, for logs: a table or a topic.
    fn place(&self) -> String;
}

#[async_trait]
impl DeadLetters for SqliteStore {
    async fn put(&self, letters: &[DeadLetter]) -> Result<()> {
        let mut tx = self.write_pool().begin().await?;
        for l in letters {
            sqlx::query(
                "INSERT INTO dead_letters (stage, conversation_id, seq, server_msg_id, body, error, attempts, at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&l.stage)
            .bind(&l.conversation_id)
            .bind(l.seq as i64)
            .bind(&l.server_msg_id)
            .bind(&l.body)
            .bind(&l.error)
            .bind(l.attempts as i64)
            .bind(l.at_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    fn place(&self) -> String {
        "the embedded store's table dead_letters".into()
    }
}

impl SqliteStore {
    /// The dead letters of `stage`, oldest first.
    pub async fn dead_letters(&self, stage: &str) -> Result<Vec<DeadLetter>> {
        let rows = sqlx::query(
            "SELECT stage, conversation_id, seq, server_msg_id, body, error, attempts, at_ms FROM dead_letters WHERE stage = ? ORDER BY id",
        )
        .bind(stage)
        .fetch_all(self.write_pool())
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(DeadLetter {
                    stage: r.try_get(0)?,
                    conversation_id: r.try_get(1)?,
                    seq: r.try_get::<i64, _>(2)? as u64,
                    server_msg_id: r.try_get(3)?,
                    body: r.try_get(4)?,
                    error: r.try_get(5)?,
                    attempts: r.try_get::<i64, _>(6)? as u32,
                    at_ms: r.try_get(7)?,
                })
            })
            .collect()
    }
}

/// Dead letters as JSON records on a Kafka topic, keyed by conversation.
pub struct KafkaDeadLetters {
    topic: String,
    writer: TopicWriter,
}

/// The topic's partitions when imflow creates it (an existing topic keeps
/// its own).
const PARTITIONS: u32 = 8;

impl KafkaDeadLetters {
    /// Writes to `topic`, created if missing.
    pub async fn open(settings: &KafkaSettings, topic: &str) -> Result<Arc<Self>> {
        let kafka = |e: &dyn std::fmt::Display| {
            Error::Backend(format!(
                "kafka.addr ({}): topic {topic}: {e}",
                settings.brokers
            ))
        };
        imflow_runtime::kafka::create_topics(settings, &[(topic.to_string(), PARTITIONS)])
            .await
            .map_err(|e| kafka(&e))?;
        let partitions = imflow_runtime::kafka::topic_partitions(settings, topic)
            .await
            .map_err(|e| kafka(&e))?;
        if partitions == 0 {
            return Err(kafka(&"the broker lists no partitions for it"));
        }
        let writer = TopicWriter::new(settings, topic, partitions).map_err(|e| kafka(&e))?;
        Ok(Arc::new(KafkaDeadLetters {
            topic: topic.to_string(),
            writer,
        }))
    }
}

#[async_trait]
impl DeadLetters for KafkaDeadLetters {
    async fn put(&self, letters: &[DeadLetter]) -> Result<()> {
        let writes = letters
            .iter()
            .map(|l| self.writer.write(partition_key(&l.conversation_id), l));
        for r in futures::future::join_all(writes).await {
            r.map_err(|why| Error::Backend(format!("kafka topic {}: {why}", self.topic)))?;
        }
        Ok(())
    }

    fn place(&self) -> String {
        format!("the kafka topic {}", self.topic)
    }
}
