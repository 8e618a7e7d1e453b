//! `imflow top`: every stage of the pipeline with its rates, errors, queue
//! and latency, per process and summed, refreshed every second. It reads
//! the processes' own `/metrics`: those etcd lists for a cluster (their
//! internal ports, with the cluster secret), or the local server's API.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(clap::Args)]
pub struct TopArgs {
    /// Config file: its `etcd` finds a cluster's processes; without one,
    /// the local server at `listen.api` is read. Default: the cluster of
    /// config/config.yaml if its etcd lists processes, else the standalone
    /// server of config/standalone.yaml.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Read these metrics URLs instead (e.g. http://127.0.0.1:10002/metrics).
    #[arg(long)]
    pub url: Vec<String>,
    /// Seconds between two readings.
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    /// Print one reading (two scrapes `interval` apart) and exit.
    #[arg(long)]
    pub once: bool,
    /// With --once: JSON instead of a table.
    #[arg(long, requires = "once")]
    pub json: bool,
    /// With --once: the live screen as text, COLSxROWS (e.g. 100x24).
    #[arg(long, requires = "once", conflicts_with = "json", value_parser = parse_size)]
    pub screen: Option<(u16, u16)>,
}

fn parse_size(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("`{s}`: give COLSxROWS, e.g. 100x24");
    let (w, h) = s.split_once('x').ok_or_else(bad)?;
    let (w, h) = (w.parse().map_err(|_| bad())?, h.parse().map_err(|_| bad())?);
    if w < 40 || h < 10 {
        return Err(format!("`{s}`: at least 40x10"));
    }
    Ok((w, h))
}

/// One process to read.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) name: String,
    pub(crate) url: String,
    /// The header that lets us in, if one is needed.
    pub(crate) secret: Option<(&'static str, String)>,
    /// The process reading itself (the console of a standalone server):
    /// its metrics rendered in place instead of fetched from `url`.
    pub(crate) local: Option<std::sync::Arc<dyn Fn() -> String + Send + Sync>>,
}

impl From<crate::targets::Process> for Target {
    fn from(p: crate::targets::Process) -> Target {
        Target {
            url: format!("{}/metrics", p.base),
            name: p.name,
            secret: p.secret,
            local: None,
        }
    }
}

/// A process's metrics at one moment.
pub(crate) struct Scrape {
    at: Instant,
    samples: Vec<prometheus_parse::Sample>,
}

/// What `top` shows of one stage (in one process, or summed).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct StageFigures {
    pub stage: String,
    pub in_per_sec: f64,
    pub out_per_sec: f64,
    pub errors_per_sec: f64,
    pub in_total: f64,
    pub out_total: f64,
    pub errors_total: f64,
    /// Items waiting in the stage's in-memory input queues.
    pub queued: f64,
    /// Items read from Kafka, not yet committed (in flight through it).
    pub uncommitted: f64,
    /// The stage's own latency metric (a commit, a POST), when it has one.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcessFigures {
    pub process: String,
    pub url: String,
    pub up: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Of one core.
    pub cpu_percent: f64,
    pub memory_bytes: f64,
    pub stages: Vec<StageFigures>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Reading {
    pub at_ms: i64,
    pub interval_secs: f64,
    pub processes: Vec<ProcessFigures>,
    /// Every stage summed over the processes that run it (latency: the
    /// worst process's).
    pub stages: Vec<StageFigures>,
}

pub async fn run(args: TopArgs) -> anyhow::Result<()> {
    let interval = Duration::from_secs_f64(args.interval.clamp(0.1, 3600.0));
    let targets = targets(&args).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    if args.once {
        let first = scrape_all(&http, &targets).await;
        tokio::time::sleep(interval).await;
        let second = scrape_all(&http, &targets).await;
        let reading = read(&targets, &first, &second, interval);
        if args.json {
            println!("{}", serde_json::to_string_pretty(&reading)?);
        } else if let Some((w, h)) = args.screen {
            print!("{}", screen(&reading, w, h)?);
        } else {
            print!("{}", table(&reading));
        }
        return Ok(());
    }
    tui(http, targets, interval).await
}

