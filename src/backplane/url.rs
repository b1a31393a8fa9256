//! `redis://[[user]:password@]host[:port][/db]`, and `rediss://` for the same over TLS
//! (the server's certificate checked against the host's CA bundle for `host`). Unix
//! sockets are refused with a clear error.

/// A parsed Redis URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUrl {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: u32,
    /// `rediss://`: TLS to Redis.
    pub tls: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("expected redis://[[user]:password@]host[:port][/db] (rediss:// for TLS)")]
    Form,
    #[error("bad port {0:?}")]
    Port(String),
    #[error("bad database number {0:?}")]
    Db(String),
}

impl RedisUrl {
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let (tls, rest) = match url.strip_prefix("rediss://") {
            Some(rest) => (true, rest),
            None => (false, url.strip_prefix("redis://").ok_or(UrlError::Form)?),
        };
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((a, r)) => (Some(a), r),
            None => (None, rest),
        };
        let (hostport, db) = match rest.split_once('/') {
            Some((h, "")) => (h, 0),
            Some((h, d)) => (h, d.parse().map_err(|_| UrlError::Db(d.into()))?),
            None => (rest, 0),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or(UrlError::Form)?;
            (h, after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(UrlError::Form);
        }
        let port = match port {
            None => 6379,
            Some(p) => p.parse().map_err(|_| UrlError::Port(p.into()))?,
        };
        let (username, password) = match auth {
            None => (None, None),
            Some(a) => match a.split_once(':') {
                Some((u, p)) => (
                    (!u.is_empty()).then(|| decode(u)),
                    (!p.is_empty()).then(|| decode(p)),
                ),
                None => (None, (!a.is_empty()).then(|| decode(a))),
            },
        };
        Ok(Self {
            host: host.to_owned(),
            port,
            username,
            password,
            db,
            tls,
        })
    }

    /// `host:port` for connecting (IPv6 hosts bracketed).
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Percent-decoding for user names and passwords.
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        let u = RedisUrl::parse("redis://127.0.0.1:6380").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.db), ("127.0.0.1", 6380, 0));
        let u = RedisUrl::parse("redis://app:p%40ss@redis.internal/2").unwrap();
        assert_eq!(u.username.as_deref(), Some("app"));
        assert_eq!(u.password.as_deref(), Some("p@ss"));
        assert_eq!((u.port, u.db), (6379, 2));
        let u = RedisUrl::parse("redis://:secret@[::1]:7000").unwrap();
        assert_eq!(u.password.as_deref(), Some("secret"));
        assert_eq!(u.address(), "[::1]:7000");
        let u = RedisUrl::parse("rediss://cache.example.com:6380").unwrap();
        assert!(u.tls && !RedisUrl::parse("redis://x").unwrap().tls);
        assert_eq!((u.host.as_str(), u.port), ("cache.example.com", 6380));
        assert_eq!(RedisUrl::parse("http://x"), Err(UrlError::Form));
        assert!(matches!(
            RedisUrl::parse("redis://x:port"),
            Err(UrlError::Port(_))
        ));
        assert!(matches!(
            RedisUrl::parse("redis://x/abc"),
            Err(UrlError::Db(_))
        ));
    }
}
