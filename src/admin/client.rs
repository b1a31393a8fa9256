//! A minimal blocking client for the admin API, used by `ringway publish` / `ringway
//! send` and by Rust services: `publish` (a topic) and `send` (direct, to users).

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
    })
}

/// One POST with `Connection: close`; returns status and body.
pub fn post(admin: SocketAddr, path: &str, body: &str) -> Result<(u16, String), ClientError> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(5)).map_err(|source| {
        ClientError::Connect {
            addr: admin,
            source,
        }
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {admin}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
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