async fn targets(args: &TopArgs) -> anyhow::Result<Vec<Target>> {
    if !args.url.is_empty() {
        return Ok(args
            .url
            .iter()
            .map(|u| Target {
                name: u.clone(),
                url: u.clone(),
                secret: None,
                local: None,
            })
            .collect());
    }
    Ok(crate::targets::processes(args.config.as_deref())
        .await?
        .into_iter()
        .map(Target::from)
        .collect())
}

async fn scrape(http: &reqwest::Client, t: &Target) -> Result<Scrape, String> {
    let text = match &t.local {
        Some(render) => render(),
        None => fetch(http, t).await?,
    };
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let parsed = prometheus_parse::Scrape::parse(lines).map_err(|e| e.to_string())?;
    Ok(Scrape {
        at: Instant::now(),
        samples: parsed.samples,
    })
}

async fn fetch(http: &reqwest::Client, t: &Target) -> Result<String, String> {
    let mut request = http.get(&t.url);
    if let Some((header, value)) = &t.secret {
        request = request.header(*header, value);
    }
    let response = request.send().await.map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("HTTP {}", response.status()));
    }
    response.text().await.map_err(|e| e.to_string())
}

pub(crate) async fn scrape_all(
    http: &reqwest::Client,
    targets: &[Target],
) -> Vec<Result<Scrape, String>> {
    futures::future::join_all(targets.iter().map(|t| scrape(http, t))).await
}

/// The value of a counter or gauge sample.
fn value(s: &prometheus_parse::Sample) -> Option<f64> {
    match s.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => Some(v),
        _ => None,
    }
}

/// Sum of `metric` over the samples whose labels pass `keep`, by stage.
fn by_stage(
    samples: &[prometheus_parse::Sample],
    metric: &str,
    stage_of: impl Fn(&prometheus_parse::Sample) -> Option<String>,
) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for s in samples.iter().filter(|s| s.metric == metric) {
        if let (Some(stage), Some(v)) = (stage_of(s), value(s)) {
            *out.entry(stage).or_insert(0.0) += v;
        }
    }
    out
}

fn stage_label(s: &prometheus_parse::Sample) -> Option<String> {
    s.labels.get("stage").map(str::to_string)
}

/// The stage an edge's queue feeds (`edge="from->to"`).
fn edge_target(s: &prometheus_parse::Sample) -> Option<String> {
    s.labels
        .get("edge")
        .and_then(|e| e.rsplit_once("->"))
        .map(|(_, to)| to.to_string())
}

/// A stage's own latency: the quantiles of a `*_seconds` summary labelled
/// with it (the worst series when there are several).
fn latency(samples: &[prometheus_parse::Sample], stage: &str) -> (Option<f64>, Option<f64>) {
    let (mut p50, mut p99): (Option<f64>, Option<f64>) = (None, None);
    for s in samples
        .iter()
        .filter(|s| s.metric.ends_with("_seconds") && s.labels.get("stage") == Some(stage))
    {
        if let prometheus_parse::Value::Summary(qs) = &s.value {
            for q in qs {
                let ms = q.count * 1000.0;
                if ms.is_nan() {
                    continue;
                }
                if (q.quantile - 0.5).abs() < 1e-9 {
                    p50 = Some(p50.map_or(ms, |v: f64| v.max(ms)));
                }
                if (q.quantile - 0.99).abs() < 1e-9 {
                    p99 = Some(p99.map_or(ms, |v: f64| v.max(ms)));
                }
            }
        }
    }
    (p50, p99)
}

fn one(samples: &[prometheus_parse::Sample], metric: &str) -> f64 {
    samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter_map(value)
        .sum()
}

