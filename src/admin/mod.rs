//! The admin HTTP server (default 127.0.0.1:9090), on its own thread, apart from the
//! shards so that scrapes and publishes never steal a client core's time slice.
//!
//! | endpoint | answer |
//! |---|---|
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200 when every shard listens; 503 while starting or draining |
//! | `GET /metrics` | Prometheus text format (`admin::metrics`) |
//! | `POST /v1/publish` | body `{"topic":"T","data":<JSON>}` → 200 `{"id":"…"}`; 400 bad body; 503 overloaded (nothing delivered, `Retry-After`) or Redis unavailable |
//! | `POST /v1/send` | body `{"user":"U","data":…}` or `{"users":["U",…],"data":…}` → 200 `{"id":"…","online":N,"shards":K}` |
//! | `GET /v1/nodes` | with Redis: the live nodes of the cluster, `{"nodes":[…]}` |
//! | `GET /v1/history?topic=T[&since=ID&epoch=E][&limit=N]` | `{"topic","epoch","messages":[…],"more"}`: the `message` objects after `since`, oldest first (from the topic's Redis stream in a cluster); 410 when some are gone or the epoch changed, 409 for an offset never given out |
//!
//! Publish, send and the node list go through `shard::fanout`: the shards' inboxes on a
//! single node, or Redis through a shard's command connection (one `PUBLISH`, or one
//! `FCALL ringway_send` for any number of users) in a cluster.
//!
//! HTTP/1.1 with keep-alive; request bodies up to [`MAX_BODY`], with `Content-Length`
//! (411 without it on POST, 501 for `Transfer-Encoding`).

pub mod client;
pub mod metrics;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::{TcpListener, TcpStream};
use prometheus_client::registry::Registry;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::backplane::remote::RemoteError;
use crate::broker::{self, Refused};
use crate::config::Config;
use crate::protocol;
use crate::protocol::NotRecovered;
use crate::shard::fanout::{self, FanoutError};
use crate::shard::Node;

/// Largest request body accepted (413 beyond).
pub const MAX_BODY: usize = 1024 * 1024;
const MAX_HEAD: usize = 16 * 1024;

struct Ctx {
    node: Arc<Node>,
    registry: Registry,
}

/// Binds the admin address and serves it on a new thread.
pub fn start(cfg: Arc<Config>, node: Arc<Node>) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let std_listener = std::net::TcpListener::bind(cfg.admin)?;
    let addr = std_listener.local_addr()?;
    // The admin runtime is epoll-based: its listener must not block.
    std_listener.set_nonblocking(true)?;
    let handle = std::thread::Builder::new()
        .name("ringway-admin".into())
        .spawn(move || {
            let mut rt = match monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                .enable_timer()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return tracing::error!(error = %e, "admin runtime failed to start"),
            };
            rt.block_on(async move {
                let listener = match TcpListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => return tracing::error!(error = %e, "admin listener failed"),
                };
                let registry = metrics::registry(node.clone());
                let ctx = Rc::new(Ctx { node, registry });
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => {
                            monoio::spawn(serve_conn(ctx.clone(), stream));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "admin accept failed");
                            monoio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                    }
                }
            });
        })?;
    Ok((addr, handle))
}

