//! `imflow tap --conversation ID`: each message of one conversation as it
//! reaches and leaves each stage, in every process, with the time since
//! the message was first seen. Reads `GET /tap` of each process (see
//! `imflow_gateways::tap`); nothing is recorded while nobody taps.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::bail;
use futures::StreamExt;
use serde_json::Value;

#[derive(clap::Args)]
pub struct TapArgs {
    /// The conversation to follow (e.g. si_alice_bob, sg_team).
    #[arg(long)]
    pub conversation: String,
    /// Show only this stage.
    #[arg(long)]
    pub stage: Option<String>,
    /// Config file (see `imflow top --help`: a cluster through etcd, else
    /// the standalone server).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// One JSON line per sighting instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: TapArgs) -> anyhow::Result<()> {
    let processes = crate::targets::processes(args.config.as_deref()).await?;
    let http = reqwest::Client::new();
    let mut streams = Vec::new();
    for p in &processes {
        let mut request = http
            .get(format!("{}/tap", p.base))
            .query(&[("conversation", &args.conversation)]);
        if let Some((header, value)) = &p.secret {
            request = request.header(*header, value);
        }
        let response = match request.send().await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => bail!("{} ({}): HTTP {}", p.name, p.base, r.status()),
            Err(e) => bail!("{} ({}): {e}", p.name, p.base),
        };
        let name = p.name.clone();
        streams.push(
            response
                .bytes_stream()
                .map(move |chunk| (name.clone(), chunk))
                .boxed(),
        );
    }
    eprintln!(
        "tapping {} in {} process(es); Ctrl-C stops",
        args.conversation,
        processes.len()
    );
    let mut all = futures::stream::select_all(streams);
    let mut partial: HashMap<String, Vec<u8>> = HashMap::new();
    let mut first_seen: HashMap<String, i64> = HashMap::new();
    let stdout = std::io::stdout();
    while let Some((process, chunk)) = all.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => bail!("{process}: {e}"),
        };
        let buf = partial.entry(process.clone()).or_default();
        buf.extend_from_slice(&chunk);
        while let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let Ok(ev) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            if args.stage.as_deref().is_some_and(|s| ev["stage"] != s) {
                continue;
            }
            let mut out = stdout.lock();
            if args.json {
                let mut ev = ev;
                ev["process"] = Value::from(process.as_str());
                writeln!(out, "{ev}")?;
            } else {
                writeln!(out, "{}", describe(&process, &ev, &mut first_seen))?;
            }
            out.flush()?;
        }
    }
    Ok(())
}

/// `TIME PROCESS STAGE in|out seq=… msg=… +ms` for one sighting.
fn describe(process: &str, ev: &Value, first_seen: &mut HashMap<String, i64>) -> String {
    let item = &ev["item"];
    let msg = &item["msg"];
    let body: Value = item["body"]
        .as_str()
        .and_then(|b| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    let server_msg_id = [
        &item["server_msg_id"],
        &msg["server_msg_id"],
        &body["server_msg_id"],
    ]
    .into_iter()
    .find_map(|v| v.as_str())
    .unwrap_or("?")
    .to_string();
    let seq = item["seq"]
        .as_u64()
        .map_or("-".to_string(), |s| s.to_string());
    let at = ev["at_us"].as_i64().unwrap_or(0);
    let first = *first_seen.entry(server_msg_id.clone()).or_insert(at);
    let clock = {
        let secs = at / 1_000_000;
        format!(
            "{:02}:{:02}:{:02}.{:03}",
            secs / 3600 % 24,
            secs / 60 % 60,
            secs % 60,
            at / 1000 % 1000
        )
    };
    format!(
        "{clock}  {process:<22} {:<12} {:<3}  seq={seq:<6} msg={server_msg_id}  +{:.3} ms",
        ev["stage"].as_str().unwrap_or("?"),
        ev["event"].as_str().unwrap_or("?"),
        (at - first) as f64 / 1000.0
    )
}
