//! The `redis` option's connection strings:
//! - `redis://[[user]:password@]host[:port][/db]`, and `rediss://` for the same over TLS
//!   (the server's certificate checked against the host's CA bundle for `host`);
//! - `redis+sentinel://[[user]:password@]host[:port][,host[:port]…]/master[/db]
//!   [?sentinel_password=…]`: the master named `master`, found through the listed
//!   Sentinels (port 26379 by default); the credentials are the master's, and
//!   `sentinel_password` is sent to the Sentinels when they require one.
//! - `redis+cluster://[[user]:password@]host[:port][,host[:port]…][/]`, and
//!   `rediss+cluster://` over TLS: a Redis Cluster, whose topology is read from the
//!   first of the listed nodes (seeds) that answers; port 6379 by default. A cluster
//!   has only database 0.
//!
//! Unix sockets are refused with a clear error.

use std::fmt;

/// A parsed Redis URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUrl {
    pub target: Target,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: u32,
    /// `rediss://`: TLS to Redis.
    pub tls: bool,
}

/// Where the Redis to use is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One server.
    Server(Addr),
    /// Whichever server the Sentinels name as `master`'s master.
    Sentinel {
        sentinels: Vec<Addr>,
        master: String,
        password: Option<String>,
    },
    /// A Redis Cluster, found through any of these nodes.
    Cluster { seeds: Vec<Addr> },
}

/// A host and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addr {
    pub host: String,
    pub port: u16,
}

/// `host:port` (IPv6 hosts bracketed), as connecting wants it.
impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("expected redis://[[user]:password@]host[:port][/db], rediss:// for TLS, redis+sentinel://[[user]:password@]host[:port][,host[:port]…]/master[/db] or redis+cluster://[[user]:password@]host[:port][,host[:port]…]")]
    Form,
    #[error("bad port {0:?}")]
    Port(String),
    #[error("bad database number {0:?}")]
    Db(String),
    #[error("redis+sentinel:// needs the master's name after the Sentinels: redis+sentinel://host:26379/mymaster")]
    NoMaster,
    #[error("unknown parameter {0:?} (redis+sentinel:// takes sentinel_password)")]
    Param(String),
    #[error("TLS through Sentinel (rediss+sentinel://) is not supported")]
    SentinelTls,
    #[error(
        "a Redis Cluster has only database 0: redis+cluster:// takes no database or parameters"
    )]
    ClusterPath,
}

impl RedisUrl {
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        if url.starts_with("rediss+sentinel://") {
            return Err(UrlError::SentinelTls);
        }
        if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            return Self::parse_sentinel(rest);
        }
        if let Some(rest) = url.strip_prefix("redis+cluster://") {
            return Self::parse_cluster(rest, false);
        }
        if let Some(rest) = url.strip_prefix("rediss+cluster://") {
            return Self::parse_cluster(rest, true);
        }
        let (tls, rest) = match url.strip_prefix("rediss://") {
            Some(rest) => (true, rest),
            None => (false, url.strip_prefix("redis://").ok_or(UrlError::Form)?),
        };
        let (auth, rest) = split_auth(rest);
        let (hostport, db) = match rest.split_once('/') {
            Some((h, d)) => (h, parse_db(d)?),
            None => (rest, 0),
        };
        let (username, password) = credentials(auth);
        Ok(Self {
            target: Target::Server(parse_addr(hostport, 6379)?),
            username,
            password,
            db,
            tls,
        })
    }

    fn parse_sentinel(rest: &str) -> Result<Self, UrlError> {
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (auth, rest) = split_auth(rest);
        let (hosts, path) = rest.split_once('/').ok_or(UrlError::NoMaster)?;
        let (master, db) = match path.split_once('/') {
            Some((m, d)) => (m, parse_db(d)?),
            None => (path, 0),
        };
        if master.is_empty() {
            return Err(UrlError::NoMaster);
        }
        let sentinels = hosts
            .split(',')
            .map(|h| parse_addr(h, 26379))
            .collect::<Result<Vec<_>, _>>()?;
        let mut sentinel_password = None;
        for param in query.split('&').filter(|p| !p.is_empty()) {
            match param.split_once('=') {
                Some(("sentinel_password", v)) => {
                    sentinel_password = (!v.is_empty()).then(|| decode(v))
                }
                _ => return Err(UrlError::Param(param.to_owned())),
            }
        }
        let (username, password) = credentials(auth);
        Ok(Self {
            target: Target::Sentinel {
                sentinels,
                master: decode(master),
                password: sentinel_password,
            },
            username,
            password,
            db,
            tls: false,
        })
    }

    fn parse_cluster(rest: &str, tls: bool) -> Result<Self, UrlError> {
        let (auth, rest) = split_auth(rest);
        let hosts = rest.strip_suffix('/').unwrap_or(rest);
        if hosts.contains(['/', '?']) {
            return Err(UrlError::ClusterPath);
        }
        let seeds = hosts
            .split(',')
            .map(|h| parse_addr(h, 6379))
            .collect::<Result<Vec<_>, _>>()?;
        let (username, password) = credentials(auth);
        Ok(Self {
            target: Target::Cluster { seeds },
            username,
            password,
            db: 0,
            tls,
        })
    }

    /// The same credentials and TLS, for one server (a cluster's node).
    pub fn at(&self, addr: &Addr) -> Self {
        Self {
            target: Target::Server(addr.clone()),
            ..self.clone()
        }
    }

    /// A Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster { .. })
    }

    /// What the URL points at, for messages: the server, or the master's name and its
    /// Sentinels.
    pub fn describe(&self) -> String {
        match &self.target {
            Target::Server(a) => a.to_string(),
            Target::Sentinel {
                sentinels, master, ..
            } => {
                let list: Vec<String> = sentinels.iter().map(ToString::to_string).collect();
                format!("master {master:?} via Sentinel {}", list.join(","))
            }
            Target::Cluster { seeds } => {
                let list: Vec<String> = seeds.iter().map(ToString::to_string).collect();
                format!("the cluster of {}", list.join(","))
            }
        }
    }
}