/// An HTTP response.
struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
    /// Seconds for a `Retry-After` header (an overloaded node).
    retry_after: Option<u32>,
    /// Ask for a bearer token (`WWW-Authenticate`).
    challenge: bool,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            retry_after: None,
            challenge: false,
        }
    }
    fn json(status: u16, body: String) -> Self {
        Self {
            status,
            content_type: "application/json",
            body,
            retry_after: None,
            challenge: false,
        }
    }
    /// A publish, send or lookup that did not go out. 503 `overloaded` means no shard
    /// took it (retrying is safe, `Retry-After`); 503 `unavailable` means Redis cannot
    /// be reached, or the node is shutting down; 502 means Redis answered outside the schema.
    fn fanout_error(e: &FanoutError) -> Self {
        match e {
            FanoutError::Refused(Refused::Overloaded { .. })
            | FanoutError::Remote(RemoteError::Overloaded(_)) => {
                let mut r = Self::error(503, "overloaded", &e.to_string());
                r.retry_after = Some(1);
                r
            }
            FanoutError::Refused(Refused::Stopped { .. })
            | FanoutError::Remote(RemoteError::Unavailable(_)) => {
                Self::error(503, "unavailable", &e.to_string())
            }
            FanoutError::Remote(RemoteError::BadReply(_)) => {
                Self::error(502, "bad_gateway", &e.to_string())
            }
            FanoutError::History(why @ (NotRecovered::TooOld | NotRecovered::EpochChanged)) => {
                Self::error(410, why.as_str(), &e.to_string())
            }
            FanoutError::History(NotRecovered::Unavailable) => {
                Self::error(503, "unavailable", &e.to_string())
            }
            FanoutError::History(why) => Self::error(409, why.as_str(), &e.to_string()),
        }
    }
    fn error(status: u16, code: &str, message: &str) -> Self {
        let body = serde_json::json!({"error": code, "message": message}).to_string();
        Self::json(status, body)
    }
    fn encode(&self, keep_alive: bool) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            405 => "Method Not Allowed",
            411 => "Length Required",
            413 => "Payload Too Large",
            502 => "Bad Gateway",
            431 => "Request Header Fields Too Large",
            501 => "Not Implemented",
            503 => "Service Unavailable",
            _ => "",
        };
        let conn = if keep_alive { "keep-alive" } else { "close" };
        let mut retry = match self.retry_after {
            Some(secs) => format!("Retry-After: {secs}\r\n"),
            None => String::new(),
        };
        if self.challenge {
            retry.push_str("WWW-Authenticate: Bearer realm=\"ringway admin\"\r\n");
        }
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: {conn}\r\n{retry}\r\n",
            self.status,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        out.extend_from_slice(self.body.as_bytes());
        out
    }
}

async fn serve_conn(ctx: Rc<Ctx>, mut stream: TcpStream) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        // Read until a complete head is there.
        let (head_len, method, path, content_length, keep_alive, authorized) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let header = |name: &str| {
                        req.headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case(name))
                            .map(|h| h.value)
                    };
                    let len = header("content-length")
                        .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<usize>().ok());
                    let close = header("connection")
                        .is_some_and(|v| v.eq_ignore_ascii_case(b"close"))
                        || req.version == Some(0);
                    // Bodies must come with Content-Length; a chunked body read as empty
                    // would leave its bytes to be parsed as the next request.
                    if header("transfer-encoding").is_some() {
                        let refusal = Response::error(
                            501,
                            "not_implemented",
                            "Transfer-Encoding is not supported: send Content-Length",
                        );
                        let _ = stream.write_all(refusal.encode(false)).await;
                        return;
                    }
                    if req.method == Some("POST") && len.is_none() {
                        let refusal =
                            Response::error(411, "length_required", "send Content-Length");
                        let _ = stream.write_all(refusal.encode(false)).await;
                        return;
                    }
                    let authorized = authorized(
                        ctx.node.config().admin_token.as_deref(),
                        header("authorization"),
                    );
                    break (
                        n,
                        req.method.unwrap_or("").to_string(),
                        req.path.unwrap_or("").to_string(),
                        len.unwrap_or(0),
                        !close,
                        authorized,
                    );
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
                Ok(httparse::Status::Partial) => {
                    let _ = stream
                        .write_all(Response::text(431, "request head too large\n").encode(false))
                        .await;
                    return;
                }
                Err(_) => {
                    let _ = stream
                        .write_all(Response::text(400, "malformed HTTP request\n").encode(false))
                        .await;
                    return;
                }
            }
            if !read_more(&mut stream, &mut buf).await {
                return;
            }
        };
        if content_length > MAX_BODY {
            let _ = stream
                .write_all(
                    Response::error(413, "too_large", "request body over 1 MiB").encode(false),
                )
                .await;
            return;
        }
        while buf.len() < head_len + content_length {
            if !read_more(&mut stream, &mut buf).await {
                return;
            }
        }
        let body = &buf[head_len..head_len + content_length];
        let open = matches!(
            path.split_once('?').map_or(path.as_str(), |(p, _)| p),
            "/healthz" | "/readyz" | "/metrics"
        );
        let response = if authorized || open {
            route(&ctx, &method, &path, body).await
        } else {
            let mut r = Response::error(
                401,
                "unauthorized",
                "send Authorization: Bearer <admin_token> (RINGWAY_ADMIN_TOKEN for the command line)",
            );
            r.challenge = true;
            r
        };
        buf.drain(..head_len + content_length);
        let (res, _) = stream.write_all(response.encode(keep_alive)).await;
        if res.is_err() || !keep_alive {
            return;
        }
    }
}

