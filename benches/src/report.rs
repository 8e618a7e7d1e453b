//! The JSON report and the latency-over-time plot.

use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub min: f64,
    pub avg: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerStats {
    pub rss_mib_before: f64,
    pub rss_mib_after: f64,
    /// Of one core: 200 means both cores of a 2-core machine.
    pub cpu_percent: f64,
    /// User plus system CPU time the server spent over the run (drain included).
    pub cpu_secs: f64,
}

/// One run at one rate.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub rate_target: f64,
    pub duration_s: f64,
    pub sent: u64,
    pub acked: u64,
    pub failed: u64,
    pub achieved_rate: f64,
    pub expected_deliveries: u64,
    pub delivered: u64,
    pub duplicates: u64,
    pub lost: u64,
    /// From the scheduled send time to receipt on the recipient's socket.
    pub latency_ms: Latency,
    pub server: Option<ServerStats>,
    pub bench_cpu_percent: Option<f64>,
    /// (second of scheduled send, deliveries, p50 ms, p99 ms, max ms)
    pub timeline: Vec<(usize, u64, f64, f64, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub params: serde_json::Value,
    pub machine: Machine,
    /// The run (or, for find-max, the last step that held).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Step>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<Step>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rate_held: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<ConnStats>,
    /// The conversation-list scenario: one line per `limit`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conversation_list: Vec<ListStats>,
}

/// `GET /conversations` for a user in many conversations, at one `limit`.
#[derive(Debug, Clone, Serialize)]
pub struct ListStats {
    pub conversations: usize,
    pub limit: usize,
    pub requests: usize,
    /// Conversations in one reply.
    pub returned: usize,
    /// Bytes of one reply's body.
    pub bytes: usize,
    pub latency_ms: Latency,
}

/// The same scenario against the ideal relay and against imflow, in one
/// invocation, and imflow's figures as multiples of the relay's.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub baseline: Report,
    pub imflow: Report,
    pub ratios: Ratios,
}

/// imflow ÷ baseline for each figure both runs have. Throughput wants
/// ≥ 1; the others want ≤ 1 (they are costs).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Ratios {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rate_held: Option<Sides>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<Sides>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_us_per_message: Option<Sides>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_us_per_delivery: Option<Sides>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_per_connection: Option<Sides>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sides {
    pub baseline: f64,
    pub imflow: f64,
    pub ratio: f64,
}

impl Sides {
    fn of(baseline: Option<f64>, imflow: Option<f64>) -> Option<Sides> {
        let (b, i) = (baseline?, imflow?);
        (b > 0.0).then(|| Sides {
            baseline: b,
            imflow: i,
            ratio: i / b,
        })
    }
}

impl Step {
    /// Server CPU µs per acked message.
    pub fn cpu_us_per_message(&self) -> Option<f64> {
        let s = self.server.as_ref()?;
        (self.acked > 0).then(|| s.cpu_secs * 1e6 / self.acked as f64)
    }
    /// Server CPU µs per message delivered to a recipient's connection.
    pub fn cpu_us_per_delivery(&self) -> Option<f64> {
        let s = self.server.as_ref()?;
        (self.delivered > 0).then(|| s.cpu_secs * 1e6 / self.delivered as f64)
    }
}

impl Comparison {
    pub fn new(baseline: Report, imflow: Report) -> Comparison {
        let (b, i) = (baseline.result.as_ref(), imflow.result.as_ref());
        let searched = baseline.max_rate_held.is_some() || !baseline.steps.is_empty();
        let ratios = Ratios {
            max_rate_held: searched
                .then(|| {
                    Sides::of(
                        baseline.max_rate_held,
                        Some(imflow.max_rate_held.unwrap_or(0.0)),
                    )
                })
                .flatten(),
            // A find-max's held steps ran at different rates: only a fixed
            // rate's tail compares.
            p99_ms: (!searched)
                .then(|| Sides::of(b.map(|s| s.latency_ms.p99), i.map(|s| s.latency_ms.p99)))
                .flatten(),
            cpu_us_per_message: Sides::of(
                b.and_then(Step::cpu_us_per_message),
                i.and_then(Step::cpu_us_per_message),
            ),
            cpu_us_per_delivery: Sides::of(
                b.and_then(Step::cpu_us_per_delivery),
                i.and_then(Step::cpu_us_per_delivery),
            ),
            bytes_per_connection: Sides::of(
                baseline
                    .connections
                    .as_ref()
                    .and_then(|c| c.bytes_per_connection),
                imflow
                    .connections
                    .as_ref()
                    .and_then(|c| c.bytes_per_connection),
            ),
        };
        Comparison {
            baseline,
            imflow,
            ratios,
        }
    }

