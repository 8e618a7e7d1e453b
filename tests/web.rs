//! The web pages as people use them, in a real Chromium driven through
//! chromedriver (Debian's `chromium` and `chromium-driver`, installed by
//! script/test.sh): two people chat on `/app` (one at a laptop's width,
//! one at a phone's), one loses the network and catches up, and an
//! operator watches the rates move on `/console` while a load runs.
//!
//! With IMFLOW_UPDATE_SCREENSHOTS=1 the screenshots in docs/ are taken
//! again from this run.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::{Target, TestServer, ADMIN, PATIENCE};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A chromedriver of our own, on a free port, stopped with the test.
struct Driver {
    url: String,
    _child: tokio::process::Child,
}

impl Driver {
    async fn start() -> Driver {
        let binary = std::env::var("IMFLOW_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            l.local_addr().expect("port").port()
        };
        let child = tokio::process::Command::new(&binary)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {binary} ({e}): install Debian's chromium and chromium-driver (script/test.sh does), or set IMFLOW_CHROMEDRIVER")
            });
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + PATIENCE;
        let http = reqwest::Client::new();
        loop {
            if let Ok(r) = http.get(format!("{url}/status")).send().await {
                let v: Value = r.json().await.unwrap_or_default();
                if v["value"]["ready"] == true {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "chromedriver did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Driver { url, _child: child }
    }

    /// A new browser window of `width`×`height` CSS pixels.
    async fn browser(&self, width: u32, height: u32) -> Client {
        let chromium =
            std::env::var("IMFLOW_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--hide-scrollbars", format!("--window-size={width},{height}")],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        });
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        ClientBuilder::native()
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a Chromium session")
    }
}

/// A TCP proxy in front of the gateway: the network between a browser and
/// the server, which the test can cut (open connections drop, new ones
/// are refused) and restore.
struct Proxy {
    addr: SocketAddr,
    target: Arc<OnceLock<SocketAddr>>,
    open: watch::Sender<bool>,
}

impl Proxy {
    async fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let target = Arc::new(OnceLock::<SocketAddr>::new());
        let (open, watching) = watch::channel(true);
        let to = target.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let mut cut = watching.clone();
                if !*cut.borrow() {
                    continue;
                }
                let Some(target) = to.get().copied() else {
                    continue;
                };
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.wait_for(|open| !open) => {}
                    }
                });
            }
        });
        Proxy { addr, target, open }
    }

    fn cut(&self) {
        self.open.send_replace(false);
    }

    fn restore(&self) {
        self.open.send_replace(true);
    }
}

/// Wait until `expr` (JavaScript) is true in the page.
async fn until(c: &Client, what: &str, expr: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let v = c
            .execute(&format!("return Boolean({expr});"), vec![])
            .await
            .expect("script runs");
        if v == true {
            return;
        }
        if Instant::now() > deadline {
            let body = c
                .execute("return document.body.innerText;", vec![])
                .await
                .unwrap_or_default();
            panic!("waited {PATIENCE:?} for {what} ({expr}); the page shows:\n{body}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn js(c: &Client, expr: &str) -> Value {
    c.execute(&format!("return {expr};"), vec![])
        .await
        .expect("script runs")
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("clicking {css}: {e}"));
}

async fn type_in(c: &Client, css: &str, text: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .send_keys(text)
        .await
        .unwrap_or_else(|e| panic!("typing into {css}: {e}"));
}

/// The text of every message shown in the open conversation.
const SHOWN: &str = "[...document.querySelectorAll('#list .msg .bubble')].map(b => b.textContent)";

async fn sign_in(c: &Client, s: &TestServer, user: &str) {
    c.goto(&format!("{}/app", s.api)).await.expect("open /app");
    let token = s.token(user, 5).await;
    type_in(c, "#token", &token).await;
    click(c, "#login-form button").await;
    until(
        c,
        "signed in and online",
        "document.querySelector('#conn.on')",
    )
    .await;
}

async fn screenshot(c: &Client, name: &str) {
    if std::env::var("IMFLOW_UPDATE_SCREENSHOTS").is_err() {
        return;
    }
    let png = c.screenshot().await.expect("screenshot");
    let path = format!("{}/docs/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::write(&path, png).expect("write the screenshot");
}

/// `GET /session/{id}/se/log`: what the page wrote to the browser's
/// console (fantoccini has no call for it).
#[derive(Debug)]
struct BrowserLog;

impl fantoccini::wd::WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base: &url::Url,
        session: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or_default()))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.into()))
    }
}

