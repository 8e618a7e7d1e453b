//! The message history in MongoDB (cluster mode).
//!
//! One document per message, `{conversation_id, seq, server_msg_id,
//! client_msg_id, sender, send_time, body}`, with a unique index on
//! `(conversation_id, seq)`. OpenIM packs 5,000 messages of a user into one
//! document; that makes every write a read-modify-write of a growing array
//! (`$push` with upsert), which cannot be retried blindly and serialises
//! every writer of a block. Independent documents make a batch one unordered
//! `insert_many`: a replayed batch only meets duplicate-key errors, and a
//! range read is one index scan sorted by seq. A duplicate key means
//! "already stored" only when the stored message has the same
//! `server_msg_id`; under another one the seq was handed out twice, and the
//! message is reported as taken (never as stored).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use mongodb::bson::{doc, Document};
use mongodb::error::ErrorKind;
use mongodb::options::{Acknowledgment, ClientOptions, FindOptions, IndexOptions, WriteConcern};
use mongodb::{Client, Collection, IndexModel};

use super::{History, Taken};
use crate::error::{Error, Result};
use crate::model::Sequenced;

/// Where MongoDB is.
#[derive(Debug, Clone)]
pub struct MongoSettings {
    /// A full `mongodb://` URI; when empty one is built from the rest.
    pub uri: String,
    pub addrs: Vec<String>,
    pub database: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// The authentication database.
    pub auth_source: String,
    pub max_pool_size: u32,
}

impl Default for MongoSettings {
    fn default() -> Self {
        MongoSettings {
            uri: String::new(),
            addrs: vec!["127.0.0.1:37017".into()],
            database: "imflow".into(),
            username: None,
            password: None,
            auth_source: "admin".into(),
            max_pool_size: 100,
        }
    }
}

impl MongoSettings {
    fn uri(&self) -> String {
        if !self.uri.is_empty() {
            return self.uri.clone();
        }
        let auth = match (&self.username, &self.password) {
            (Some(u), Some(p)) => format!("{}:{}@", super::url_escape(u), super::url_escape(p)),
            _ => String::new(),
        };
        let source = if auth.is_empty() {
            String::new()
        } else {
            format!("&authSource={}", self.auth_source)
        };
        format!(
            "mongodb://{auth}{}/?maxPoolSize={}{source}",
            self.addrs.join(","),
            self.max_pool_size
        )
    }
}

pub struct MongoHistory {
    messages: Collection<Document>,
}

const DUPLICATE_KEY: i32 = 11000;
/// Longest wait for a batch insert before it counts as failed.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a read.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Finds in flight while looking up who holds duplicate seqs.
const TAKEN_FINDS_AT_ONCE: usize = 8;

impl MongoHistory {
    /// Connect, check the server answers (within 10 s), create the index.
    /// Errors name the setting to fix.
    pub async fn connect(settings: &MongoSettings) -> Result<Arc<MongoHistory>> {
        let what = if settings.uri.is_empty() {
            format!("mongo.dbAddress ({})", settings.addrs.join(", "))
        } else {
            "mongo.dbUri".to_string()
        };
        let fail = |e: String| Error::Backend(format!("{what}: {e}"));
        let mut opts = ClientOptions::parse(settings.uri())
            .await
            .map_err(|e| fail(e.to_string()))?;
        opts.server_selection_timeout = Some(Duration::from_secs(5));
        opts.connect_timeout = Some(Duration::from_secs(5));
        opts.app_name = Some("imflow".into());
        // A message counts as stored once a majority has it on disk: the
        // client's ack (and the consumer's offset) come after this.
        opts.write_concern = Some(
            WriteConcern::builder()
                .w(Acknowledgment::Majority)
                .journal(true)
                .build(),
        );
        let client = Client::with_options(opts).map_err(|e| fail(e.to_string()))?;
        let db = client.database(&settings.database);
        tokio::time::timeout(Duration::from_secs(10), db.run_command(doc! {"ping": 1}))
            .await
            .map_err(|_| fail("no answer within 10 s".into()))?
            .map_err(|e| fail(e.to_string()))?;
        let messages = db.collection::<Document>("messages");
        messages
            .create_index(
                IndexModel::builder()
                    .keys(doc! {"conversation_id": 1, "seq": 1})
                    .options(
                        IndexOptions::builder()
                            .unique(true)
                            .name("by_conversation_seq".to_string())
                            .build(),
                    )
                    .build(),
            )
            .await
            .map_err(|e| fail(format!("creating the index on messages: {e}")))?;
        tracing::info!(database = %settings.database, "mongodb connected");
        Ok(Arc::new(MongoHistory { messages }))
    }
}

