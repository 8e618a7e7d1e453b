//! One client connection of the load generator: a writer fed by a queue and a
//! reader that accounts every frame against the current run's tracker.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::TcpSocket;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::track::Tracker;

/// The run in progress, shared by every reader.
pub type Current = Arc<RwLock<Option<Arc<Tracker>>>>;

pub struct Conn {
    pub user: Arc<str>,
    /// Frames to send. Unbounded on purpose: the schedule must never wait
    /// for the server (open loop); the run's message count bounds it.
    pub tx: mpsc::UnboundedSender<String>,
}

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(borrow)]
    op: &'a str,
    #[serde(default, borrow)]
    rid: Option<&'a str>,
    #[serde(default, borrow)]
    messages: Vec<Pushed<'a>>,
}

#[derive(Deserialize)]
struct Pushed<'a> {
    #[serde(borrow)]
    conversation_id: &'a str,
    seq: u64,
    #[serde(borrow)]
    client_msg_id: &'a str,
    #[serde(borrow)]
    sender: &'a str,
}

/// `"{round}:{index}"` as the load generator writes client_msg_ids and rids.
pub fn parse_id(id: &str) -> Option<(u32, usize)> {
    let (r, i) = id.split_once(':')?;
    Some((r.parse().ok()?, i.parse().ok()?))
}

/// Pick a loopback source address so that more connections than one
/// address's ephemeral ports can be opened to a loopback server.
fn source_for(server: SocketAddr, idx: usize) -> Option<SocketAddr> {
    match server.ip() {
        IpAddr::V4(v4) if v4.is_loopback() => {
            let n = (idx / 20_000) as u8;
            Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(127, 0, 1, 1 + n)),
                0,
            ))
        }
        _ => None,
    }
}

/// A TCP connection to `server`. When the kernel runs out of ports for one
/// source address (TIME_WAIT sockets of earlier runs count), try others.
async fn connect_tcp(server: SocketAddr, idx: usize) -> anyhow::Result<tokio::net::TcpStream> {
    let mut last = None;
    for attempt in 0..8u8 {
        let socket = TcpSocket::new_v4()?;
        let src = match attempt {
            0 => source_for(server, idx),
            n if server.ip().is_loopback() => {
                Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 2, n)), 0))
            }
            _ => None,
        };
        if let Some(src) = src {
            if let Err(e) = socket.bind(src) {
                last = Some(e);
                continue;
            }
        }
        match socket.connect(server).await {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AddrNotAvailable
                ) =>
            {
                last = Some(e)
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(anyhow::anyhow!(
        "connection {idx}: no local address/port left: {}",
        last.map(|e| e.to_string()).unwrap_or_default()
    ))
}

/// Connect as `user` with `token`; `idx` spreads source addresses and
/// histogram shards.
pub async fn open(
    ws_url: &str,
    server: SocketAddr,
    user: &str,
    token: &str,
    idx: usize,
    current: Current,
) -> anyhow::Result<Conn> {
    let tcp = connect_tcp(server, idx).await?;
    tcp.set_nodelay(true)?;
    let config = WebSocketConfig::default()
        .read_buffer_size(8192)
        .write_buffer_size(0);
    let url = format!("{ws_url}?token={token}");
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(config)).await?;
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            if sink.send(Message::text(f)).await.is_err() {
                break;
            }
        }
    });
    let me: Arc<str> = user.into();
    let me2 = me.clone();
    tokio::spawn(async move {
        let mut last_seq: HashMap<String, u64> = HashMap::new();
        while let Some(Ok(msg)) = stream.next().await {
            let Message::Text(text) = msg else { continue };
            let now = Instant::now();
            let Ok(frame) = serde_json::from_str::<Frame<'_>>(text.as_str()) else {
                continue;
            };
            let Some(t) = current.read().ok().and_then(|c| c.clone()) else {
                continue;
            };
            match frame.op {
                "push" => {
                    for m in &frame.messages {
                        let last = last_seq.entry(m.conversation_id.to_string()).or_insert(0);
                        if m.seq <= *last {
                            t.on_duplicate();
                            continue;
                        }
                        *last = m.seq;
                        if m.sender == &*me2 {
                            continue;
                        }
                        if let Some((round, i)) = parse_id(m.client_msg_id) {
                            if round == t.round {
                                t.on_delivery(idx, i, now);
                            }
                        }
                    }
                }
                "ack" | "error" => {
                    if let Some((round, _)) = frame.rid.and_then(parse_id) {
                        if round == t.round {
                            t.on_ack(frame.op == "ack");
                        }
                    }
                }
                _ => {}
            }
        }
    });
    Ok(Conn { user: me, tx })
}
