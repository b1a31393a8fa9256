//! The HTTP/1.1 upgrade (RFC 6455 §4.2): parses a request, checks every header the
//! RFC requires and produces either the 101 response or an HTTP error with a reason.
//! Pure: the connection loop (`ws::conn`) owns the socket and the handshake timeout.
//!
//! | status | when |
//! |---|---|
//! | 400 | malformed request, HTTP/1.0, missing Host, `Connection` without `upgrade`, bad key |
//! | 404 | a path other than `/ws` (or `/echo` when enabled) |
//! | 405 | a method other than GET |
//! | 426 | no `Upgrade: websocket`, or `Sec-WebSocket-Version` other than 13 |
//! | 431 | headers larger than the limit, or too many of them |
//! | 401 | a missing, forged or expired token (decided by `auth`, answered here) |
//! | 403 | an `Origin` not in `allowed_origins` (when that list is set) |
//! | 503 | the node holds `max_connections` already (with `Retry-After`) |
//! | 403 | PROXY protocol on, and the peer is not in `proxy_trusted` |
//! | 400 | PROXY protocol on, and the header is missing or malformed |
//! | 429 | the client's address or user holds `max_connections_per_ip` / `_per_user` (with `Retry-After`) |
//!
//! A client token is taken from, in this order: `Authorization: Bearer <token>`, a
//! `Sec-WebSocket-Protocol` entry `bearer.<token>`, or the query parameter `token`.
//! When the client offers the subprotocol `ringway.v1`, the response selects it; a
//! client that offered only `bearer.<token>` gets that entry back (browsers refuse a
//! 101 that selects none of the subprotocols they offered).

use base64::Engine as _;

use crate::auth::AuthError;

/// Which endpoint the client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// Protocol v1 (`/ws`).
    Gateway,
    /// Conformance echo (`/echo`), only when enabled.
    Echo,
}

/// A valid upgrade request.
#[derive(Debug, PartialEq, Eq)]
pub struct Upgrade {
    pub endpoint: Endpoint,
    /// The `Sec-WebSocket-Accept` value to send back.
    pub accept: String,
    /// Bytes of the request (headers included); anything after them is frame data.
    pub request_len: usize,
    /// The client's token, if it sent one.
    pub token: Option<String>,
    /// The subprotocol to select: `ringway.v1` if offered, else the client's
    /// `bearer.<token>` entry, else none.
    pub subprotocol: Option<Subprotocol>,
}

/// The subprotocol name clients may offer (and which is then selected).
pub const SUBPROTOCOL: &str = "ringway.v1";

/// Which offered subprotocol the 101 response selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subprotocol {
    /// `ringway.v1`.
    V1,
    /// The client's `bearer.<token>` entry (the token is in [`Upgrade::token`]).
    Bearer,
}

/// Why an upgrade was refused; each has an HTTP status and a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    #[error("malformed HTTP request")]
    Malformed,
    #[error("only GET can upgrade")]
    BadMethod,
    #[error("HTTP/1.1 required")]
    HttpVersion,
    #[error("Host header required")]
    MissingHost,
    #[error("Upgrade: websocket required")]
    NotUpgrade,
    #[error("Connection: Upgrade required")]
    ConnectionHeader,
    #[error("Sec-WebSocket-Version: 13 required")]
    WsVersion,
    #[error("Sec-WebSocket-Key missing or invalid")]
    BadKey,
    #[error("no such endpoint")]
    NotFound,
    #[error("request headers too large")]
    HeadersTooLarge,
    #[error("{0}")]
    Unauthorized(AuthError),
    #[error("origin not allowed")]
    Origin,
    #[error("this node is at max_connections: retry, or connect elsewhere")]
    Full,
    #[error("too many connections from this address (max_connections_per_ip)")]
    PerIp,
    #[error("too many connections of this user (max_connections_per_user)")]
    PerUser,
    #[error("connections must come through a trusted load balancer (proxy_trusted)")]
    ProxyUntrusted,
    #[error("missing or malformed PROXY protocol header")]
    ProxyHeader,
    #[error("this port speaks TLS: connect with wss://")]
    PlainOnTls,
    /// Counted only: the client hears a TLS alert, not an HTTP response.
    #[error("TLS handshake failed")]
    TlsHandshake,
}