/// The positions of the batch that met a duplicate key, when those are the
/// only errors (anything else is a failed write, retried whole).
fn duplicates(e: &mongodb::error::Error) -> Option<Vec<usize>> {
    match &*e.kind {
        ErrorKind::InsertMany(m) if m.write_concern_error.is_none() => {
            let w = m.write_errors.as_ref()?;
            w.iter()
                .all(|w| w.code == DUPLICATE_KEY)
                .then(|| w.iter().map(|w| w.index).collect())
        }
        _ => None,
    }
}

#[async_trait]
impl History for MongoHistory {
    async fn commit(&self, messages: Vec<Sequenced>) -> std::result::Result<Taken, String> {
        if messages.is_empty() {
            return Ok(Taken::new());
        }
        let docs: Vec<Document> = messages
            .iter()
            .map(|m| {
                doc! {
                    "conversation_id": &*m.msg.conversation_id,
                    "seq": m.seq as i64,
                    "server_msg_id": &*m.msg.server_msg_id,
                    "client_msg_id": &*m.msg.client_msg_id,
                    "sender": &*m.msg.sender,
                    "send_time": m.msg.send_time,
                    "body": &*m.body,
                }
            })
            .collect();
        let started = std::time::Instant::now();
        // The driver waits for a reply as long as the socket stays open, and
        // a frozen or cut-off server never answers: bound the wait, the
        // caller retries (the insert is idempotent).
        let result = tokio::time::timeout(
            COMMIT_TIMEOUT,
            self.messages.insert_many(docs).ordered(false),
        )
        .await;
        metrics::histogram!("imflow_store_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("imflow_store_commit_messages").record(messages.len() as f64);
        let dups = match result {
            Ok(Ok(_)) => return Ok(Taken::new()),
            Ok(Err(e)) => match duplicates(&e) {
                Some(d) => d,
                None => return Err(format!("mongodb insert: {e}")),
            },
            Err(_) => {
                return Err(format!(
                    "mongodb insert: no answer within {} s",
                    COMMIT_TIMEOUT.as_secs()
                ))
            }
        };
        self.taken(&messages, &dups)
            .await
            .map_err(|e| e.to_string())
    }

    async fn range(&self, conversation: &str, from: u64, to: u64) -> Result<Vec<(u64, Arc<str>)>> {
        tokio::time::timeout(READ_TIMEOUT, self.range_now(conversation, from, to))
            .await
            .map_err(|_| Error::Backend("mongodb: no answer to a read within 5 s".into()))?
    }

    async fn max_seqs(&self, conversations: &[Arc<str>]) -> Result<HashMap<Arc<str>, u64>> {
        bounded(self.max_seqs_now(conversations)).await
    }

    async fn last_messages(
        &self,
        conversations: &[Arc<str>],
    ) -> Result<HashMap<Arc<str>, (u64, Arc<str>)>> {
        bounded(self.last_messages_now(conversations)).await
    }

    async fn sent_after(
        &self,
        sender: &str,
        after: &[(Arc<str>, u64)],
    ) -> Result<HashMap<Arc<str>, u64>> {
        if after.is_empty() {
            return Ok(HashMap::new());
        }
        bounded(self.sent_after_now(sender, after)).await
    }

    async fn replace_if(&self, conversation: &str, seq: u64, old: &str, new: &str) -> Result<bool> {
        bounded(async {
            let r = self
                .messages
                .update_one(
                    doc! {"conversation_id": conversation, "seq": seq as i64, "body": old},
                    doc! {"$set": {"body": new}},
                )
                .await
                .map_err(mongo_err)?;
            Ok(r.modified_count > 0)
        })
        .await
    }
}

/// Bound a read (or small write): a frozen server never answers.
async fn bounded<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(READ_TIMEOUT, f)
        .await
        .map_err(|_| Error::Backend("mongodb: no answer to a read within 5 s".into()))?
}

