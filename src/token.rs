//! `imflow token USER`: a token for trying things out, asked of the running
//! server's admin API with the configured admin secret.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::config::{Config, DEFAULT_ADMIN_SECRET};

#[derive(clap::Args)]
pub struct TokenArgs {
    /// The user the token is for.
    pub user: String,
    /// The platform it signs in on (1 to 9: iOS, Android, Windows, macOS,
    /// web, …).
    #[arg(long, default_value_t = 5)]
    pub platform: u8,
    /// Config file: its `admin_secret` (or IMFLOW_ADMIN_SECRET) and
    /// `listen.api`; the standalone server's by default, as `serve`.
    #[arg(long, short, default_value = "config/standalone.yaml")]
    pub config: PathBuf,
    /// The API to ask, when not `listen.api` of the config (e.g. behind
    /// nginx: https://im.example.com).
    #[arg(long)]
    pub api: Option<String>,
    /// Register the user first (an existing user keeps everything).
    #[arg(long)]
    pub register: bool,
}

/// Print the token on stdout, alone, so `ALICE=$(imflow token alice)` works.
pub async fn run(args: TokenArgs) -> anyhow::Result<()> {
    let cfg = Config::load(&args.config, false)?;
    if cfg.admin_secret == DEFAULT_ADMIN_SECRET {
        bail!(
            "{}: admin_secret is the shipped default `{DEFAULT_ADMIN_SECRET}`: tokens are only made with your own; set admin_secret there (or IMFLOW_ADMIN_SECRET) and restart the server with it",
            args.config.display()
        );
    }
    let api = match &args.api {
        Some(a) => a.trim_end_matches('/').to_string(),
        None => {
            let mut addr = cfg.listen.api;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            format!("http://{addr}")
        }
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let admin = |path: &str, body: Value| {
        http.post(format!("{api}{path}"))
            .header("x-admin-secret", &cfg.admin_secret)
            .json(&body)
            .send()
    };
    if args.register {
        let r = admin("/auth/register", json!({"users": [{"user_id": args.user}]}))
            .await
            .with_context(|| format!("cannot reach the API at {api}: is the server running?"))?;
        answer(r).await?;
    }
    let r = admin(
        "/auth/token",
        json!({"user_id": args.user, "platform": args.platform}),
    )
    .await
    .with_context(|| format!("cannot reach the API at {api}: is the server running?"))?;
    let v = answer(r).await?;
    let token = v["token"]
        .as_str()
        .context("the API answered without a token")?;
    println!("{token}");
    Ok(())
}

/// The JSON of a 2xx, or the API's error sentence.
async fn answer(r: reqwest::Response) -> anyhow::Result<Value> {
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let why = v["message"].as_str().unwrap_or("no reason given");
        bail!("the API answered {status}: {why}");
    }
    Ok(v)
}
