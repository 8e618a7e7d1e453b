//! A client that stops reading must not slow the others down nor make the
//! server hold an unbounded backlog for it: the gateway closes it.

mod common;

use common::{send_frame, Target, TestServer};
use serde_json::json;
use tokio::net::TcpStream;

/// A WebSocket client with a tiny receive buffer that never reads.
async fn silent_client(
    s: &TestServer,
    user: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>> {
    let token = s.token(user, 1).await;
    let addr = s.server.as_ref().unwrap().gateway_addr;
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&addr.into()).unwrap();
    sock.set_nonblocking(true).unwrap();
    let tcp = TcpStream::from_std(sock.into()).unwrap();
    let (ws, _) = tokio_tungstenite::client_async(
        format!("{}?token={token}", s.ws),
        tokio_tungstenite::MaybeTlsStream::Plain(tcp),
    )
    .await
    .unwrap();
    ws
}

#[tokio::test]
async fn a_client_that_never_reads_is_cut_off_and_others_get_everything() {
    // Small enough that the sleeper (1,500 frames of 8 kB, a 4 kB receive
    // buffer) overflows it many times over, large enough for a burst a
    // reading client gets when a Kafka fetch brings hundreds of messages.
    let s = TestServer::start_with(|c| c.websocket.outgoing_queue = 256).await;
    s.register(&["sender", "reader", "sleeper"]).await;
    let t = s.token("sender", 2).await;
    assert_eq!(
        s.create_group(&t, "room", &["reader", "sleeper"]).await,
        201
    );

    let sleeper = silent_client(&s, "sleeper").await;
    let mut sender = s.connect("sender", 1).await;
    let mut reader = s.connect("reader", 1).await;

    let total = 1500;
    let collect = tokio::spawn(async move { reader.pushed_chat(total).await });
    let text = "z".repeat(8000);
    for window in 0..(total / 50) {
        for i in 0..50 {
            let mut f = send_frame(
                Target::Group("room"),
                &format!("m{}", window * 50 + i),
                &text,
            );
            f["rid"] = json!(format!("w{}", window * 50 + i));
            sender.send_json(&f).await;
        }
        for i in 0..50 {
            let ack = sender
                .next_where(|f| f["rid"] == json!(format!("w{}", window * 50 + i)))
                .await;
            assert_eq!(ack["op"], "ack", "{ack}");
        }
    }
    let got = collect.await.unwrap();
    let seqs: Vec<u64> = got.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        // Seq 1 is the "group created" notification (PROTOCOL v2).
        (2..=total as u64 + 1).collect::<Vec<_>>(),
        "the reading client got everything in order"
    );

    // The sleeper finally reads: it finds part of the stream, then the end.
    let mut sleeper = common::Client::from_stream(sleeper);
    let mut seen = 0;
    while let Some(f) = sleeper.read_frame().await {
        if f["op"] == "push" {
            seen += f["messages"].as_array().unwrap().len();
        }
    }
    assert!(
        seen < total,
        "the silent client was disconnected, not buffered for ({seen} of {total})"
    );
    let metrics = s
        .http
        .get(format!("{}/metrics", s.api))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("imflow_gateway_slow_clients_closed_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("imflow_stage_in_total{stage=\"push\"}"),
        "{metrics}"
    );
}
