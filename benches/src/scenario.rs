//! The scenarios: `single` (the seed's test 1), `group` (test 2),
//! `connections` (idle connection cost), and the `find-max` search.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::{stream, StreamExt};
use serde_json::json;

use crate::conn::{self, Conn, Current};
use crate::procstat;
use crate::report::{Latency, ListStats, Report, ServerStats, Step};
use crate::setup::Rest;
use crate::track::Tracker;

/// Where the server is and how to talk to it.
#[derive(Clone)]
pub struct Target {
    pub api: String,
    pub ws: String,
    pub admin_secret: String,
    pub server_pid: Option<u32>,
    pub progress: bool,
}

#[derive(Clone, Copy, Debug)]
pub struct Load {
    pub rate: f64,
    pub duration_secs: f64,
    pub drain_secs: f64,
}

/// How `find-max` climbs.
#[derive(Clone, Copy, Debug)]
pub struct Search {
    pub start_rate: f64,
    pub step: f64,
    pub p99_bound_ms: f64,
    pub max_steps: u32,
}

struct Fleet {
    conns: Vec<Conn>,
    current: Current,
}

/// Who sends message `i`: `senders[i % len]` = (connection, recipient field, recipient).
struct Plan {
    senders: Vec<(usize, &'static str, String)>,
    expected_per_message: u32,
}

fn say(target: &Target, msg: impl AsRef<str>) {
    if target.progress {
        eprintln!("{}", msg.as_ref());
    }
}

fn ws_addr(ws: &str) -> anyhow::Result<SocketAddr> {
    let rest = ws
        .strip_prefix("ws://")
        .ok_or_else(|| anyhow::anyhow!("--ws must be ws://HOST:PORT/ws"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    use std::net::ToSocketAddrs;
    hostport
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| anyhow::anyhow!("cannot resolve {hostport}"))
}

fn raise_fd_limit(target: &Target) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => say(target, format!("open-file limit: {n}")),
        Err(e) => say(target, format!("could not raise the open-file limit: {e}")),
    }
}

async fn register(target: &Target, prefix: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let rest = Rest::new(&target.api, &target.admin_secret);
    let users: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    let t = Instant::now();
    rest.register(&users).await?;
    say(
        target,
        format!("registered {n} users in {:.1}s", t.elapsed().as_secs_f64()),
    );
    Ok(users)
}

async fn connect_all(
    target: &Target,
    users: &[String],
    tokens: &[String],
) -> anyhow::Result<Fleet> {
    let server = ws_addr(&target.ws)?;
    let current: Current = Arc::new(RwLock::new(None));
    let t = Instant::now();
    let results: Vec<anyhow::Result<Conn>> = stream::iter(users.iter().zip(tokens).enumerate())
        .map(|(i, (u, tok))| {
            let current = current.clone();
            let ws = target.ws.clone();
            async move { conn::open(&ws, server, u, tok, i, current).await }
        })
        .buffered(256)
        .collect()
        .await;
    let conns = results.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    say(
        target,
        format!(
            "opened {} connections in {:.1}s",
            conns.len(),
            t.elapsed().as_secs_f64()
        ),
    );
    Ok(Fleet { conns, current })
}

fn server_snapshot(target: &Target) -> (Option<u64>, Option<f64>) {
    match target.server_pid {
        Some(pid) => (procstat::rss_kib(pid), procstat::cpu_secs(pid)),
        None => (None, None),
    }
}