impl MongoHistory {
    /// Of the messages at `dups` (duplicate keys), those whose seq is held
    /// by another server_msg_id. One find per conversation, `{conversation_id,
    /// seq: {$in}}`, a few at a time: an index scan everywhere, where one
    /// `$or` of (conversation, seq) pairs was a scan of the whole collection
    /// on a server whose planner does not split an `$or` into index scans
    /// (SecantusDB: a replayed batch of 1,024 on a large history took longer
    /// than the commit's timeout, so each retry replayed it again and the
    /// history never caught up). Each find has its own time bound, so a
    /// batch of many conversations is not held to the time of one read.
    async fn taken(&self, messages: &[Sequenced], dups: &[usize]) -> Result<Taken> {
        let mut by_conversation: HashMap<Arc<str>, Vec<i64>> = HashMap::new();
        for m in dups.iter().filter_map(|&i| messages.get(i)) {
            by_conversation
                .entry(m.msg.conversation_id.clone())
                .or_default()
                .push(m.seq as i64);
        }
        let finds = by_conversation.into_iter().map(|(conversation, seqs)| {
            bounded(async move {
                let cursor = self
                    .messages
                    .find(doc! {"conversation_id": &*conversation, "seq": {"$in": seqs}})
                    .with_options(
                        FindOptions::builder()
                            .projection(
                                doc! {"_id": 0, "conversation_id": 1, "seq": 1, "server_msg_id": 1},
                            )
                            .build(),
                    )
                    .await
                    .map_err(mongo_err)?;
                cursor
                    .try_collect::<Vec<Document>>()
                    .await
                    .map_err(mongo_err)
            })
        });
        let stored: Vec<Document> = futures::stream::iter(finds)
            .buffer_unordered(TAKEN_FINDS_AT_ONCE)
            .try_concat()
            .await?;
        let mut holder: HashMap<(String, i64), String> = HashMap::new();
        for d in stored {
            if let (Ok(c), Ok(seq), Ok(id)) = (
                d.get_str("conversation_id"),
                d.get_i64("seq"),
                d.get_str("server_msg_id"),
            ) {
                holder.insert((c.to_string(), seq), id.to_string());
            }
        }
        let mut taken = Taken::new();
        for &i in dups {
            let Some(m) = messages.get(i) else { continue };
            match holder.get(&(m.msg.conversation_id.to_string(), m.seq as i64)) {
                Some(id) if *id == *m.msg.server_msg_id => {}
                Some(_) => taken.push(i),
                // A duplicate key with nobody holding the seq: not stored,
                // whatever the error said. Never taken as done: the caller
                // retries the batch (the insert is idempotent).
                None => {
                    return Err(Error::Backend(format!(
                        "mongodb reported seq {} of {} as a duplicate, and no message holds it",
                        m.seq, m.msg.conversation_id
                    )))
                }
            }
        }
        Ok(taken)
    }

