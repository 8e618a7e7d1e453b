//! `imflow-bench`: load tests against a running imflow server.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use imflow_bench::relay;
use imflow_bench::report::{Comparison, Report};
use imflow_bench::scenario::{self, Load, Search, Target};

// The server's allocator: the relay baseline and the load generator get
// the same footing as the server they are compared with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "imflow-bench",
    version,
    about = "Open-loop load generator for imflow (PROTOCOL.md over real sockets)"
)]
struct Cli {
    /// REST base URL.
    #[arg(long, default_value = "http://127.0.0.1:10002", global = true)]
    api: String,
    /// WebSocket URL.
    #[arg(long, default_value = "ws://127.0.0.1:10001/ws", global = true)]
    ws: String,
    /// Admin secret of the server.
    #[arg(
        long,
        env = "IMFLOW_ADMIN_SECRET",
        default_value = "imflow-admin-secret",
        global = true
    )]
    admin_secret: String,
    /// Server process id, to report its memory and CPU.
    #[arg(long, global = true)]
    server_pid: Option<u32>,
    /// Write the JSON report (and an SVG plot beside it, same name).
    #[arg(long, global = true)]
    report: Option<PathBuf>,
    /// No progress lines.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Exit non-zero if anything was lost, duplicated or failed.
    #[arg(long, global = true)]
    strict: bool,
    /// First run the same scenario against an ideal relay this program
    /// starts (same frames, no auth, no storage), then against the server;
    /// report both and the server's figures as multiples of the relay's.
    #[arg(long, global = true)]
    baseline: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Args, Clone, Copy)]
struct LoadArgs {
    /// Messages per second (open loop).
    #[arg(long, default_value_t = 2300.0)]
    rate: f64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Seconds to wait after the last send for acks and deliveries.
    #[arg(long, default_value_t = 10.0)]
    drain: f64,
    /// Raise the rate step by step until p99 crosses --p99-bound-ms or
    /// anything is lost; report the highest rate that held.
    #[arg(long)]
    find_max: bool,
    /// First rate of --find-max (default: --rate).
    #[arg(long)]
    start_rate: Option<f64>,
    /// Factor between --find-max steps.
    #[arg(long, default_value_t = 1.25)]
    step: f64,
    #[arg(long, default_value_t = 100.0)]
    p99_bound_ms: f64,
    #[arg(long, default_value_t = 20)]
    max_steps: u32,
}

#[derive(Subcommand, Clone)]
enum Scenario {
    /// Pairs of online users chatting (the seed's test 1: 10k online, 2300 msg/s).
    Single {
        #[arg(long, default_value_t = 10_000)]
        clients: usize,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// One group, some members online and sending (the seed's test 2:
    /// 10k members, 1k online, 500 msg/s).
    Group {
        #[arg(long, default_value_t = 10_000)]
        members: usize,
        #[arg(long, default_value_t = 1_000)]
        online: usize,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// One user in many single chats syncing its conversation list
    /// (PROTOCOL v2): latency and size of `GET /conversations`.
    Conversations {
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        /// Requests timed per `limit` (100 and 1000).
        #[arg(long, default_value_t = 50)]
        repeat: usize,
    },
    /// Not a load: a webhook receiver for a pipeline with a `webhook` stage.
    /// Counts messages, checks signatures, measures each message's delay
    /// from its send_time; prints a JSON summary on Ctrl-C.
    ReceiveWebhooks {
        #[arg(long, default_value = "127.0.0.1:8088")]
        listen: std::net::SocketAddr,
        /// The webhook's HMAC key (IMFLOW_WEBHOOK_SECRET); without it
        /// signatures are not checked.
        #[arg(long, env = "IMFLOW_WEBHOOK_SECRET")]
        secret: Option<String>,
    },
    /// Idle connections; reports the server's memory per connection.
    Connections {
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        /// Seconds to hold them before measuring.
        #[arg(long, default_value_t = 5.0)]
        hold: f64,
    },
    /// Not a load: the ideal relay `--baseline` measures against, on its
    /// own (prints `relay api=URL ws=URL` once listening).
    Relay {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen_api: std::net::SocketAddr,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen_ws: std::net::SocketAddr,
    },
}

impl LoadArgs {
    fn load(&self) -> Load {
        Load {
            rate: self.rate,
            duration_secs: self.duration,
            drain_secs: self.drain,
        }
    }
    fn search(&self) -> Option<Search> {
        self.find_max.then(|| Search {
            start_rate: self.start_rate.unwrap_or(self.rate),
            step: self.step.max(1.01),
            p99_bound_ms: self.p99_bound_ms,
            max_steps: self.max_steps.max(1),
        })
    }
}

/// One scenario against `target`.
async fn measure(target: &Target, scenario: &Scenario) -> anyhow::Result<Report> {
    Ok(match scenario.clone() {
        Scenario::Single { clients, load } => {
            scenario::single(target, clients, load.load(), load.search()).await?
        }
        Scenario::Group {
            members,
            online,
            load,
        } => scenario::group(target, members, online, load.load(), load.search()).await?,
        Scenario::Conversations { count, repeat } => {
            scenario::conversation_list(target, count, repeat.max(1)).await?
        }
        Scenario::Connections { count, hold } => scenario::connections(target, count, hold).await?,
        Scenario::ReceiveWebhooks { .. } | Scenario::Relay { .. } => {
            anyhow::bail!("not a load scenario")
        }
    })
}

/// The ideal relay as a child process (so its CPU and memory are its
/// own), stopped when dropped.
struct RelayChild {
    child: std::process::Child,
    api: String,
    ws: String,
}

impl RelayChild {
    fn start() -> anyhow::Result<RelayChild> {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .arg("relay")
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            std::io::BufReader::new(out).read_line(&mut line)?;
        }
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(str::to_string)
        };
        match (field("api="), field("ws=")) {
            (Some(api), Some(ws)) => Ok(RelayChild { child, api, ws }),
            _ => {
                let _ = child.kill();
                anyhow::bail!("the relay did not say where it listens: {line:?}")
            }
        }
    }
}

