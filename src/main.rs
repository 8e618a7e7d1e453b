//! `imflow`: serve, validate or draw the pipeline.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use imflow::{load_pipeline, Config, Server};
use tracing_subscriber::EnvFilter;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "imflow",
    version,
    about = "An instant-messaging server built as a declarative dataflow pipeline"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Threads running the server's tasks [default: one fewer than the
    /// CPUs, at least 1].
    #[arg(long, global = true, env = "IMFLOW_WORKERS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    workers: Option<u16>,
}

/// One fewer worker than the CPUs, at least one. The CPU left over is not
/// idle: it is the embedded store's writer thread (busy under load), the
/// kernel's network processing and, on a shared host, the other processes.
/// A worker that finds its peers busy steals their tasks and is woken for
/// each burst: on 2 CPUs, one worker instead of two took about a fifth off
/// the server's CPU at the seed's rate (benches/README.md, "Worker
/// threads", has the runs and the trade at the highest rate).
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
}

#[derive(Subcommand)]
enum Command {
    /// Run the standalone server (the default command).
    Serve(ServeArgs),
    /// Check a pipeline file: exit 0 with a summary, or 1 with every error.
    Validate {
        /// The pipeline file.
        #[arg(default_value = "pipeline.yaml")]
        file: PathBuf,
    },
    /// Print the pipeline as a Graphviz DOT graph (`imflow graph | dot -Tsvg`),
    /// process groups as clusters.
    Graph {
        #[arg(default_value = "pipeline.yaml")]
        file: PathBuf,
    },
    /// List the processes a host runs: `PROCESS INDEX PORT` per line.
    Plan(PlanArgs),
    /// Report each process of a host (pid, port, up or down); exit 1 if any is down.
    Check(CheckArgs),
    /// Run a command, restarting it whenever it dies, until SIGTERM/SIGINT
    /// (forwarded to it). Used by script/start_all.sh.
    Supervise(imflow::supervise::SuperviseArgs),
    /// Print the nginx config for the cluster: TLS on the seed's ports,
    /// upstreams of every host's gateway and API.
    Nginx(imflow::nginx::NginxArgs),
    /// Every stage's rates, errors, queue and latency, per process and
    /// summed, refreshed every second (`--once --json` for scripts).
    Top(imflow::top::TopArgs),
    /// Follow one conversation's messages through every stage of every
    /// process, with the time spent between them.
    Tap(imflow::tap::TapArgs),
    /// Re-read the config and pipeline.yaml in the running server (every
    /// process of a cluster, one at a time): changed stages are rebuilt,
    /// added ones start, removed ones drain; an invalid file is refused
    /// with every error. The same as `kill -HUP`.
    Reload(imflow::reload::ReloadArgs),
    /// Run pipeline tests written in YAML (a stage or a chain of stages,
    /// the items in, the items and acks out); exit 1 with diffs if any fail.
    Test(imflow::pipetest::TestArgs),
    /// Print a token for USER from the running server (with the
    /// configured admin secret; the shipped one is refused).
    Token(imflow::token::TokenArgs),
}

#[derive(clap::Args)]
struct PlanArgs {
    #[arg(long, short, default_value = "config/config.yaml")]
    config: PathBuf,
    /// This host's address (one of the config's `hosts`).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Also refuse what every cluster process would refuse at start (the
    /// shipped admin secret, a missing cluster secret): start_all.sh plans
    /// with it, so such a config stops it at once, not after its wait.
    #[arg(long)]
    strict: bool,
}

#[derive(clap::Args)]
struct CheckArgs {
    #[arg(long, short, default_value = "config/config.yaml")]
    config: PathBuf,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Where start_all.sh keeps this host's pid files.
    #[arg(long)]
    run_dir: PathBuf,
    /// Print nothing; only the exit status tells.
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args, Default)]
struct ServeArgs {
    /// Config file; a missing default file means built-in defaults.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override the data directory (also IMFLOW_DATA_DIR).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Override the WebSocket listen address (default 0.0.0.0:10001).
    #[arg(long)]
    gateway_addr: Option<std::net::SocketAddr>,
    /// Override the REST listen address (default 0.0.0.0:10002).
    #[arg(long)]
    api_addr: Option<std::net::SocketAddr>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// Run one process of a cluster: a process group of the pipeline,
    /// `gateway` or `api` (see `imflow plan`). Without it, everything runs
    /// in this one process.
    #[arg(long)]
    process: Option<String>,
    /// Which instance of the process group (0-based).
    #[arg(long, default_value_t = 0, requires = "process")]
    index: u32,
    /// The address this host's processes listen on and announce.
    #[arg(long, requires = "process")]
    host: Option<std::net::IpAddr>,
}

