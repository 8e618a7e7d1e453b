//! Keeping a host's processes up (`imflow supervise`) and reporting on
//! them (`imflow check`, behind script/check_all.sh).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use imflow_gateways::discovery::Discovery;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::process::Planned;
use crate::Config;

#[derive(clap::Args, Debug)]
pub struct SuperviseArgs {
    /// Written with the pid of the running child at every (re)start.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// After SIGTERM, how long the child may take before it is killed.
    #[arg(long, default_value_t = 15)]
    pub stop_timeout_secs: u64,
    /// The command to run, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Run the command until told to stop, restarting it when it dies: at once
/// the first time, then waiting longer (up to 10 s) while it keeps dying
/// young, so a process that cannot start does not spin.
pub async fn run(args: SuperviseArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let (program, rest) = args
        .command
        .split_first()
        .context("nothing to run: give the command after --")?;
    let mut delay = Duration::ZERO;
    let mut restarts = 0u64;
    loop {
        let mut child = tokio::process::Command::new(program)
            .args(rest)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {program}"))?;
        let pid = child.id().unwrap_or(0);
        if let Some(f) = &args.pid_file {
            std::fs::write(f, format!("{pid}\n"))
                .with_context(|| format!("cannot write {}", f.display()))?;
        }
        let started = Instant::now();
        let stop = tokio::select! {
            status = child.wait() => {
                let status = status.context("waiting for the child")?;
                restarts += 1;
                // A run that lasted a while starts the backoff over.
                delay = if started.elapsed() > Duration::from_secs(30) {
                    Duration::ZERO
                } else {
                    (delay * 2).clamp(Duration::from_millis(500), Duration::from_secs(10))
                };
                tracing::warn!(%status, restarts, delay_ms = delay.as_millis() as u64, command = %args.command.join(" "), "process died; restarting");
                false
            }
            _ = term.recv() => true,
            _ = int.recv() => true,
        };
        if stop {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            let waited =
                tokio::time::timeout(Duration::from_secs(args.stop_timeout_secs), child.wait())
                    .await;
            if waited.is_err() {
                tracing::warn!(pid, "child did not stop in time; killing it");
                let _ = child.kill().await;
            }
            if let Some(f) = &args.pid_file {
                let _ = std::fs::remove_file(f);
            }
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
        }
    }
}

fn alive(pid: i32) -> bool {
    pid > 0 && kill(Pid::from_raw(pid), None).is_ok()
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The pid files of a planned process under `run_dir`.
pub fn pid_files(run_dir: &Path, p: &Planned) -> (PathBuf, PathBuf) {
    (
        run_dir.join(format!("{}-{}.pid", p.process, p.index)),
        run_dir.join(format!("{}-{}.child.pid", p.process, p.index)),
    )
}

/// Print one line per planned process and return how many are down. Up
/// means: the child runs, it is announced in etcd, and its /healthz (where
/// it has a port) answers 200.
pub async fn check(
    cfg: &Config,
    plan: &[Planned],
    host: &str,
    run_dir: &Path,
    quiet: bool,
) -> anyhow::Result<usize> {
    let members = match &cfg.etcd {
        Some(e) => match Discovery::connect(&e.etcd_addr, &e.etcd_schema, e.user()).await {
            Ok(d) => d.members().await.map(|(m, _)| m).unwrap_or_default(),
            Err(err) => {
                if !quiet {
                    eprintln!("warning: {err}");
                }
                Vec::new()
            }
        },
        None => Vec::new(),
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap_or_default();
    if !quiet {
        println!(
            "{:<18} {:>5} {:>8} {:>6}  STATUS",
            "PROCESS", "INDEX", "PID", "PORT"
        );
    }
    let mut down = 0;
    for p in plan {
        let (_, child) = pid_files(run_dir, p);
        let pid = read_pid(&child).filter(|p| alive(*p));
        let health_port = match p.process.as_str() {
            "gateway" => Some(cfg.listen.gateway_rpc),
            _ => p.port,
        };
        let announced = members.iter().any(|m| {
            m.role == p.process
                && m.index == p.index
                && m.host == host
                && pid.is_some_and(|pid| m.pid as i32 == pid)
        });
        let healthy = match health_port {
            Some(port) => http
                .get(format!("http://{host}:{port}/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success()),
            None => true,
        };
        let status = match (pid, announced, healthy) {
            (None, _, _) => "down (not running)",
            (Some(_), false, _) => "down (not in etcd)",
            (Some(_), true, false) => "down (/healthz failing)",
            _ => "up",
        };
        if status != "up" {
            down += 1;
        }
        if !quiet {
            println!(
                "{:<18} {:>5} {:>8} {:>6}  {}",
                p.process,
                p.index,
                pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                p.port.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                status
            );
        }
    }
    Ok(down)
}