impl Drop for RelayChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    let target = Target {
        api: cli.api.clone(),
        ws: cli.ws.clone(),
        admin_secret: cli.admin_secret.clone(),
        server_pid: cli.server_pid,
        progress: !cli.quiet,
    };
    match &cli.scenario {
        Scenario::ReceiveWebhooks { listen, secret } => {
            let summary = imflow_bench::webhook::serve(*listen, secret.clone()).await?;
            println!("{}", serde_json::to_string_pretty(&summary)?);
            return Ok(summary.bad_signatures == 0);
        }
        Scenario::Relay {
            listen_api,
            listen_ws,
        } => {
            relay::serve(*listen_api, *listen_ws, |b| {
                println!("relay api=http://{} ws=ws://{}/ws", b.api, b.ws);
            })
            .await?;
            return Ok(true);
        }
        _ => {}
    }
    if cli.baseline && matches!(cli.scenario, Scenario::Conversations { .. }) {
        // The relay has no history and no conversation list to read.
        anyhow::bail!("--baseline: the ideal relay stores nothing, so `conversations` (which reads the conversation list) has nothing to compare against; run it without --baseline");
    }
    let (report, compared) = if cli.baseline {
        let relay = tokio::task::spawn_blocking(RelayChild::start).await??;
        if !cli.quiet {
            eprintln!("baseline: the ideal relay (pid {})", relay.child.id());
        }
        let against = Target {
            api: relay.api.clone(),
            ws: relay.ws.clone(),
            server_pid: Some(relay.child.id()),
            ..target.clone()
        };
        let base = measure(&against, &cli.scenario).await?;
        drop(relay);
        if !cli.quiet {
            eprintln!("imflow: {}", cli.api);
        }
        let report = measure(&target, &cli.scenario).await?;
        let compared = Comparison::new(base, report.clone());
        print!("{}", compared.summary());
        (report, Some(compared))
    } else {
        let report = measure(&target, &cli.scenario).await?;
        print!("{}", report.summary());
        (report, None)
    };
    if let Some(path) = &cli.report {
        match &compared {
            Some(c) => c.write_json(path)?,
            None => report.write_json(path)?,
        }
        let plot = path.with_extension("svg");
        if report.write_plot(&plot)? {
            eprintln!("report: {} (plot: {})", path.display(), plot.display());
        } else {
            eprintln!("report: {}", path.display());
        }
    }
    let clean = report
        .result
        .as_ref()
        .map(|s| s.lost == 0 && s.duplicates == 0 && s.failed == 0)
        .unwrap_or(true)
        && report.steps.iter().all(|s| s.duplicates == 0);
    Ok(clean || !cli.strict)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if matches!(cli.scenario, Scenario::Relay { .. }) {
        // The server's own rule (`imflow --workers`: `IMFLOW_WORKERS`, else
        // one fewer than the CPUs), so the baseline differs from imflow in
        // what it does, not in how its threads are set up.
        let workers = std::env::var("IMFLOW_WORKERS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| (1..=1024).contains(n))
            .unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
            });
        builder.worker_threads(workers);
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("imflow-bench: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("imflow-bench: messages were lost, duplicated or failed");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("imflow-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