/// Whether a request with this `Authorization` header may use the API: always without
/// an `admin_token`; with one, only `Bearer <token>`, compared in constant time.
fn authorized(token: Option<&str>, header: Option<&[u8]>) -> bool {
    let Some(token) = token else {
        return true;
    };
    let Some(given) = header.and_then(|h| h.strip_prefix(b"Bearer ")) else {
        return false;
    };
    let want = token.as_bytes();
    given.len() == want.len()
        && given
            .iter()
            .zip(want)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Appends what the socket has to `buf`; false on EOF or error.
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let chunk = Vec::with_capacity(16 * 1024);
    let (res, chunk) = stream.read(chunk).await;
    match res {
        Ok(0) | Err(_) => false,
        Ok(_) => {
            buf.extend_from_slice(&chunk);
            true
        }
    }
}

async fn route(ctx: &Ctx, method: &str, path: &str, body: &[u8]) -> Response {
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    match (method, path) {
        ("GET", "/healthz") => Response::text(200, "ok\n"),
        ("GET", "/readyz") => {
            if ctx.node.is_ready() {
                match ctx.node.backplane_problem() {
                    None => Response::text(200, "ready\n"),
                    Some(why) => Response::text(503, format!("{why}\n")),
                }
            } else if ctx.node.is_draining() {
                Response::text(503, "draining\n")
            } else {
                Response::text(503, "starting\n")
            }
        }
        ("GET", "/metrics") => {
            let mut r = Response::text(200, metrics::render(&ctx.registry));
            r.content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
            r
        }
        ("POST", "/v1/publish") => publish(ctx, body).await,
        ("POST", "/v1/send") => send(ctx, body).await,
        ("GET", "/v1/nodes") => nodes(ctx).await,
        ("GET", "/v1/history") => history(ctx, query).await,
        (
            _,
            "/healthz" | "/readyz" | "/metrics" | "/v1/publish" | "/v1/send" | "/v1/nodes"
            | "/v1/history",
        ) => Response::error(405, "method_not_allowed", "wrong method for this endpoint"),
        _ => Response::error(404, "not_found", "no such endpoint"),
    }
}

#[derive(Deserialize)]
struct PublishBody<'a> {
    #[serde(borrow)]
    topic: Cow<'a, str>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

async fn publish(ctx: &Ctx, body: &[u8]) -> Response {
    let req: PublishBody<'_> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return Response::error(
                400,
                "bad_json",
                &format!("expected {{\"topic\":\"T\",\"data\":<JSON>}}: {e}"),
            )
        }
    };
    if let Err(m) = protocol::validate_topic(&req.topic, ctx.node.config().max_topic_bytes) {
        return Response::error(400, "bad_topic", &m);
    }
    let data = req.data.unwrap_or(RawValue::NULL);
    match fanout::publish(&ctx.node, &req.topic, data).await {
        Ok(id) => Response::json(200, serde_json::json!({ "id": id }).to_string()),
        Err(e) => Response::fanout_error(&e),
    }
}

/// Longest list of users one send may name.
pub const MAX_SEND_USERS: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBody<'a> {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    users: Option<Vec<String>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