/// The figures of one process from two scrapes.
fn process_figures(t: &Target, before: &Scrape, after: &Scrape) -> ProcessFigures {
    let secs = after.at.duration_since(before.at).as_secs_f64().max(1e-3);
    let totals = |scrape: &Scrape, metric: &str| by_stage(&scrape.samples, metric, stage_label);
    let (in0, in1) = (
        totals(before, "imflow_stage_in_total"),
        totals(after, "imflow_stage_in_total"),
    );
    let (out0, out1) = (
        totals(before, "imflow_stage_out_total"),
        totals(after, "imflow_stage_out_total"),
    );
    let (err0, err1) = (
        totals(before, "imflow_stage_errors_total"),
        totals(after, "imflow_stage_errors_total"),
    );
    let queued = by_stage(&after.samples, "imflow_edge_queue_depth", edge_target);
    let uncommitted = totals(after, "imflow_kafka_uncommitted");
    let mut names: Vec<&String> = in1.keys().chain(out1.keys()).chain(err1.keys()).collect();
    names.sort();
    names.dedup();
    let rate = |a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>, n: &str| {
        (b.get(n).copied().unwrap_or(0.0) - a.get(n).copied().unwrap_or(0.0)).max(0.0) / secs
    };
    let stages = names
        .into_iter()
        .map(|n| {
            let (p50_ms, p99_ms) = latency(&after.samples, n);
            StageFigures {
                stage: n.clone(),
                in_per_sec: rate(&in0, &in1, n),
                out_per_sec: rate(&out0, &out1, n),
                errors_per_sec: rate(&err0, &err1, n),
                in_total: in1.get(n).copied().unwrap_or(0.0),
                out_total: out1.get(n).copied().unwrap_or(0.0),
                errors_total: err1.get(n).copied().unwrap_or(0.0),
                queued: queued.get(n).copied().unwrap_or(0.0),
                uncommitted: uncommitted.get(n).copied().unwrap_or(0.0),
                p50_ms,
                p99_ms,
            }
        })
        .collect();
    let cpu = (one(&after.samples, "process_cpu_seconds_total")
        - one(&before.samples, "process_cpu_seconds_total"))
    .max(0.0)
        / secs
        * 100.0;
    ProcessFigures {
        process: t.name.clone(),
        url: t.url.clone(),
        up: true,
        error: None,
        cpu_percent: cpu,
        memory_bytes: one(&after.samples, "process_resident_memory_bytes"),
        stages,
    }
}

pub(crate) fn read(
    targets: &[Target],
    before: &[Result<Scrape, String>],
    after: &[Result<Scrape, String>],
    interval: Duration,
) -> Reading {
    let processes: Vec<ProcessFigures> = targets
        .iter()
        .zip(before.iter().zip(after))
        .map(|(t, pair)| match pair {
            (Ok(b), Ok(a)) => process_figures(t, b, a),
            (Err(e), _) | (_, Err(e)) => ProcessFigures {
                process: t.name.clone(),
                url: t.url.clone(),
                up: false,
                error: Some(e.clone()),
                cpu_percent: 0.0,
                memory_bytes: 0.0,
                stages: Vec::new(),
            },
        })
        .collect();
    Reading {
        at_ms: imflow_stages::model::now_ms(),
        interval_secs: interval.as_secs_f64(),
        stages: summed(&processes),
        processes,
    }
}

fn summed(processes: &[ProcessFigures]) -> Vec<StageFigures> {
    let mut all: BTreeMap<String, StageFigures> = BTreeMap::new();
    for s in processes.iter().flat_map(|p| &p.stages) {
        let sum = all.entry(s.stage.clone()).or_insert_with(|| StageFigures {
            stage: s.stage.clone(),
            ..Default::default()
        });
        sum.in_per_sec += s.in_per_sec;
        sum.out_per_sec += s.out_per_sec;
        sum.errors_per_sec += s.errors_per_sec;
        sum.in_total += s.in_total;
        sum.out_total += s.out_total;
        sum.errors_total += s.errors_total;
        sum.queued += s.queued;
        sum.uncommitted += s.uncommitted;
        let worst = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(x), Some(y)) => Some(x.max(y)),
            (x, y) => x.or(y),
        };
        sum.p50_ms = worst(sum.p50_ms, s.p50_ms);
        sum.p99_ms = worst(sum.p99_ms, s.p99_ms);
    }
    all.into_values().collect()
}

const HEADER: [&str; 8] = [
    "STAGE", "IN/s", "OUT/s", "ERR/s", "QUEUED", "KAFKA", "p50 ms", "p99 ms",
];

fn stage_row(s: &StageFigures) -> [String; 8] {
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    [
        s.stage.clone(),
        format!("{:.0}", s.in_per_sec),
        format!("{:.0}", s.out_per_sec),
        format!("{:.0}", s.errors_per_sec),
        format!("{:.0}", s.queued),
        format!("{:.0}", s.uncommitted),
        ms(s.p50_ms),
        ms(s.p99_ms),
    ]
}