impl Refusal {
    /// All variants, for metric label pre-registration.
    pub const ALL: [Self; 19] = [
        Self::Malformed,
        Self::BadMethod,
        Self::HttpVersion,
        Self::MissingHost,
        Self::NotUpgrade,
        Self::ConnectionHeader,
        Self::WsVersion,
        Self::BadKey,
        Self::NotFound,
        Self::HeadersTooLarge,
        Self::Unauthorized(AuthError::Missing),
        Self::Origin,
        Self::Full,
        Self::PerIp,
        Self::PerUser,
        Self::ProxyUntrusted,
        Self::ProxyHeader,
        Self::PlainOnTls,
        Self::TlsHandshake,
    ];

    pub fn status(self) -> (u16, &'static str) {
        match self {
            Self::BadMethod => (405, "Method Not Allowed"),
            Self::NotFound => (404, "Not Found"),
            Self::NotUpgrade | Self::WsVersion => (426, "Upgrade Required"),
            Self::HeadersTooLarge => (431, "Request Header Fields Too Large"),
            Self::Unauthorized(_) => (401, "Unauthorized"),
            Self::Origin | Self::ProxyUntrusted => (403, "Forbidden"),
            Self::Full => (503, "Service Unavailable"),
            Self::PerIp | Self::PerUser => (429, "Too Many Requests"),
            _ => (400, "Bad Request"),
        }
    }

    /// Metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::BadMethod => "bad_method",
            Self::HttpVersion => "http_version",
            Self::MissingHost => "missing_host",
            Self::NotUpgrade => "not_upgrade",
            Self::ConnectionHeader => "connection_header",
            Self::WsVersion => "ws_version",
            Self::BadKey => "bad_key",
            Self::NotFound => "not_found",
            Self::HeadersTooLarge => "headers_too_large",
            Self::Unauthorized(_) => "unauthorized",
            Self::Origin => "origin",
            Self::Full => "max_connections",
            Self::PerIp => "max_connections_per_ip",
            Self::PerUser => "max_connections_per_user",
            Self::ProxyUntrusted => "proxy_untrusted",
            Self::ProxyHeader => "proxy_header",
            Self::PlainOnTls => "plain_http_on_tls",
            Self::TlsHandshake => "tls_handshake",
        }
    }

    /// The full HTTP response, reason in the body.
    pub fn response(self) -> Vec<u8> {
        let (code, text) = self.status();
        let body = format!("{self}\n");
        let extra = match self {
            Self::BadMethod => "Allow: GET\r\n",
            Self::NotUpgrade => "Upgrade: websocket\r\nConnection: Upgrade\r\n",
            Self::WsVersion => "Sec-WebSocket-Version: 13\r\n",
            Self::Unauthorized(_) => "WWW-Authenticate: Bearer error=\"invalid_token\"\r\n",
            Self::Full => "Retry-After: 1\r\n",
            Self::PerIp | Self::PerUser => "Retry-After: 5\r\n",
            _ => "",
        };
        format!(
            "HTTP/1.1 {code} {text}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }
}

/// Outcome of parsing what has arrived so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Need more bytes.
    Partial,
    Upgrade(Upgrade),
}

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const MAX_HEADERS: usize = 32;