async fn send(ctx: &Ctx, body: &[u8]) -> Response {
    const FORM: &str =
        "expected {\"user\":\"U\",\"data\":<JSON>} or {\"users\":[\"U\",…],\"data\":<JSON>}";
    let req: SendBody<'_> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return Response::error(400, "bad_json", &format!("{FORM}: {e}")),
    };
    let users = match (req.user, req.users) {
        (Some(u), None) => vec![u],
        (None, Some(us)) if !us.is_empty() => us,
        _ => return Response::error(400, "bad_request", FORM),
    };
    if users.len() > MAX_SEND_USERS {
        let m = format!("at most {MAX_SEND_USERS} users per request");
        return Response::error(400, "bad_request", &m);
    }
    if let Some(bad) = users
        .iter()
        .find(|u| u.is_empty() || u.len() > crate::auth::MAX_USER_BYTES)
    {
        let m = format!(
            "user ids are 1 to {} bytes: {bad:?}",
            crate::auth::MAX_USER_BYTES
        );
        return Response::error(400, "bad_request", &m);
    }
    let data = req.data.unwrap_or(RawValue::NULL);
    match fanout::send(&ctx.node, &users, data).await {
        Ok(sent) => sent_response(&sent),
        Err(e) => Response::fanout_error(&e),
    }
}

/// Messages one history page holds at most (and by default).
const HISTORY_LIMIT: usize = 1000;

async fn history(ctx: &Ctx, query: &str) -> Response {
    const FORM: &str =
        "expected ?topic=T, optionally since=<message id> with epoch=<epoch>, and limit=1..1000";
    let (mut topic, mut since, mut epoch, mut limit) = (None, None, None, HISTORY_LIMIT);
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "topic" => topic = Some(v.into_owned()),
            "since" => match v.parse::<protocol::MessageId>() {
                Ok(id) => since = Some(id),
                Err(()) => return Response::error(400, "bad_request", FORM),
            },
            "epoch" => epoch = Some(v.into_owned()),
            "limit" => match v.parse::<usize>() {
                Ok(n) if (1..=HISTORY_LIMIT).contains(&n) => limit = n,
                _ => return Response::error(400, "bad_request", FORM),
            },
            _ => return Response::error(400, "bad_request", FORM),
        }
    }
    let Some(topic) = topic else {
        return Response::error(400, "bad_request", FORM);
    };
    if let Err(m) = protocol::validate_topic(&topic, ctx.node.config().max_topic_bytes) {
        return Response::error(400, "bad_topic", &m);
    }
    if since.is_some() != epoch.is_some() {
        return Response::error(400, "bad_request", FORM);
    }
    match fanout::history(&ctx.node, &topic, since, epoch.as_deref(), limit).await {
        Ok(page) => {
            let mut body = String::from("{\"topic\":");
            body.push_str(&serde_json::Value::from(topic.as_str()).to_string());
            body.push_str(",\"epoch\":");
            body.push_str(&serde_json::Value::from(page.epoch.as_str()).to_string());
            body.push_str(",\"messages\":[");
            for (i, frame) in page.frames.iter().enumerate() {
                if i > 0 {
                    body.push(',');
                }
                body.push_str(crate::ws::frame::payload_text(frame));
            }
            body.push_str("],\"more\":");
            body.push_str(if page.more { "true" } else { "false" });
            body.push('}');
            Response::json(200, body)
        }
        Err(e) => Response::fanout_error(&e),
    }
}

fn sent_response(sent: &broker::Sent) -> Response {
    let body = serde_json::json!({
        "id": sent.id,
        "online": sent.online,
        "shards": sent.shards,
        "connections": sent.connections,
        "stored": sent.stored,
    });
    Response::json(200, body.to_string())
}

/// The cluster's live nodes.
async fn nodes(ctx: &Ctx) -> Response {
    match fanout::nodes(&ctx.node).await {
        Ok(nodes) => Response::json(200, serde_json::json!({ "nodes": nodes }).to_string()),
        Err(e) => Response::fanout_error(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::authorized;

    #[test]
    fn only_the_exact_bearer_token_is_authorized_when_one_is_set() {
        let t = Some("0123456789abcdef");
        assert!(authorized(None, None), "no token configured: open");
        assert!(authorized(t, Some(b"Bearer 0123456789abcdef")));
        for bad in [
            &b"Bearer 0123456789abcdeX"[..],
            b"Bearer 0123456789abcde",
            b"Bearer 0123456789abcdef0",
            b"bearer 0123456789abcdef",
            b"0123456789abcdef",
        ] {
            assert!(!authorized(t, Some(bad)), "{:?}", std::str::from_utf8(bad));
        }
        assert!(!authorized(t, None));
    }
}
