//! Where a message is in a cluster's topics, for a test that lost one: in
//! `ws2ms_chat` but not `msg_to_mongo` points at seq-assign, in both but
//! not the history at persist-mongo, in neither at the door or the broker.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

/// Every record of `topics` whose payload contains `needle`, as
/// `topic[partition]@offset`, read from the beginning (blocking; a few
/// seconds per topic).
pub fn find_in_topics(brokers: &str, topics: &[String], needle: &str) -> Vec<String> {
    let consumer: BaseConsumer = match ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("trace-{}", super::unique()))
        .set("enable.auto.commit", "false")
        .create()
    {
        Ok(c) => c,
        Err(e) => return vec![format!("cannot read the topics: {e}")],
    };
    let mut found = Vec::new();
    for topic in topics {
        let partitions = match consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            Ok(md) => md.topics().first().map_or(0, |t| t.partitions().len()),
            Err(e) => {
                found.push(format!("{topic}: no metadata ({e})"));
                continue;
            }
        };
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            let _ = tpl.add_partition_offset(topic, p as i32, Offset::Beginning);
        }
        if let Err(e) = consumer.assign(&tpl) {
            found.push(format!("{topic}: cannot assign ({e})"));
            continue;
        }
        // Until the topic stays quiet for 2 s (everything read).
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < Duration::from_secs(2) {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                quiet_since = Instant::now();
                let hit = m
                    .payload()
                    .is_some_and(|p| p.windows(needle.len()).any(|w| w == needle.as_bytes()));
                if hit {
                    found.push(format!("{topic}[{}]@{}", m.partition(), m.offset()));
                }
            }
        }
    }
    found
}

/// The server_msg_ids (26 hex digits) named in `text`.
pub fn ids_in(text: &str) -> Vec<String> {
    let mut ids: Vec<String> = text
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| w.len() == 26 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .map(str::to_string)
        .collect();
    ids.sort();
    ids.dedup();
    ids
}
