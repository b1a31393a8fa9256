//! A minimal blocking client for the admin API, used by `ringway publish` / `ringway
//! send`, the load generator and Rust services: `publish` (a topic), `send` (direct, to
//! users) and `history` (a topic's recent messages). It sends the bearer token in
//! `RINGWAY_ADMIN_TOKEN` when that is set.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::value::RawValue;

/// Why a call to the admin API failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the admin API at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin API I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("data is not valid JSON: {0}")]
    BadJson(serde_json::Error),
    #[error("malformed response from the admin API")]
    BadResponse,
    #[error("admin API answered {status}: {body}")]
    Status { status: u16, body: String },
}

/// Publishes `data` (JSON text) to `topic` through the admin API; returns the message id.
pub fn publish(admin: SocketAddr, topic: &str, data: &str) -> Result<String, ClientError> {
    let raw: &RawValue = serde_json::from_str(data).map_err(ClientError::BadJson)?;
    let body = serde_json::json!({ "topic": topic, "data": raw }).to_string();
    let (status, body) = post(admin, "/v1/publish", &body)?;
    if status != 200 {
        return Err(ClientError::Status { status, body });
    }
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|_| ClientError::BadResponse)?;
    v.get("id")
        .and_then(|i| i.as_str())
        .map(str::to_owned)
        .ok_or(ClientError::BadResponse)
}

/// Sends `data` (JSON text) to every connection of `users`, on whichever nodes hold
/// them (one batched lookup); returns the message id and what the lookup found.
pub fn send(
    admin: SocketAddr,
    users: &[String],
    data: &str,
) -> Result<crate::broker::Sent, ClientError> {
    let raw: &RawValue = serde_json::from_str(data).map_err(ClientError::BadJson)?;
    let body = serde_json::json!({ "users": users, "data": raw }).to_string();
    let (status, body) = post(admin, "/v1/send", &body)?;
    if status != 200 {
        return Err(ClientError::Status { status, body });
    }
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|_| ClientError::BadResponse)?;
    let count = |name: &str| v.get(name).and_then(|n| n.as_u64()).map(|n| n as usize);
    Ok(crate::broker::Sent {
        id: v
            .get("id")
            .and_then(|i| i.as_str())
            .ok_or(ClientError::BadResponse)?
            .to_owned(),
        online: count("online").ok_or(ClientError::BadResponse)?,
        shards: count("shards").ok_or(ClientError::BadResponse)?,
        connections: count("connections"),
        stored: v
            .get("stored")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false),
    })
}

/// A topic's history (single node): the answer of `GET /v1/history` (`topic`, `epoch`,
/// `messages`, `more`), oldest first, after `since` (a message id and its epoch).
pub fn history(
    admin: SocketAddr,
    topic: &str,
    since: Option<(&str, &str)>,
    limit: usize,
) -> Result<serde_json::Value, ClientError> {
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair("topic", topic);
    if let Some((offset, epoch)) = since {
        query
            .append_pair("since", offset)
            .append_pair("epoch", epoch);
    }
    query.append_pair("limit", &limit.to_string());
    let (status, body) = request(admin, "GET", &format!("/v1/history?{}", query.finish()), "")?;
    if status != 200 {
        return Err(ClientError::Status { status, body });
    }
    serde_json::from_str(&body).map_err(|_| ClientError::BadResponse)
}

/// The `Authorization` header line for the admin API's bearer token
/// (`RINGWAY_ADMIN_TOKEN`, when set; a gateway with `admin_token` requires it), or an
/// empty string.
pub fn auth_header() -> String {
    match std::env::var("RINGWAY_ADMIN_TOKEN") {
        Ok(token) if !token.is_empty() => format!("Authorization: Bearer {token}\r\n"),
        _ => String::new(),
    }
}

/// One POST with `Connection: close`; returns status and body.
pub fn post(admin: SocketAddr, path: &str, body: &str) -> Result<(u16, String), ClientError> {
    request(admin, "POST", path, body)
}

fn request(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String), ClientError> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(5)).map_err(|source| {
        ClientError::Connect {
            addr: admin,
            source,
        }
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let auth = auth_header();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut r = httparse::Response::new(&mut headers);
    let head = match r.parse(&resp) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err(ClientError::BadResponse),
    };
    let status = r.code.ok_or(ClientError::BadResponse)?;
    Ok((status, String::from_utf8_lossy(&resp[head..]).into_owned()))
}
