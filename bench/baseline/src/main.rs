//! ringway-baseline: the conventional design ringway is measured against. A tokio
//! multi-threaded runtime, tokio-tungstenite, a reader and a writer task per connection,
//! and one tokio `broadcast` channel per topic with a forwarding task per subscription.
//! It speaks the part of protocol v1 the load generator uses (welcome, subscribe,
//! unsubscribe, publish, message frames) and the admin API's `POST /v1/publish`, so
//! `ringway-bench` drives it exactly as it drives ringway.
//!
//! Deliberately untuned: this is what a team writes first, and what every ringway
//! benchmark report puts beside its own figures.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

#[derive(Parser, Debug)]
#[command(
    name = "ringway-baseline",
    about = "Conventional tokio WebSocket pub/sub server for side-by-side benchmarks"
)]
struct Args {
    /// WebSocket listener (path /ws).
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// Admin HTTP listener: POST /v1/publish, GET /healthz.
    #[arg(long, default_value = "127.0.0.1:9190")]
    admin: SocketAddr,
    /// Worker threads; 0 = one per CPU (tokio's default).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Messages a topic's channel keeps for a subscriber that falls behind; beyond, the
    /// subscriber skips messages (broadcast "lagged").
    #[arg(long, default_value_t = 1024)]
    channel: usize,
}

struct Hub {
    topics: Mutex<HashMap<String, broadcast::Sender<Utf8Bytes>>>,
    seq: AtomicU64,
    conns: AtomicU64,
    capacity: usize,
}

impl Hub {
    fn sender(&self, topic: &str) -> broadcast::Sender<Utf8Bytes> {
        let mut topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        topics
            .entry(topic.to_owned())
            .or_insert_with(|| broadcast::channel(self.capacity).0)
            .clone()
    }

    /// Frames the message once and hands it to the topic's channel; returns its id.
    fn publish(&self, topic: &str, data: &RawValue) -> String {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let id = format!("{ms}-{}", self.seq.fetch_add(1, Ordering::Relaxed));
        let frame = format!(
            "{{\"type\":\"message\",\"topic\":{},\"id\":\"{id}\",\"data\":{}}}",
            serde_json::to_string(topic).unwrap_or_default(),
            data.get()
        );
        let topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = topics.get(topic) {
            let _ = tx.send(Utf8Bytes::from(frame));
        }
        id
    }
}

#[derive(Deserialize)]
struct Request<'a> {
    op: String,
    #[serde(default)]
    topic: Option<String>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(rename = "ref", borrow, default)]
    reference: Option<&'a RawValue>,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if args.threads > 0 {
        rt.worker_threads(args.threads);
    }
    rt.build()?.block_on(async move {
        let hub = Arc::new(Hub {
            topics: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
            conns: AtomicU64::new(0),
            capacity: args.channel.max(1),
        });
        let ws = TcpListener::bind(args.listen).await?;
        let admin = TcpListener::bind(args.admin).await?;
        eprintln!(
            "ringway-baseline ready listen={} admin={}",
            ws.local_addr()?,
            admin.local_addr()?
        );
        let admin_hub = hub.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = admin.accept().await {
                tokio::spawn(serve_admin(admin_hub.clone(), s));
            }
        });
        loop {
            match ws.accept().await {
                Ok((s, _)) => {
                    tokio::spawn(serve(hub.clone(), s));
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    })
}

async fn serve(hub: Arc<Hub>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let id = hub.conns.fetch_add(1, Ordering::Relaxed);
    let welcome = format!("{{\"type\":\"welcome\",\"conn\":\"{id}\",\"node\":\"baseline\"}}");
    let _ = tx.send(Message::text(welcome));
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.send(m).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let mut subs: HashMap<String, JoinHandle<()>> = HashMap::new();
    while let Some(Ok(msg)) = source.next().await {
        match msg {
            Message::Text(text) => on_request(&hub, &text, &tx, &mut subs),
            Message::Close(_) => break,
            _ => {}
        }
    }
    for (_, task) in subs {
        task.abort();
    }
    drop(tx);
    let _ = writer.await;
}