fn init_logs(json: bool) {
    let filter = EnvFilter::try_from_env("IMFLOW_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Kinds hold no resources, so checking a pipeline opens no store.
fn check_pipeline(file: &std::path::Path) -> anyhow::Result<imflow_runtime::CompiledPipeline> {
    load_pipeline(file, true, &imflow_stages::registry())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logs(args.log_json);
    tracing::info!(
        workers = tokio::runtime::Handle::current().metrics().num_workers(),
        "async runtime started"
    );
    let (path, required) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from("config/standalone.yaml"), false),
    };
    let mut cfg = Config::load(&path, required)?;
    cfg.set_overrides(imflow::config::Overrides {
        data_dir: args.data_dir,
        gateway: args.gateway_addr,
        api: args.api_addr,
    });
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    if let Some(process) = args.process {
        cfg.check_cluster_process(&path.display().to_string())?;
        let placement = imflow::process::Placement {
            process,
            index: args.index,
            host: args.host.unwrap_or(std::net::IpAddr::from([127, 0, 0, 1])),
        };
        let server = imflow::process::ProcessServer::start(cfg, placement).await?;
        return until_signalled(server, term, hup).await;
    }
    until_signalled(Server::start(cfg).await?, term, hup).await
}

/// What `serve` runs: the all-in-one server or one cluster process.
trait Serving {
    async fn wait(&mut self) -> anyhow::Result<()>;
    async fn reload(&self) -> imflow_gateways::reload::ReloadReport;
    async fn stop(self) -> anyhow::Result<()>;
}

impl Serving for Server {
    async fn wait(&mut self) -> anyhow::Result<()> {
        Server::wait(self).await
    }
    async fn reload(&self) -> imflow_gateways::reload::ReloadReport {
        Server::reload(self).await
    }
    async fn stop(self) -> anyhow::Result<()> {
        Server::stop(self).await
    }
}

impl Serving for imflow::process::ProcessServer {
    async fn wait(&mut self) -> anyhow::Result<()> {
        Self::wait(self).await
    }
    async fn reload(&self) -> imflow_gateways::reload::ReloadReport {
        Self::reload(self).await
    }
    async fn stop(self) -> anyhow::Result<()> {
        Self::stop(self).await
    }
}

/// Serve until the server fails, or stop gracefully on Ctrl-C or SIGTERM;
/// SIGHUP reloads (the report is logged where the reload runs).
async fn until_signalled(
    mut server: impl Serving,
    mut term: tokio::signal::unix::Signal,
    mut hup: tokio::signal::unix::Signal,
) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            r = server.wait() => return r,
            _ = tokio::signal::ctrl_c() => break tracing::info!("interrupted; shutting down"),
            _ = term.recv() => break tracing::info!("terminated; shutting down"),
            _ = hup.recv() => { server.reload().await; }
        }
    }
    server.stop().await
}

async fn host_plan(
    config: &std::path::Path,
    host: &str,
) -> anyhow::Result<(Config, Vec<imflow::process::Planned>)> {
    let cfg = Config::load(config, true)?;
    let pipeline = load_pipeline(&cfg.pipeline, false, &imflow_stages::registry())?;
    let plan = imflow::process::plan(&cfg, &pipeline, host)?;
    Ok((cfg, plan))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let workers = cli.workers.map_or_else(default_workers, usize::from);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("imflow: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command.unwrap_or(Command::Serve(ServeArgs::default())) {
            Command::Serve(args) => serve(args).await,
            Command::Validate { file } => {
                let p = check_pipeline(&file)?;
                println!("{p}");
                Ok(())
            }
            Command::Graph { file } => {
                let p = check_pipeline(&file)?;
                print!("{}", p.to_dot());
                Ok(())
            }
            Command::Plan(a) => {
                let (cfg, plan) = host_plan(&a.config, &a.host).await?;
                if a.strict {
                    cfg.check_cluster_process(&a.config.display().to_string())?;
                }
                for p in plan {
                    let port = p.port.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
                    println!("{} {} {}", p.process, p.index, port);
                }
                Ok(())
            }
            Command::Check(a) => {
                let (cfg, plan) = host_plan(&a.config, &a.host).await?;
                let down =
                    imflow::supervise::check(&cfg, &plan, &a.host, &a.run_dir, a.quiet).await?;
                if down > 0 {
                    anyhow::bail!("{down} process(es) down on {}", a.host);
                }
                Ok(())
            }
            Command::Supervise(a) => imflow::supervise::run(a).await,
            Command::Top(a) => imflow::top::run(a).await,
            Command::Tap(a) => imflow::tap::run(a).await,
            Command::Token(a) => imflow::token::run(a).await,
            Command::Reload(a) => imflow::reload::run(a).await,
            Command::Test(a) => imflow::pipetest::run(a).await,
            Command::Nginx(a) => {
                let cfg = Config::load(&a.config, true)?;
                print!(
                    "{}",
                    imflow::nginx::render(&cfg, &a.config.display().to_string(), &a)
                );
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("imflow: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
