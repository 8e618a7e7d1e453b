//! `imflow nginx`: the nginx config in front of a cluster, rendered from the
//! cluster config, so the upstreams always match the `hosts` section.
//!
//! TLS ends at nginx (wss on the gateway port, https on the API port, as in
//! the seed); behind it the doors speak plain ws/http. WebSocket upgrades
//! are passed through with long read timeouts (a quiet client is not a dead
//! one; the gateway's own heartbeat decides that).

use std::fmt::Write;
use std::path::PathBuf;

use crate::Config;

#[derive(clap::Args, Debug, Clone)]
pub struct NginxArgs {
    /// The cluster config whose `hosts` become the upstreams.
    #[arg(long, short, default_value = "config/config.yaml")]
    pub config: PathBuf,
    /// Address nginx listens on.
    #[arg(long, default_value = "0.0.0.0")]
    pub listen_addr: String,
    /// Port of wss (the seed's 10001).
    #[arg(long, default_value_t = 10001)]
    pub ws_port: u16,
    /// Port of https (the seed's 10002).
    #[arg(long, default_value_t = 10002)]
    pub api_port: u16,
    /// TLS certificate (PEM, full chain).
    #[arg(long, default_value = "/etc/nginx/imflow/cert.pem")]
    pub cert: PathBuf,
    /// TLS private key (PEM).
    #[arg(long, default_value = "/etc/nginx/imflow/key.pem")]
    pub key: PathBuf,
}

/// Render the config. Paths of logs, pid and temp files are relative to
/// nginx's prefix (`nginx -p PREFIX -c FILE`), so one rendering runs both
/// as a system service and unprivileged in a directory.
pub fn render(cfg: &Config, file: &str, a: &NginxArgs) -> String {
    let hosts: Vec<String> = if cfg.hosts.is_empty() {
        vec!["127.0.0.1".into()]
    } else {
        cfg.hosts.iter().map(|h| h.addr.clone()).collect()
    };
    let runs = |process: &str, host: &str| {
        cfg.hosts
            .iter()
            .find(|h| h.addr == host)
            .and_then(|h| h.processes.as_ref())
            .is_none_or(|p| p.iter().any(|n| n == process))
    };
    let upstream = |name: &str, process: &str, port: u16, keepalive: bool| {
        let mut s = format!("    upstream {name} {{\n        least_conn;\n");
        for h in hosts.iter().filter(|h| runs(process, h)) {
            let _ = writeln!(s, "        server {h}:{port} max_fails=3 fail_timeout=10s;");
        }
        if keepalive {
            s.push_str("        keepalive 64;\n");
        }
        s.push_str("    }\n");
        s
    };
    let tls = format!(
        "        ssl_certificate {};\n        ssl_certificate_key {};\n        ssl_protocols TLSv1.2 TLSv1.3;\n        ssl_session_cache shared:imflow:10m;\n",
        a.cert.display(),
        a.key.display()
    );
    let proxy_common = "            proxy_set_header Host $host;\n            proxy_set_header X-Real-IP $remote_addr;\n            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n            proxy_set_header X-Forwarded-Proto $scheme;\n            proxy_connect_timeout 5s;\n";
    format!(
        "# Rendered by `imflow nginx --config {file}`; render again after editing
# the config's hosts instead of editing this file.
# Run: nginx -p PREFIX -c THIS_FILE (add -g 'daemon off;' in the foreground).
worker_processes auto;
pid nginx.pid;
error_log logs/error.log warn;

events {{
    worker_connections 65535;
}}

http {{
    access_log logs/access.log;
    client_body_temp_path temp/client;
    proxy_temp_path temp/proxy;
    fastcgi_temp_path temp/fastcgi;
    uwsgi_temp_path temp/uwsgi;
    scgi_temp_path temp/scgi;

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}

{ws_up}
{api_up}
    # wss://HOST:{ws_port}/ws -> the gateways (WebSocket, 10001 behind)
    server {{
        listen {addr}:{ws_port} ssl;
{tls}
        location / {{
            proxy_pass http://imflow_gateway;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
{proxy_common}            # Long-lived connections: a quiet client is not a dead one.
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_buffering off;
        }}
    }}

    # https://HOST:{api_port}/ -> the REST APIs
    server {{
        listen {addr}:{api_port} ssl;
{tls}
        client_max_body_size 2m;
        location / {{
            proxy_pass http://imflow_api;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
{proxy_common}            proxy_read_timeout 60s;
        }}
    }}
}}
",
        ws_up = upstream(
            "imflow_gateway",
            "gateway",
            cfg.listen.gateway.port(),
            false
        ),
        api_up = upstream("imflow_api", "api", cfg.listen.api.port(), true),
        addr = a.listen_addr,
        ws_port = a.ws_port,
        api_port = a.api_port,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HostConfig;

    #[test]
    fn upstreams_follow_the_hosts_and_their_subsets() {
        let cfg = Config {
            hosts: vec![
                HostConfig {
                    addr: "10.0.0.1".into(),
                    private_addr: None,
                    processes: None,
                },
                HostConfig {
                    addr: "10.0.0.2".into(),
                    private_addr: None,
                    processes: Some(vec!["api".into(), "im_msg".into()]),
                },
            ],
            ..Default::default()
        };
        let args = NginxArgs {
            config: "c.yaml".into(),
            listen_addr: "0.0.0.0".into(),
            ws_port: 10001,
            api_port: 10002,
            cert: "/c.pem".into(),
            key: "/k.pem".into(),
        };
        let text = render(&cfg, "c.yaml", &args);
        let gw = &text[text.find("upstream imflow_gateway").unwrap()..];
        let gw = &gw[..gw.find('}').unwrap()];
        assert!(gw.contains("server 10.0.0.1:10001"));
        assert!(!gw.contains("10.0.0.2"), "host 2 runs no gateway");
        let api = &text[text.find("upstream imflow_api").unwrap()..];
        let api = &api[..api.find('}').unwrap()];
        assert!(api.contains("server 10.0.0.1:10002") && api.contains("server 10.0.0.2:10002"));
        assert!(text.contains("listen 0.0.0.0:10001 ssl;"));
        assert!(text.contains("proxy_set_header Upgrade $http_upgrade;"));
        assert!(text.contains("ssl_certificate /c.pem;"));
    }
}