/// Parses the request in `buf`. `max_bytes` bounds the request; `echo` enables `/echo`;
/// a non-empty `origins` is the list of `Origin` values allowed (a request without
/// `Origin`, from a client that is not a browser, is let through).
pub fn parse(
    buf: &[u8],
    max_bytes: usize,
    echo: bool,
    origins: &[String],
) -> Result<Parsed, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= max_bytes {
                Err(Refusal::HeadersTooLarge)
            } else {
                Ok(Parsed::Partial)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::HeadersTooLarge),
        Err(_) => return Err(Refusal::Malformed),
    };
    if len > max_bytes {
        return Err(Refusal::HeadersTooLarge);
    }
    if req.method != Some("GET") {
        return Err(Refusal::BadMethod);
    }
    if req.version != Some(1) {
        return Err(Refusal::HttpVersion);
    }
    let path = req.path.unwrap_or("");
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let endpoint = match path {
        "/ws" => Endpoint::Gateway,
        "/echo" if echo => Endpoint::Echo,
        _ => return Err(Refusal::NotFound),
    };
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    if header("host").is_none() {
        return Err(Refusal::MissingHost);
    }
    if !origins.is_empty() {
        if let Some(origin) = header("origin").map(<[u8]>::trim_ascii) {
            if !origins
                .iter()
                .any(|o| o.as_bytes().eq_ignore_ascii_case(origin))
            {
                return Err(Refusal::Origin);
            }
        }
    }
    if !header("upgrade").is_some_and(|v| has_token(v, "websocket")) {
        return Err(Refusal::NotUpgrade);
    }
    if !header("connection").is_some_and(|v| has_token(v, "upgrade")) {
        return Err(Refusal::ConnectionHeader);
    }
    if header("sec-websocket-version").map(<[u8]>::trim_ascii) != Some(b"13") {
        return Err(Refusal::WsVersion);
    }
    let key = header("sec-websocket-key")
        .map(<[u8]>::trim_ascii)
        .ok_or(Refusal::BadKey)?;
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(raw) if raw.len() == 16 => {}
        _ => return Err(Refusal::BadKey),
    }
    let mut token = header("authorization")
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| rest.trim().to_owned())
        });
    let mut subprotocol = None;
    for h in req.headers.iter() {
        if !h.name.eq_ignore_ascii_case("sec-websocket-protocol") {
            continue;
        }
        for entry in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            if entry == SUBPROTOCOL.as_bytes() {
                subprotocol = Some(Subprotocol::V1);
            } else if let Some(t) = entry.strip_prefix(b"bearer.") {
                if token.is_none() {
                    token = std::str::from_utf8(t).ok().map(str::to_owned);
                    if subprotocol.is_none() && token.is_some() {
                        subprotocol = Some(Subprotocol::Bearer);
                    }
                }
            }
        }
    }
    if token.is_none() {
        token = req
            .path
            .and_then(|p| p.split_once('?'))
            .and_then(|(_, query)| {
                query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("token="))
                    .map(str::to_owned)
            });
    }
    Ok(Parsed::Upgrade(Upgrade {
        endpoint,
        accept: accept_key(key),
        request_len: len,
        token: token.filter(|t| !t.is_empty()),
        subprotocol,
    }))
}

/// `Sec-WebSocket-Accept` for a client key.
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key);
    sha.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.digest().bytes())
}

/// Appends the 101 response to `out` (no allocation when `out` has room). `selected`
/// is the subprotocol value to send back, if any.
pub fn write_switching_protocols(out: &mut Vec<u8>, accept: &str, selected: Option<&str>) {
    out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
    out.extend_from_slice(accept.as_bytes());
    if let Some(p) = selected {
        out.extend_from_slice(b"\r\nSec-WebSocket-Protocol: ");
        out.extend_from_slice(p.as_bytes());
    }
    out.extend_from_slice(b"\r\n\r\n");
}