/// One open-loop run at `load.rate` for `load.duration_secs`.
async fn run_round(target: &Target, fleet: &Fleet, plan: &Plan, round: u32, load: Load) -> Step {
    let total = ((load.rate * load.duration_secs).round() as usize).max(1);
    let tracker = Arc::new(Tracker::new(
        round,
        load.rate,
        total,
        plan.expected_per_message,
        Duration::from_millis(200),
    ));
    if let Ok(mut c) = fleet.current.write() {
        *c = Some(tracker.clone());
    }
    let (rss0, cpu0) = server_snapshot(target);
    let me = std::process::id();
    let my_cpu0 = procstat::cpu_secs(me);
    let wall0 = Instant::now();

    let progress = {
        let t = tracker.clone();
        let show = target.progress;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut last = 0u64;
            loop {
                tick.tick().await;
                if show {
                    let d = t.deliveries.load(Ordering::Relaxed);
                    let h = t.latency();
                    eprintln!(
                        "  t={:>4.0}s acked={} failed={} delivered={} (+{}/s) dup={} p50={:.1}ms p99={:.1}ms",
                        t.t0.elapsed().as_secs_f64(),
                        t.acked.load(Ordering::Relaxed),
                        t.failed.load(Ordering::Relaxed),
                        d,
                        d - last,
                        t.duplicates.load(Ordering::Relaxed),
                        h.value_at_quantile(0.5) as f64 / 1000.0,
                        h.value_at_quantile(0.99) as f64 / 1000.0,
                    );
                    last = d;
                }
            }
        })
    };

    // The schedule: send whatever is due, then sleep until the next is due.
    let mut i = 0;
    let frames: Vec<(usize, String)> = plan
        .senders
        .iter()
        .map(|(c, field, to)| (*c, format!(",\"{field}\":\"{to}\",\"content_type\":101,\"content\":{{\"text\":\"imflow bench\"}}}}")))
        .collect();
    while i < total {
        let now = Instant::now();
        while i < total && tracker.scheduled(i) <= now {
            let (c, tail) = &frames[i % frames.len()];
            let f = format!(
                "{{\"op\":\"send\",\"rid\":\"{round}:{i}\",\"client_msg_id\":\"{round}:{i}\"{tail}"
            );
            if fleet.conns[*c].tx.send(f).is_err() {
                tracker.on_ack(false);
            }
            i += 1;
        }
        if i < total {
            tokio::time::sleep_until(tracker.scheduled(i).into()).await;
        }
    }
    let send_secs = tracker.t0.elapsed().as_secs_f64().max(1e-9);
    // Drain: wait for every ack and delivery, or the drain period.
    let deadline = Instant::now() + Duration::from_secs_f64(load.drain_secs);
    while !tracker.settled() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    progress.abort();
    let (rss1, cpu1) = server_snapshot(target);
    let wall = wall0.elapsed().as_secs_f64();
    let my_cpu1 = procstat::cpu_secs(me);

    let h = tracker.latency();
    let ms = |us: u64| us as f64 / 1000.0;
    let acked = tracker.acked.load(Ordering::Relaxed);
    Step {
        rate_target: load.rate,
        duration_s: load.duration_secs,
        sent: total as u64,
        acked,
        failed: tracker.failed.load(Ordering::Relaxed),
        achieved_rate: acked as f64 / send_secs.max(load.duration_secs),
        expected_deliveries: tracker.expected(),
        delivered: tracker.deliveries.load(Ordering::Relaxed),
        duplicates: tracker.duplicates.load(Ordering::Relaxed),
        lost: tracker.lost(),
        latency_ms: Latency::of_us(&h),
        server: match (rss0, rss1, cpu0, cpu1) {
            (Some(r0), Some(r1), Some(c0), Some(c1)) => Some(ServerStats {
                rss_mib_before: r0 as f64 / 1024.0,
                rss_mib_after: r1 as f64 / 1024.0,
                cpu_percent: 100.0 * (c1 - c0) / wall,
                cpu_secs: c1 - c0,
            }),
            _ => None,
        },
        bench_cpu_percent: match (my_cpu0, my_cpu1) {
            (Some(a), Some(b)) => Some(100.0 * (b - a) / wall),
            _ => None,
        },
        timeline: tracker
            .timeline()
            .into_iter()
            .map(|(s, n, p50, p99, max)| (s, n, ms(p50), ms(p99), ms(max)))
            .collect(),
    }
}

fn held(step: &Step, search: &Search) -> bool {
    step.lost == 0
        && step.failed == 0
        && step.duplicates == 0
        && step.latency_ms.p99 <= search.p99_bound_ms
        && step.achieved_rate >= 0.95 * step.rate_target
}

