//! Microbenchmarks of the hot paths: `cargo bench -p imflow-bench`.
//!
//! frame decode/encode, seq assignment of a batch, fanout of a 10k-member
//! group to 1k online connections, and the embedded store's batch commit.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use imflow_gateways::connections::Connections;
use imflow_runtime::Ack;
use imflow_stages::dedup::{Claim, DedupIndex};
use imflow_stages::model::{
    check_content, new_server_msg_id, SendRequest, Sequenced, Stamped, Target,
};
use imflow_stages::store::{Durability, History, SqliteStore};
use imflow_stages::{Presence, PushItem};

const SEND: &str = r#"{"op":"send","rid":"r17","client_msg_id":"c-000017","recv_id":"bob","content_type":101,"content":{"text":"hello, how are you doing today?"}}"#;

fn stamped(i: usize, conv: usize) -> Stamped {
    Stamped {
        conversation_id: format!("si_u{conv}_v{conv}").into(),
        server_msg_id: new_server_msg_id().into(),
        client_msg_id: format!("c{i}").into(),
        sender: format!("u{conv}").into(),
        target: Target::User(format!("v{conv}").into()),
        content_type: 101,
        content: r#"{"text":"hello, how are you doing today?"}"#.into(),
        send_time: 1_764_230_400_000,
    }
}

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_send", |b| {
        b.iter(|| {
            let req: SendRequest = serde_json::from_str(black_box(SEND)).unwrap();
            check_content(req.content_type, &req.content).unwrap();
            req
        })
    });
    let m = stamped(1, 1);
    g.bench_function("encode_message", |b| {
        b.iter(|| black_box(&m).render(black_box(42)))
    });
    g.finish();
}

fn seq_assign(c: &mut Criterion) {
    let mut g = c.benchmark_group("seq_assign");
    g.throughput(Throughput::Elements(512));
    let mut round = 0usize;
    g.bench_function("batch_of_512_over_100_conversations", |b| {
        let dedup = DedupIndex::new(1_000_000);
        let mut counters: HashMap<Arc<str>, u64> = HashMap::new();
        b.iter_batched(
            || {
                round += 1;
                (0..512)
                    .map(|i| stamped(round * 512 + i, i % 100))
                    .collect::<Vec<_>>()
            },
            |batch| {
                let mut out = Vec::with_capacity(batch.len());
                for m in batch {
                    if let Claim::New = dedup.claim(&m, &mut Ack::none()) {
                        let c = counters.entry(m.conversation_id.clone()).or_insert(0);
                        *c += 1;
                        let body: Arc<str> = m.render(*c).into();
                        dedup.mark_durable(&m);
                        out.push(Sequenced {
                            msg: m,
                            seq: *c,
                            body,
                        });
                    }
                }
                out
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout");
    let members: Vec<Arc<str>> = (0..10_000).map(|i| Arc::from(format!("m{i}"))).collect();
    let conns = Connections::new(1 << 16);
    let mut queues: Vec<_> = members
        .iter()
        .take(1000)
        .map(|u| conns.register(u, 1).1)
        .collect();
    let item = PushItem {
        conversation_id: "sg_big".into(),
        seq: 1,
        body: Arc::from(stamped(1, 1).render(1)),
    };
    g.throughput(Throughput::Elements(members.len() as u64));
    g.bench_function("group_of_10k_with_1k_online", |b| {
        b.iter(|| {
            for u in &members {
                conns.deliver(u, &item);
            }
            for q in queues.iter_mut() {
                while q.try_recv().is_ok() {}
            }
        })
    });
    g.finish();
}

fn store(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = rt
        .block_on(SqliteStore::open(dir.path(), Durability::Normal))
        .unwrap();
    let mut g = c.benchmark_group("store");
    g.throughput(Throughput::Elements(100));
    let mut n = 0usize;
    g.bench_function("commit_100_messages_over_1000_conversations", |b| {
        b.iter_batched(
            || {
                (0..100)
                    .map(|_| {
                        n += 1;
                        let m = stamped(n, n % 1000);
                        let seq = (n / 1000 + 1) as u64;
                        Sequenced {
                            body: m.render(seq).into(),
                            msg: m,
                            seq,
                        }
                    })
                    .collect::<Vec<_>>()
            },
            |batch| rt.block_on(store.commit(batch)).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, frames, seq_assign, fanout, store);
criterion_main!(benches);