/// Whether a comma-separated header value contains `token` (case-insensitive).
fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    #[test]
    fn rfc_example_accept() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn good_request_upgrades() {
        let Ok(Parsed::Upgrade(u)) = parse(GOOD.as_bytes(), 8192, false, &[]) else {
            panic!()
        };
        assert_eq!(u.endpoint, Endpoint::Gateway);
        assert_eq!(u.request_len, GOOD.len());
        assert_eq!(u.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn origins_outside_the_list_are_forbidden_and_a_missing_origin_passes() {
        let allowed = ["https://app.example.com".to_owned()];
        let from = |origin: &str| {
            let req = GOOD.replace("Host: x\r\n", &format!("Host: x\r\n{origin}"));
            parse(req.as_bytes(), 8192, false, &allowed)
        };
        assert!(matches!(
            from("Origin: https://app.example.com\r\n"),
            Ok(Parsed::Upgrade(_))
        ));
        assert!(matches!(
            from("Origin: HTTPS://APP.example.com\r\n"),
            Ok(Parsed::Upgrade(_))
        ));
        assert_eq!(
            from("Origin: https://evil.example\r\n"),
            Err(Refusal::Origin)
        );
        assert_eq!(from("Origin: null\r\n"), Err(Refusal::Origin));
        assert!(
            matches!(from(""), Ok(Parsed::Upgrade(_))),
            "no Origin: not a browser"
        );
        let any = GOOD.replace("Host: x\r\n", "Host: x\r\nOrigin: https://evil.example\r\n");
        assert!(matches!(
            parse(any.as_bytes(), 8192, false, &[]),
            Ok(Parsed::Upgrade(_))
        ));
        assert_eq!(Refusal::Origin.status().0, 403);
    }

    #[test]
    fn partial_then_too_large() {
        assert_eq!(
            parse(&GOOD.as_bytes()[..40], 8192, false, &[]),
            Ok(Parsed::Partial)
        );
        assert_eq!(
            parse(&GOOD.as_bytes()[..40], 40, false, &[]),
            Err(Refusal::HeadersTooLarge)
        );
    }

    fn with(from: &str, to: &str) -> Result<Parsed, Refusal> {
        parse(GOOD.replace(from, to).as_bytes(), 8192, false, &[])
    }

    #[test]
    fn each_missing_piece_is_named() {
        assert_eq!(with("GET", "POST"), Err(Refusal::BadMethod));
        assert_eq!(with("HTTP/1.1", "HTTP/1.0"), Err(Refusal::HttpVersion));
        assert_eq!(with("Host: x\r\n", ""), Err(Refusal::MissingHost));
        assert_eq!(with("Upgrade: websocket\r\n", ""), Err(Refusal::NotUpgrade));
        assert_eq!(
            with("keep-alive, Upgrade", "keep-alive"),
            Err(Refusal::ConnectionHeader)
        );
        assert_eq!(with("Version: 13", "Version: 8"), Err(Refusal::WsVersion));
        assert_eq!(
            with("dGhlIHNhbXBsZSBub25jZQ==", "short"),
            Err(Refusal::BadKey)
        );
        assert_eq!(with("/ws", "/other"), Err(Refusal::NotFound));
        assert_eq!(with("/ws", "/echo"), Err(Refusal::NotFound));
        assert!(matches!(
            parse(GOOD.replace("/ws", "/echo").as_bytes(), 8192, true, &[]),
            Ok(Parsed::Upgrade(_))
        ));
        assert!(matches!(
            with("/ws", "/ws?token=abc"),
            Ok(Parsed::Upgrade(_))
        ));
        assert_eq!(
            parse(b"\x00\x01garbage\r\n\r\n", 8192, false, &[]),
            Err(Refusal::Malformed)
        );
    }

    fn token_of(from: &str, to: &str) -> (Option<String>, Option<Subprotocol>) {
        match with(from, to) {
            Ok(Parsed::Upgrade(u)) => (u.token, u.subprotocol),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn token_from_header_subprotocol_or_query() {
        assert_eq!(token_of("", ""), (None, None));
        let bearer = token_of("Host: x\r\n", "Host: x\r\nAuthorization: Bearer a.b.c\r\n");
        assert_eq!(bearer, (Some("a.b.c".into()), None));
        let proto = token_of(
            "Host: x\r\n",
            "Host: x\r\nSec-WebSocket-Protocol: ringway.v1, bearer.d.e.f\r\n",
        );
        assert_eq!(proto, (Some("d.e.f".into()), Some(Subprotocol::V1)));
        let alone = token_of(
            "Host: x\r\n",
            "Host: x\r\nSec-WebSocket-Protocol: bearer.d.e.f\r\n",
        );
        assert_eq!(alone, (Some("d.e.f".into()), Some(Subprotocol::Bearer)));
        let query = token_of("/ws", "/ws?x=1&token=g.h.i");
        assert_eq!(query, (Some("g.h.i".into()), None));
        // The header wins over the query.
        let both = token_of(
            "GET /ws HTTP/1.1\r\nHost: x\r\n",
            "GET /ws?token=q HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer h\r\n",
        );
        assert_eq!(both.0.as_deref(), Some("h"));
    }

    #[test]
    fn refusal_responses_carry_status_and_reason() {
        let r = String::from_utf8(Refusal::WsVersion.response()).unwrap();
        assert!(r.starts_with("HTTP/1.1 426 "));
        assert!(r.contains("Sec-WebSocket-Version: 13\r\n"));
        assert!(r.ends_with("Sec-WebSocket-Version: 13 required\n"));
    }
}