    async fn range_now(
        &self,
        conversation: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<(u64, Arc<str>)>> {
        let cursor = self
            .messages
            .find(doc! {"conversation_id": conversation, "seq": {"$gte": from as i64, "$lte": to as i64}})
            .with_options(
                FindOptions::builder()
                    .sort(doc! {"seq": 1})
                    .projection(doc! {"_id": 0, "seq": 1, "body": 1})
                    .build(),
            )
            .await
            .map_err(mongo_err)?;
        let docs: Vec<Document> = cursor.try_collect().await.map_err(mongo_err)?;
        docs.into_iter()
            .map(|d| {
                let seq = d
                    .get_i64("seq")
                    .map_err(|e| Error::Backend(e.to_string()))?;
                let body = d
                    .get_str("body")
                    .map_err(|e| Error::Backend(e.to_string()))?;
                Ok((seq as u64, Arc::from(body)))
            })
            .collect()
    }

    /// One aggregate per call (not a read per conversation): a burst of
    /// new conversations costs one round trip.
    async fn max_seqs_now(&self, conversations: &[Arc<str>]) -> Result<HashMap<Arc<str>, u64>> {
        let mut out: HashMap<Arc<str>, u64> =
            conversations.iter().map(|c| (c.clone(), 0)).collect();
        let ids: Vec<&str> = conversations.iter().map(|c| &**c).collect();
        let cursor = self
            .messages
            .aggregate([
                doc! {"$match": {"conversation_id": {"$in": ids}}},
                // Sorted on the unique index, then the first of each group:
                // MongoDB answers this from the index without reading every
                // message of a long conversation.
                doc! {"$sort": {"conversation_id": 1, "seq": -1}},
                doc! {"$group": {"_id": "$conversation_id", "max": {"$first": "$seq"}}},
            ])
            .await
            .map_err(mongo_err)?;
        let docs: Vec<Document> = cursor.try_collect().await.map_err(mongo_err)?;
        for d in docs {
            let (Ok(c), Ok(max)) = (d.get_str("_id"), d.get_i64("max")) else {
                return Err(Error::Backend(format!(
                    "mongodb: unexpected max seq row {d}"
                )));
            };
            if let Some(v) = out.get_mut(c) {
                *v = max.max(0) as u64;
            }
        }
        Ok(out)
    }
}

impl MongoHistory {
    async fn last_messages_now(
        &self,
        conversations: &[Arc<str>],
    ) -> Result<HashMap<Arc<str>, (u64, Arc<str>)>> {
        let ids: Vec<&str> = conversations.iter().map(|c| &**c).collect();
        let cursor = self
            .messages
            .aggregate([
                doc! {"$match": {"conversation_id": {"$in": ids}}},
                doc! {"$sort": {"conversation_id": 1, "seq": -1}},
                doc! {"$group": {"_id": "$conversation_id", "seq": {"$first": "$seq"}, "body": {"$first": "$body"}}},
            ])
            .await
            .map_err(mongo_err)?;
        let docs: Vec<Document> = cursor.try_collect().await.map_err(mongo_err)?;
        let mut out = HashMap::with_capacity(docs.len());
        for d in docs {
            let (Ok(c), Ok(seq), Ok(body)) =
                (d.get_str("_id"), d.get_i64("seq"), d.get_str("body"))
            else {
                return Err(Error::Backend(format!(
                    "mongodb: unexpected last message row {d}"
                )));
            };
            out.insert(Arc::from(c), (seq.max(0) as u64, Arc::from(body)));
        }
        Ok(out)
    }

    async fn sent_after_now(
        &self,
        sender: &str,
        after: &[(Arc<str>, u64)],
    ) -> Result<HashMap<Arc<str>, u64>> {
        let branches: Vec<Document> = after
            .iter()
            .map(|(c, s)| doc! {"conversation_id": &**c, "seq": {"$gt": *s as i64}})
            .collect();
        let cursor = self
            .messages
            .aggregate([
                doc! {"$match": {"$or": branches, "sender": sender}},
                doc! {"$group": {"_id": "$conversation_id", "n": {"$sum": 1}}},
            ])
            .await
            .map_err(mongo_err)?;
        let docs: Vec<Document> = cursor.try_collect().await.map_err(mongo_err)?;
        let mut out = HashMap::with_capacity(docs.len());
        for d in docs {
            let c = d
                .get_str("_id")
                .map_err(|e| Error::Backend(e.to_string()))?;
            let n = d
                .get_i32("n")
                .map(i64::from)
                .or_else(|_| d.get_i64("n"))
                .map_err(|e| Error::Backend(e.to_string()))?;
            out.insert(Arc::from(c), n.max(0) as u64);
        }
        Ok(out)
    }
}

fn mongo_err(e: mongodb::error::Error) -> Error {
    Error::Backend(format!("mongodb: {e}"))
}