fn reply(kind: &str, topic: &str, reference: Option<&RawValue>) -> Message {
    let topic = serde_json::to_string(topic).unwrap_or_default();
    Message::text(match reference {
        Some(r) => format!(
            "{{\"type\":\"{kind}\",\"topic\":{topic},\"ref\":{}}}",
            r.get()
        ),
        None => format!("{{\"type\":\"{kind}\",\"topic\":{topic}}}"),
    })
}

fn on_request(
    hub: &Hub,
    text: &str,
    tx: &mpsc::UnboundedSender<Message>,
    subs: &mut HashMap<String, JoinHandle<()>>,
) {
    let Ok(req) = serde_json::from_str::<Request<'_>>(text) else {
        let _ = tx.send(Message::text(
            "{\"type\":\"error\",\"code\":\"bad_json\",\"message\":\"not a request\"}",
        ));
        return;
    };
    let topic = req.topic.unwrap_or_default();
    match req.op.as_str() {
        "subscribe" => {
            if !subs.contains_key(&topic) {
                let mut messages = hub.sender(&topic).subscribe();
                let out = tx.clone();
                let task = tokio::spawn(async move {
                    loop {
                        match messages.recv().await {
                            Ok(frame) => {
                                if out.send(Message::Text(frame)).is_err() {
                                    break;
                                }
                            }
                            Err(broadcast::error::RecvError::Lagged(_)) => continue,
                            Err(broadcast::error::RecvError::Closed) => break,
                        }
                    }
                });
                subs.insert(topic.clone(), task);
            }
            let _ = tx.send(reply("subscribed", &topic, req.reference));
        }
        "unsubscribe" => {
            if let Some(task) = subs.remove(&topic) {
                task.abort();
            }
            let _ = tx.send(reply("unsubscribed", &topic, req.reference));
        }
        "publish" => {
            let id = hub.publish(&topic, req.data.unwrap_or(RawValue::NULL));
            if let Some(r) = req.reference {
                let topic = serde_json::to_string(&topic).unwrap_or_default();
                let _ = tx.send(Message::text(format!(
                    "{{\"type\":\"published\",\"topic\":{topic},\"id\":\"{id}\",\"ref\":{}}}",
                    r.get()
                )));
            }
        }
        _ => {
            let _ = tx.send(Message::text(
                "{\"type\":\"error\",\"code\":\"unknown_op\",\"message\":\"unknown op\"}",
            ));
        }
    }
}

#[derive(Deserialize)]
struct PublishBody<'a> {
    topic: String,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// `POST /v1/publish` and `GET /healthz`, HTTP/1.1 keep-alive.
async fn serve_admin(hub: Arc<Hub>, mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = [0u8; 8192];
    loop {
        let parsed = {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(head)) => {
                    let len = req
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                        .unwrap_or(0usize);
                    Some((head, len, req.path.unwrap_or("").to_owned()))
                }
                Ok(httparse::Status::Partial) => None,
                Err(_) => return,
            }
        };
        if let Some((head, len, path)) = parsed {
            if buf.len() >= head + len {
                let body = &buf[head..head + len];
                let (status, out) = match path.as_str() {
                    "/v1/publish" => match serde_json::from_slice::<PublishBody<'_>>(body) {
                        Ok(p) => (
                            200,
                            format!("{{\"id\":\"{}\"}}", hub.publish(&p.topic, p.data)),
                        ),
                        Err(_) => (400, "{\"error\":\"bad_json\"}".to_owned()),
                    },
                    "/healthz" | "/readyz" => (200, "ok\n".to_owned()),
                    _ => (404, "{\"error\":\"not_found\"}".to_owned()),
                };
                let response = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{out}",
                    out.len()
                );
                if s.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
                buf.drain(..head + len);
                continue;
            }
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}