async fn run_plan(
    target: &Target,
    fleet: &Fleet,
    plan: &Plan,
    load: Load,
    search: Option<Search>,
    scenario: &str,
    mut params: serde_json::Value,
) -> Report {
    let Some(search) = search else {
        say(
            target,
            format!(
                "running {scenario} at {} msg/s for {}s",
                load.rate, load.duration_secs
            ),
        );
        let step = run_round(target, fleet, plan, 1, load).await;
        return Report::single(scenario, params, step);
    };
    params["rate"] = search.start_rate.into();
    params["step"] = search.step.into();
    let mut steps = Vec::new();
    let mut rate = search.start_rate;
    let mut best: Option<f64> = None;
    for round in 1..=search.max_steps {
        say(target, format!("find-max step {round}: {rate:.0} msg/s"));
        let step = run_round(target, fleet, plan, round, Load { rate, ..load }).await;
        let ok = held(&step, &search);
        say(
            target,
            format!(
                "  -> achieved {:.0} msg/s, p99 {:.1} ms, lost {}, dup {}, failed {}: {}",
                step.achieved_rate,
                step.latency_ms.p99,
                step.lost,
                step.duplicates,
                step.failed,
                if ok { "held" } else { "did not hold" }
            ),
        );
        steps.push(step);
        if !ok {
            break;
        }
        best = Some(rate);
        rate *= search.step;
    }
    Report::search(scenario, params, steps, best, search.p99_bound_ms)
}

/// The seed's test 1: `clients` online in pairs, each pair chatting.
pub async fn single(
    target: &Target,
    clients: usize,
    load: Load,
    search: Option<Search>,
) -> anyhow::Result<Report> {
    anyhow::ensure!(
        clients >= 2 && clients % 2 == 0,
        "--clients must be an even number ≥ 2"
    );
    raise_fd_limit(target);
    let run = std::process::id();
    let users = register(target, &format!("s{run}-"), clients).await?;
    let tokens = Rest::new(&target.api, &target.admin_secret)
        .tokens(&users, 1)
        .await?;
    let fleet = connect_all(target, &users, &tokens).await?;
    let senders = (0..clients)
        .map(|c| (c, "recv_id", users[c ^ 1].clone()))
        .collect();
    let plan = Plan {
        senders,
        expected_per_message: 1,
    };
    let params = json!({"clients": clients, "rate": load.rate, "duration_s": load.duration_secs});
    Ok(run_plan(target, &fleet, &plan, load, search, "single", params).await)
}

/// The seed's test 2: one group of `members`, `online` of them connected and
/// sending in turn.
pub async fn group(
    target: &Target,
    members: usize,
    online: usize,
    load: Load,
    search: Option<Search>,
) -> anyhow::Result<Report> {
    anyhow::ensure!(
        online >= 2 && online <= members,
        "need 2 ≤ --online ≤ --members"
    );
    raise_fd_limit(target);
    let run = std::process::id();
    let users = register(target, &format!("m{run}-"), members).await?;
    let rest = Rest::new(&target.api, &target.admin_secret);
    let tokens = rest.tokens(&users[..online], 1).await?;
    let group_id = format!("bench{run}");
    let t = Instant::now();
    rest.group(&tokens[0], &group_id, &users[1..]).await?;
    say(
        target,
        format!(
            "group {group_id} of {members} created in {:.1}s",
            t.elapsed().as_secs_f64()
        ),
    );
    let fleet = connect_all(target, &users[..online], &tokens).await?;
    let senders = (0..online)
        .map(|c| (c, "group_id", group_id.clone()))
        .collect();
    let plan = Plan {
        senders,
        expected_per_message: (online - 1) as u32,
    };
    let params = json!({"members": members, "online": online, "rate": load.rate, "duration_s": load.duration_secs});
    Ok(run_plan(target, &fleet, &plan, load, search, "group", params).await)
}

