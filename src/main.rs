//! `imflow`: serve, validate or draw the pipeline.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use imflow::{kinds_for_checking, load_pipeline, Config, Server};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "imflow",
    version,
    about = "An instant-messaging server built as a declarative dataflow pipeline"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
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
    /// Print the pipeline as a Graphviz DOT graph (`imflow graph | dot -Tsvg`).
    Graph {
        #[arg(default_value = "pipeline.yaml")]
        file: PathBuf,
    },
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

/// Kinds check options without touching their services, so validation
/// needs no store: an empty one in a temporary directory backs them.
async fn check_pipeline(
    file: &std::path::Path,
) -> anyhow::Result<imflow_runtime::CompiledPipeline> {
    let tmp = std::env::temp_dir().join(format!("imflow-validate-{}", std::process::id()));
    let store = imflow_stages::store::SqliteStore::open(&tmp, Default::default()).await?;
    let backends = imflow_stages::Backends::embedded(store, 0);
    let conns = std::sync::Arc::new(imflow_gateways::connections::Connections::new(1));
    let services = imflow_stages::Services::new(backends.clone(), conns);
    let registry = kinds_for_checking(&services);
    let result = load_pipeline(file, true, &registry);
    backends.close().await;
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logs(args.log_json);
    let (path, required) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from("config/standalone.yaml"), false),
    };
    let mut cfg = Config::load(&path, required)?;
    if let Some(d) = args.data_dir {
        cfg.data_dir = d;
    }
    if let Some(a) = args.gateway_addr {
        cfg.listen.gateway = a;
    }
    if let Some(a) = args.api_addr {
        cfg.listen.api = a;
    }
    let mut server = Server::start(cfg).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = server.wait() => return r,
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; shutting down"),
        _ = term.recv() => tracing::info!("terminated; shutting down"),
    }
    server.stop().await
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
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
                let p = check_pipeline(&file).await?;
                println!("{p}");
                Ok(())
            }
            Command::Graph { file } => {
                let p = check_pipeline(&file).await?;
                print!("{}", p.to_dot());
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