/// `(userinfo, rest)`: the userinfo is everything before the last `@`.
fn split_auth(s: &str) -> (Option<&str>, &str) {
    match s.rsplit_once('@') {
        Some((a, r)) => (Some(a), r),
        None => (None, s),
    }
}

fn parse_db(d: &str) -> Result<u32, UrlError> {
    if d.is_empty() {
        return Ok(0);
    }
    d.parse().map_err(|_| UrlError::Db(d.into()))
}

/// `host[:port]` or `[v6][:port]`.
fn parse_addr(hostport: &str, default_port: u16) -> Result<Addr, UrlError> {
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
        None => default_port,
        Some(p) => p.parse().map_err(|_| UrlError::Port(p.into()))?,
    };
    Ok(Addr {
        host: host.to_owned(),
        port,
    })
}

/// `[user]:password` or `password`, percent-decoded.
fn credentials(auth: Option<&str>) -> (Option<String>, Option<String>) {
    match auth {
        None => (None, None),
        Some(a) => match a.split_once(':') {
            Some((u, p)) => (
                (!u.is_empty()).then(|| decode(u)),
                (!p.is_empty()).then(|| decode(p)),
            ),
            None => (None, (!a.is_empty()).then(|| decode(a))),
        },
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

    fn server(u: &RedisUrl) -> (&str, u16) {
        match &u.target {
            Target::Server(a) => (a.host.as_str(), a.port),
            _ => panic!("not a server: {u:?}"),
        }
    }

    #[test]
    fn forms() {
        let u = RedisUrl::parse("redis://127.0.0.1:6380").unwrap();
        assert_eq!((server(&u), u.db), (("127.0.0.1", 6380), 0));
        let u = RedisUrl::parse("redis://app:p%40ss@redis.internal/2").unwrap();
        assert_eq!(u.username.as_deref(), Some("app"));
        assert_eq!(u.password.as_deref(), Some("p@ss"));
        assert_eq!((server(&u).1, u.db), (6379, 2));
        let u = RedisUrl::parse("redis://:secret@[::1]:7000").unwrap();
        assert_eq!(u.password.as_deref(), Some("secret"));
        assert_eq!(u.describe(), "[::1]:7000");
        let u = RedisUrl::parse("rediss://cache.example.com:6380").unwrap();
        assert!(u.tls && !RedisUrl::parse("redis://x").unwrap().tls);
        assert_eq!(server(&u), ("cache.example.com", 6380));
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

    #[test]
    fn sentinel_forms() {
        let u = RedisUrl::parse(
            "redis+sentinel://:pw@s1,10.0.0.2:26380,[::1]/my%2Dmaster/3?sentinel_password=sp",
        )
        .unwrap();
        let Target::Sentinel {
            sentinels,
            master,
            password,
        } = &u.target
        else {
            panic!("{u:?}");
        };
        let shown: Vec<String> = sentinels.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["s1:26379", "10.0.0.2:26380", "[::1]:26379"]);
        assert_eq!(master, "my-master");
        assert_eq!(password.as_deref(), Some("sp"));
        assert_eq!((u.password.as_deref(), u.db, u.tls), (Some("pw"), 3, false));
        assert!(u
            .describe()
            .starts_with("master \"my-master\" via Sentinel s1:26379,"));
        assert_eq!(
            RedisUrl::parse("redis+sentinel://s1:26379"),
            Err(UrlError::NoMaster)
        );
        assert_eq!(
            RedisUrl::parse("redis+sentinel://s1:26379/"),
            Err(UrlError::NoMaster)
        );
        assert!(matches!(
            RedisUrl::parse("redis+sentinel://s1/m?password=x"),
            Err(UrlError::Param(_))
        ));
        assert_eq!(
            RedisUrl::parse("rediss+sentinel://s1/m"),
            Err(UrlError::SentinelTls)
        );
    }

    #[test]
    fn cluster_forms() {
        let u = RedisUrl::parse("redis+cluster://:pw@h1:7000,10.0.0.2,[::1]:7002/").unwrap();
        let Target::Cluster { seeds } = &u.target else {
            panic!("{u:?}");
        };
        let shown: Vec<String> = seeds.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["h1:7000", "10.0.0.2:6379", "[::1]:7002"]);
        assert_eq!((u.password.as_deref(), u.db, u.tls), (Some("pw"), 0, false));
        assert!(u.is_cluster());
        assert_eq!(
            u.describe(),
            "the cluster of h1:7000,10.0.0.2:6379,[::1]:7002"
        );
        let node = u.at(&seeds[1]);
        assert_eq!(server(&node), ("10.0.0.2", 6379));
        assert_eq!(node.password.as_deref(), Some("pw"));
        assert!(RedisUrl::parse("rediss+cluster://h1:7000").unwrap().tls);
        assert_eq!(
            RedisUrl::parse("redis+cluster://h1:7000/2"),
            Err(UrlError::ClusterPath)
        );
        assert!(matches!(
            RedisUrl::parse("redis+cluster://h1:x"),
            Err(UrlError::Port(_))
        ));
    }
}