/// The page's console errors, but for the ones a dropped network causes
/// (a WebSocket that cannot connect while the proxy is cut, a 404 the
/// page asked for on purpose).
async fn console_errors(c: &Client) -> Vec<String> {
    let log = c.issue_cmd(BrowserLog).await.expect("the browser's log");
    log.as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .filter(|e| e["level"] == "SEVERE")
        .filter_map(|e| e["message"].as_str())
        .filter(|m| {
            !m.contains("WebSocket connection to") && !m.contains("Failed to load resource")
        })
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_people_chat_in_a_real_browser_and_the_console_shows_the_load() {
    let proxy = Proxy::start().await;
    let ws_url = format!("ws://{}/ws", proxy.addr);
    let s = TestServer::start_with(|cfg| cfg.web.ws_url = Some(ws_url)).await;
    let gateway =
        s.ws.trim_start_matches("ws://")
            .trim_end_matches("/ws")
            .parse()
            .expect("gateway address");
    proxy.target.set(gateway).expect("set once");
    s.register(&["alice", "bob", "carol"]).await;

    // History to scroll back through: 45 messages from carol.
    let carol = s.token("carol", 1).await;
    for i in 1..=45 {
        let body = json!({"client_msg_id": format!("c{i}"), "recv_id": "alice",
                          "content_type": 101, "content": {"text": format!("carol says {i}")}});
        let (status, v) = s.call("POST", &carol, "/msg/send", Some(body)).await;
        assert_eq!(status, 200, "{v}");
    }

    let driver = Driver::start().await;
    let alice = driver.browser(1280, 800).await;
    let bob = driver.browser(390, 844).await;
    sign_in(&alice, &s, "alice").await;
    sign_in(&bob, &s, "bob").await;

    // The conversation list, with its unread count.
    let carol_conv = "[data-conv='si_alice_carol']";
    until(
        &alice,
        "45 unread from carol",
        &format!("document.querySelector(\"{carol_conv} .badge\")?.textContent === '45'"),
    )
    .await;
    click(&alice, carol_conv).await;
    until(
        &alice,
        "the latest 30 shown",
        "document.querySelectorAll('#list [data-seq]').length === 30",
    )
    .await;
    assert_eq!(
        js(&alice, &format!("{SHOWN}.at(-1)")).await,
        "carol says 45"
    );
    // Scrolling back pulls the rest.
    js(&alice, "document.querySelector('#messages').scrollTop = 0").await;
    until(
        &alice,
        "all 45 shown",
        "document.querySelectorAll('#list [data-seq]').length === 45",
    )
    .await;
    assert_eq!(js(&alice, &format!("{SHOWN}[0]")).await, "carol says 1");
    until(
        &alice,
        "no unread left",
        &format!("!document.querySelector(\"{carol_conv} .badge\")"),
    )
    .await;
    let alice_token = s.token("alice", 1).await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (_, v) = s.call("GET", &alice_token, "/conversations", None).await;
        let conv = v["conversations"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|c| c["conversation_id"] == "si_alice_carol")
                    .cloned()
            })
            .unwrap_or_default();
        if conv["read_seq"] == 45 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the read never reached the server: {conv}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Alice starts a chat with bob; bob (on a phone) sees it arrive.
    type_in(&alice, "#new-peer", "bob").await;
    click(&alice, "#new-chat button").await;
    until(
        &alice,
        "the chat with bob open",
        "document.querySelector('#title').textContent === 'bob'",
    )
    .await;
    type_in(&alice, "#text", "hello bob").await;
    click(&alice, "#composer button").await;
    let bob_conv = "[data-conv='si_alice_bob']";
    until(
        &bob,
        "1 unread from alice",
        &format!("document.querySelector(\"{bob_conv} .badge\")?.textContent === '1'"),
    )
    .await;
    click(&bob, bob_conv).await;
    until(
        &bob,
        "alice's message",
        &format!("{SHOWN}.includes('hello bob')"),
    )
    .await;
    // Typing shows on the other side; the reply arrives live.
    type_in(&bob, "#text", "hi al").await;
    until(
        &alice,
        "bob typing",
        "document.querySelector('#typing').textContent.includes('bob is typing')",
    )
    .await;
    type_in(&bob, "#text", "ice").await;
    click(&bob, "#composer button").await;
    until(
        &alice,
        "bob's reply",
        &format!("{SHOWN}.includes('hi alice')"),
    )
    .await;
    // Bob read alice's message: her side says so.
    until(&alice, "a read receipt", "[...document.querySelectorAll('#list .msg.mine .meta')].some(m => m.textContent.includes('Read'))").await;
    screenshot(&alice, "app.png").await;
    screenshot(&bob, "app-phone.png").await;

    // The network drops. Alice writes anyway (it waits in her page), and
    // her phone (REST) sends one too; bob sees neither until he is back.
    proxy.cut();
    until(
        &bob,
        "bob offline",
        "!document.querySelector('#banner').hidden",
    )
    .await;
    until(
        &alice,
        "alice offline",
        "!document.querySelector('#conn.on')",
    )
    .await;
    type_in(&alice, "#text", "are you there?").await;
    click(&alice, "#composer button").await;
    until(
        &alice,
        "the send waiting",
        "document.querySelector('[data-pending]')?.textContent.includes('waiting')",
    )
    .await;
    let body = json!({"client_msg_id": "phone-1", "recv_id": "bob", "content_type": 101,
                      "content": {"text": "sent from my phone"}});
    let (status, v) = s.call("POST", &alice_token, "/msg/send", Some(body)).await;
    assert_eq!(status, 200, "{v}");
    proxy.restore();
    until(
        &bob,
        "the catch-up",
        &format!("{SHOWN}.includes('sent from my phone') && {SHOWN}.includes('are you there?')"),
    )
    .await;
    until(
        &bob,
        "bob online again",
        "document.querySelector('#banner').hidden",
    )
    .await;
    until(&alice, "the waiting send stored", "!document.querySelector('[data-pending]') && document.querySelectorAll('#list [data-seq]').length === 4").await;
    // Stored once each, in order, however often the page tried.
    let (_, v) = s
        .call(
            "GET",
            &alice_token,
            "/conversations/si_alice_bob/messages?from_seq=1&to_seq=100",
            None,
        )
        .await;
    let texts: Vec<&str> = v["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter_map(|m| m["content"]["text"].as_str())
        .collect();
    assert_eq!(texts.len(), 4, "{texts:?}");
    assert_eq!(&texts[..2], ["hello bob", "hi alice"]);
    assert!(texts.contains(&"are you there?") && texts.contains(&"sent from my phone"));

    // The operator's console: the pipeline of the file, the rates moving.
    let team = json!({"group_id": "team", "name": "The team", "members": ["bob", "carol"]});
    assert_eq!(
        s.call("POST", &alice_token, "/groups", Some(team)).await.0,
        201
    );
    let op = driver.browser(1280, 900).await;
    op.goto(&format!("{}/console", s.api))
        .await
        .expect("open /console");
    type_in(&op, "#secret", "not the secret").await;
    click(&op, "#login-form button").await;
    until(
        &op,
        "a refused secret",
        "document.querySelector('#login-error').textContent.includes('refused')",
    )
    .await;
    op.find(Locator::Css("#secret"))
        .await
        .expect("secret")
        .clear()
        .await
        .expect("clear");
    type_in(&op, "#secret", ADMIN).await;
    click(&op, "#login-form button").await;
    let registry = imflow_stages::registry();
    let text = std::fs::read_to_string(&s.cfg.pipeline).expect("pipeline file");
    let pipeline = imflow_runtime::compile("pipeline.yaml", &text, &registry).expect("compiles");
    let names: Vec<String> = pipeline
        .order
        .iter()
        .map(|&i| pipeline.graph[i].name.clone())
        .collect();
    until(
        &op,
        "the graph drawn",
        &format!(
            "document.querySelectorAll('#graph .node').length === {}",
            names.len()
        ),
    )
    .await;
    for n in &names {
        until(
            &op,
            "every stage of the file",
            &format!("document.querySelector('#graph .node[data-stage=\"{n}\"]')"),
        )
        .await;
    }
    until(
        &op,
        "the process table",
        "document.querySelector('#processes tbody tr .pill.good')",
    )
    .await;
    until(
        &op,
        "a quiet pipeline",
        "document.querySelector('#graph .node[data-stage=\"ingest\"]').dataset.in === '0.0'",
    )
    .await;
    let ingest = format!("{:?}", names[0]);
    let load = tokio::spawn({
        let s_ws = s.ws.clone();
        let api = s.api.clone();
        async move {
            let s = TestServer::attach(
                s_ws.trim_start_matches("ws://").trim_end_matches("/ws"),
                api.trim_start_matches("http://"),
            );
            let mut carol = s.connect("carol", 2).await;
            for i in 0.. {
                carol
                    .send_text(Target::User("alice"), &format!("load-{i}"), "load")
                    .await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    until(
        &op,
        "the rates moving under load",
        &format!(
            "Number(document.querySelector('#graph .node[data-stage={ingest}]').dataset.in) > 0"
        ),
    )
    .await;
    until(
        &op,
        "the edge's rate",
        "[...document.querySelectorAll('#graph .edge')].some(e => Number(e.dataset.rate) > 0)",
    )
    .await;
    screenshot(&op, "console.png").await;
    load.abort();
    until(
        &op,
        "the rates falling back",
        &format!(
            "document.querySelector('#graph .node[data-stage={ingest}]').dataset.in === '0.0'"
        ),
    )
    .await;

    // Looking up a user, then one of their groups.
    type_in(&op, "#lookup-id", "bob").await;
    click(&op, "#lookup-form button").await;
    until(
        &op,
        "bob's card",
        "document.querySelector('[data-user=bob] .presence')?.textContent.startsWith('online')",
    )
    .await;
    click(&op, "[data-user=bob] .groups button").await;
    until(
        &op,
        "the team's card",
        "document.querySelector('[data-group=team] .count')?.textContent === '3'",
    )
    .await;

    for (who, c) in [("alice", &alice), ("bob", &bob), ("the operator", &op)] {
        let errors = console_errors(c).await;
        assert!(errors.is_empty(), "{who}'s page logged errors: {errors:#?}");
    }
    for c in [alice, bob, op] {
        let _ = c.close().await;
    }
}