    /// Both summaries, then the ratios as a table.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "--- baseline (ideal relay)\n{}--- imflow\n{}--- imflow / baseline\n",
            self.baseline.summary(),
            self.imflow.summary()
        );
        let r = &self.ratios;
        for (name, sides) in [
            ("highest rate held (msg/s)", r.max_rate_held),
            ("p99 latency (ms)", r.p99_ms),
            ("server CPU per message (µs)", r.cpu_us_per_message),
            ("server CPU per delivery (µs)", r.cpu_us_per_delivery),
            ("bytes per idle connection", r.bytes_per_connection),
        ] {
            if let Some(s) = sides {
                out.push_str(&format!(
                    "{name:<30} baseline {:>10.2}  imflow {:>10.2}  ratio {:>6.2}\n",
                    s.baseline, s.imflow, s.ratio
                ));
            }
        }
        out
    }

    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, serde_json::to_string_pretty(self)?)?;
        Ok(())
    }
}

impl Latency {
    /// From a histogram of microseconds.
    pub fn of_us(h: &hdrhistogram::Histogram<u64>) -> Latency {
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            min: ms(h.min()),
            avg: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ConnStats {
    pub count: usize,
    pub server_rss_mib_before: Option<f64>,
    pub server_rss_mib_after: Option<f64>,
    pub bytes_per_connection: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub memory_gib: f64,
}

impl Machine {
    fn here() -> Machine {
        let mem_kib: f64 = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .next()
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0.0);
        Machine {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            memory_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        }
    }
}

impl Report {
    pub fn single(scenario: &str, params: serde_json::Value, step: Step) -> Report {
        Report {
            scenario: scenario.into(),
            params,
            machine: Machine::here(),
            result: Some(step),
            steps: Vec::new(),
            max_rate_held: None,
            connections: None,
            conversation_list: Vec::new(),
        }
    }

    pub fn search(
        scenario: &str,
        mut params: serde_json::Value,
        steps: Vec<Step>,
        best: Option<f64>,
        p99_bound_ms: f64,
    ) -> Report {
        params["find_max_p99_bound_ms"] = p99_bound_ms.into();
        let result = steps
            .iter()
            .rev()
            .find(|s| Some(s.rate_target) == best)
            .cloned();
        Report {
            scenario: format!("{scenario}-find-max"),
            params,
            machine: Machine::here(),
            result,
            steps,
            max_rate_held: best,
            connections: None,
            conversation_list: Vec::new(),
        }
    }

    pub fn connections(
        count: usize,
        rss0: Option<u64>,
        rss1: Option<u64>,
        per_conn: Option<f64>,
    ) -> Report {
        Report {
            scenario: "connections".into(),
            params: serde_json::json!({"count": count}),
            machine: Machine::here(),
            result: None,
            steps: Vec::new(),
            max_rate_held: None,
            connections: Some(ConnStats {
                count,
                server_rss_mib_before: rss0.map(|k| k as f64 / 1024.0),
                server_rss_mib_after: rss1.map(|k| k as f64 / 1024.0),
                bytes_per_connection: per_conn,
            }),
            conversation_list: Vec::new(),
        }
    }