fn process_row(p: &ProcessFigures) -> [String; 4] {
    match &p.error {
        Some(e) => [p.process.clone(), "DOWN".into(), "-".into(), e.clone()],
        None => [
            p.process.clone(),
            format!("{:.0}%", p.cpu_percent),
            format!("{:.0} MiB", p.memory_bytes / 1048576.0),
            p.stages
                .iter()
                .map(|s| s.stage.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        ],
    }
}

/// The reading as plain text (`--once` without `--json`).
fn table(r: &Reading) -> String {
    let mut out = String::new();
    let line = |cells: &[String]| {
        format!(
            "{:<16}{}\n",
            cells[0],
            cells[1..]
                .iter()
                .map(|c| format!("{c:>10}"))
                .collect::<String>()
        )
    };
    out += &line(&HEADER.map(String::from));
    for s in &r.stages {
        out += &line(&stage_row(s));
    }
    out += "\nPROCESS                 CPU     MEMORY  STAGES\n";
    for p in &r.processes {
        let [name, cpu, mem, stages] = process_row(p);
        out += &format!("{name:<22}{cpu:>6}{mem:>11}  {stages}\n");
    }
    out
}

/// One frame of the live screen: the stages summed above, the processes
/// below.
fn draw(frame: &mut ratatui::Frame, reading: Option<&Reading>) {
    use ratatui::layout::{Constraint, Layout};
    use ratatui::style::{Modifier, Style};
    use ratatui::widgets::{Block, Row, Table};

    let [top, bottom] = Layout::vertical([Constraint::Percentage(60), Constraint::Percentage(40)])
        .areas(frame.area());
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let (stages, processes) = match reading {
        Some(r) => (
            r.stages
                .iter()
                .map(|s| Row::new(stage_row(s)))
                .collect::<Vec<_>>(),
            r.processes
                .iter()
                .map(|p| Row::new(process_row(p)))
                .collect::<Vec<_>>(),
        ),
        None => (Vec::new(), Vec::new()),
    };
    let mut widths = vec![Constraint::Length(18)];
    widths.extend([Constraint::Length(10); 7]);
    frame.render_widget(
        Table::new(stages, widths)
            .header(Row::new(HEADER).style(bold))
            .block(Block::bordered().title(" imflow top: stages, summed (q quits) ")),
        top,
    );
    frame.render_widget(
        Table::new(
            processes,
            [
                Constraint::Length(28),
                Constraint::Length(7),
                Constraint::Length(11),
                Constraint::Min(10),
            ],
        )
        .header(Row::new(["PROCESS", "CPU", "MEMORY", "STAGES"]).style(bold))
        .block(Block::bordered().title(" processes ")),
        bottom,
    );
}

/// The live screen of `reading`, `width`×`height`, as text: what a
/// terminal shows, for docs and bug reports (`--once --screen`).
fn screen(reading: &Reading, width: u16, height: u16) -> anyhow::Result<String> {
    let mut terminal = ratatui::Terminal::new(ratatui::backend::TestBackend::new(width, height))?;
    terminal.draw(|frame| draw(frame, Some(reading)))?;
    let buffer = terminal.backend().buffer();
    let mut out = String::new();
    for y in 0..height {
        let line: String = (0..width)
            .map(|x| buffer.cell((x, y)).map_or(" ", |c| c.symbol()))
            .collect();
        out.push_str(line.trim_end());
        out.push('\n');
    }
    Ok(out)
}

/// The live screen: refreshed every `interval`, `q` or Esc quits.
async fn tui(
    http: reqwest::Client,
    targets: Vec<Target>,
    interval: Duration,
) -> anyhow::Result<()> {
    use ratatui::crossterm::event::{self, Event, KeyCode};

    let mut terminal = ratatui::init();
    let mut previous = scrape_all(&http, &targets).await;
    let mut reading: Option<Reading> = None;
    let mut next = Instant::now() + interval;
    let result: anyhow::Result<()> = loop {
        let drawn = terminal.draw(|frame| draw(frame, reading.as_ref()));
        if let Err(e) = drawn {
            break Err(e.into());
        }
        let wait = next.saturating_duration_since(Instant::now());
        let key = tokio::task::block_in_place(|| -> std::io::Result<Option<KeyCode>> {
            if event::poll(wait)? {
                if let Event::Key(k) = event::read()? {
                    return Ok(Some(k.code));
                }
            }
            Ok(None)
        });
        match key {
            Ok(Some(KeyCode::Char('q') | KeyCode::Esc)) => break Ok(()),
            Ok(_) => {}
            Err(e) => break Err(e.into()),
        }
        if Instant::now() >= next {
            let now = scrape_all(&http, &targets).await;
            reading = Some(read(&targets, &previous, &now, interval));
            previous = now;
            next = Instant::now() + interval;
        }
    };
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(text: &str, at: Instant) -> Scrape {
        let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
            .expect("parses");
        Scrape {
            at,
            samples: parsed.samples,
        }
    }

    #[test]
    fn rates_come_from_two_readings_and_queues_from_the_edges_into_a_stage() {
        let t0 = Instant::now();
        let before = scrape(
            "# TYPE imflow_stage_in_total counter\nimflow_stage_in_total{stage=\"seq\"} 100\n\
             # TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 10\n",
            t0,
        );
        let after = scrape(
            "# TYPE imflow_stage_in_total counter\nimflow_stage_in_total{stage=\"seq\"} 300\n\
             # TYPE imflow_stage_out_total counter\nimflow_stage_out_total{stage=\"seq\"} 250\n\
             # TYPE imflow_edge_queue_depth gauge\nimflow_edge_queue_depth{edge=\"ingest->seq\",partition=\"0\"} 3\n\
             imflow_edge_queue_depth{edge=\"ingest->seq\",partition=\"1\"} 4\n\
             imflow_edge_queue_depth{edge=\"seq->history\",partition=\"0\"} 9\n\
             # TYPE imflow_x_seconds summary\nimflow_x_seconds{stage=\"seq\",quantile=\"0.5\"} 0.002\n\
             imflow_x_seconds{stage=\"seq\",quantile=\"0.99\"} 0.010\n\
             # TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 10.5\n",
            t0 + Duration::from_secs(2),
        );
        let target = Target {
            name: "p".into(),
            url: "u".into(),
            secret: None,
            local: None,
        };
        let p = process_figures(&target, &before, &after);
        assert_eq!((p.cpu_percent * 10.0).round(), 250.0);
        let seq = &p.stages[0];
        assert_eq!(seq.stage, "seq");
        assert_eq!((seq.in_per_sec, seq.out_per_sec), (100.0, 125.0));
        assert_eq!((seq.in_total, seq.queued), (300.0, 7.0));
        assert_eq!((seq.p50_ms, seq.p99_ms), (Some(2.0), Some(10.0)));
        let total = summed(&[p.clone(), p]);
        assert_eq!(total[0].in_per_sec, 200.0);
        assert_eq!(total[0].p99_ms, Some(10.0));
    }

    #[test]
    fn the_screen_shows_each_stage_and_process_as_the_terminal_would() {
        let seq = StageFigures {
            stage: "seq".into(),
            in_per_sec: 1234.0,
            out_per_sec: 1234.0,
            ..Default::default()
        };
        let reading = Reading {
            at_ms: 0,
            interval_secs: 1.0,
            processes: vec![ProcessFigures {
                process: "imflow".into(),
                url: "http://127.0.0.1:10002/metrics".into(),
                up: true,
                error: None,
                cpu_percent: 42.0,
                memory_bytes: 80.0 * 1024.0 * 1024.0,
                stages: vec![seq.clone()],
            }],
            stages: vec![seq],
        };
        let text = screen(&reading, 100, 16).expect("drawn");
        assert_eq!(text.lines().count(), 16);
        assert!(text.contains("imflow top: stages, summed"), "{text}");
        let row = text.lines().find(|l| l.contains("seq")).expect("a seq row");
        assert!(row.contains("1234"), "{row}");
        assert!(
            text.lines()
                .any(|l| l.contains("imflow") && l.contains("42%")),
            "{text}"
        );
        assert!(parse_size("10x5").is_err() && parse_size("wide").is_err());
        assert_eq!(parse_size("100x24"), Ok((100, 24)));
    }
}