/// `count` idle connections; reports the server's memory per connection.
pub async fn connections(target: &Target, count: usize, hold_secs: f64) -> anyhow::Result<Report> {
    raise_fd_limit(target);
    let run = std::process::id();
    let users = register(target, &format!("c{run}-"), count).await?;
    let tokens = Rest::new(&target.api, &target.admin_secret)
        .tokens(&users, 1)
        .await?;
    let (rss0, _) = server_snapshot(target);
    let fleet = connect_all(target, &users, &tokens).await?;
    tokio::time::sleep(Duration::from_secs_f64(hold_secs)).await;
    let (rss1, _) = server_snapshot(target);
    let per_conn = match (rss0, rss1) {
        (Some(a), Some(b)) => Some((b.saturating_sub(a)) as f64 * 1024.0 / count as f64),
        _ => None,
    };
    if let Some(p) = per_conn {
        say(
            target,
            format!(
                "server RSS {:.1} MiB -> {:.1} MiB: {:.0} bytes per connection",
                rss0.unwrap_or(0) as f64 / 1024.0,
                rss1.unwrap_or(0) as f64 / 1024.0,
                p
            ),
        );
    }
    drop(fleet);
    Ok(Report::connections(count, rss0, rss1, per_conn))
}

/// One user in `count` single chats (one message from each peer), and the
/// conversation list it syncs (PROTOCOL v2): `GET /conversations` with
/// `limit` 100 and 1000, `repeat` times each; latency and reply size.
pub async fn conversation_list(
    target: &Target,
    count: usize,
    repeat: usize,
) -> anyhow::Result<Report> {
    let run = std::process::id();
    let me = format!("l{run}-me");
    let peers = register(target, &format!("l{run}-p"), count).await?;
    let rest = Rest::new(&target.api, &target.admin_secret);
    rest.register(std::slice::from_ref(&me)).await?;
    let tokens = rest.tokens(&peers, 3).await?;
    let t = Instant::now();
    let sent: Vec<()> = stream::iter(tokens.iter().enumerate())
        .map(|(i, token)| {
            let (rest, me) = (&rest, &me);
            async move {
                let body = json!({"client_msg_id": format!("l{i}"), "recv_id": me,
                    "content_type": 101, "content": {"text": format!("hello from peer {i}")}});
                let r = rest
                    .http
                    .post(format!("{}/msg/send", rest.base))
                    .bearer_auth(token)
                    .json(&body)
                    .send()
                    .await?;
                anyhow::ensure!(r.status().is_success(), "send: {}", r.status());
                Ok(())
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<anyhow::Result<()>>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    say(
        target,
        format!(
            "{} conversations written in {:.1}s",
            sent.len(),
            t.elapsed().as_secs_f64()
        ),
    );
    let token = rest.tokens(std::slice::from_ref(&me), 5).await?.remove(0);
    let mut stats = Vec::new();
    for limit in [100usize, 1000] {
        let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
        let (mut returned, mut bytes) = (0, 0);
        while (h.len() as usize) < repeat {
            let t = Instant::now();
            let r = rest
                .http
                .get(format!("{}/conversations?limit={limit}", rest.base))
                .bearer_auth(&token)
                .send()
                .await?;
            if r.status().as_u16() == 429 {
                // The per-user REST limit: wait and ask again (not timed).
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            anyhow::ensure!(r.status().is_success(), "sync: {}", r.status());
            let body = r.bytes().await?;
            h.record(t.elapsed().as_micros().max(1) as u64)?;
            bytes = body.len();
            let v: serde_json::Value = serde_json::from_slice(&body)?;
            returned = v["conversations"].as_array().map_or(0, Vec::len);
        }
        say(
            target,
            format!("limit {limit}: {returned} conversations, {bytes} bytes"),
        );
        stats.push(ListStats {
            conversations: count,
            limit,
            requests: repeat,
            returned,
            bytes,
            latency_ms: Latency::of_us(&h),
        });
    }
    Ok(Report::conversation_list(count, repeat, stats))
}