    pub fn conversation_list(count: usize, repeat: usize, stats: Vec<ListStats>) -> Report {
        Report {
            scenario: "conversations".into(),
            params: serde_json::json!({"conversations": count, "repeat": repeat}),
            machine: Machine::here(),
            result: None,
            steps: Vec::new(),
            max_rate_held: None,
            connections: None,
            conversation_list: stats,
        }
    }

    /// A one-paragraph summary for the terminal.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        if let Some(best) = self.max_rate_held {
            out.push_str(&format!("highest rate that held: {best:.0} msg/s\n"));
        }
        if let Some(s) = &self.result {
            out.push_str(&format!(
                "{}: target {:.0} msg/s, achieved {:.0} msg/s; acked {}/{} (failed {}); deliveries {}/{}; lost {}; duplicates {}\n\
                 latency ms: min {:.2} avg {:.2} p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}\n",
                self.scenario, s.rate_target, s.achieved_rate, s.acked, s.sent, s.failed, s.delivered,
                s.expected_deliveries, s.lost, s.duplicates, s.latency_ms.min, s.latency_ms.avg, s.latency_ms.p50,
                s.latency_ms.p90, s.latency_ms.p99, s.latency_ms.p999, s.latency_ms.max
            ));
            if let Some(sv) = &s.server {
                out.push_str(&format!(
                    "server: RSS {:.0} -> {:.0} MiB, CPU {:.0}% of one core; load generator CPU {:.0}%\n",
                    sv.rss_mib_before,
                    sv.rss_mib_after,
                    sv.cpu_percent,
                    s.bench_cpu_percent.unwrap_or(0.0)
                ));
            }
        } else if !self.steps.is_empty() {
            out.push_str("no step held\n");
        }
        for l in &self.conversation_list {
            out.push_str(&format!(
                "GET /conversations?limit={} of {} conversations: {} returned, {} bytes; \
                 latency ms over {}: p50 {:.2} p99 {:.2} max {:.2}\n",
                l.limit,
                l.conversations,
                l.returned,
                l.bytes,
                l.requests,
                l.latency_ms.p50,
                l.latency_ms.p99,
                l.latency_ms.max
            ));
        }
        if let Some(c) = &self.connections {
            out.push_str(&format!(
                "{} idle connections: server RSS {:.1} -> {:.1} MiB, {:.0} bytes per connection\n",
                c.count,
                c.server_rss_mib_before.unwrap_or(0.0),
                c.server_rss_mib_after.unwrap_or(0.0),
                c.bytes_per_connection.unwrap_or(0.0)
            ));
        }
        out
    }

    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, serde_json::to_string_pretty(self)?)?;
        Ok(())
    }

    /// Latency over time (p50, p99, max per second of send time), as SVG.
    /// Returns whether there was anything to plot.
    pub fn write_plot(&self, path: &Path) -> anyhow::Result<bool> {
        let step = self.result.as_ref().or(self.steps.last());
        let Some(step) = step else { return Ok(false) };
        let tl = &step.timeline;
        if tl.is_empty() {
            return Ok(false);
        }
        let xmax = tl.iter().map(|t| t.0).max().unwrap_or(1) as f64 + 1.0;
        let ymax = tl.iter().map(|t| t.4).fold(0.1_f64, f64::max) * 1.5;
        let root = SVGBackend::new(path, (960, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let title = format!(
            "{} at {:.0} msg/s: latency from scheduled send to receipt",
            self.scenario, step.rate_target
        );
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..xmax, (0.01f64..ymax).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("seconds into the run")
            .y_desc("latency (ms, log scale)")
            .draw()?;
        for (label, idx, color) in [("p50", 2usize, BLUE), ("p99", 3, RED), ("max", 4, BLACK)] {
            let pts: Vec<(f64, f64)> = tl
                .iter()
                .map(|t| {
                    let v = match idx {
                        2 => t.2,
                        3 => t.3,
                        _ => t.4,
                    };
                    (t.0 as f64, v.max(0.01))
                })
                .collect();
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()?;
        root.present()?;
        Ok(true)
    }
}
