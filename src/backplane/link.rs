//! One Redis connection on a shard's runtime: connect under a timeout, TLS for
//! `rediss://`, AUTH and SELECT, write pipelined commands, decode RESP2 replies and
//! pushes.
//!
//! Reads wait for readiness and then `recv` without blocking into a small buffer owned
//! by the link, so waiting for Redis can be raced against other work (`select!`)
//! without ever dropping an in-flight read.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;
use redis_protocol::resp2::types::{BorrowedFrame, BytesFrame};
use rustls::pki_types::ServerName;
use rustls::ClientConnection;

use super::url::{Addr, Target};
use super::RedisUrl;

/// Why a link failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("timed out")]
    Timeout,
    #[error("redis did not answer within {0:?}")]
    NoAnswer(Duration),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed by Redis")]
    Closed,
    #[error("RESP protocol error: {0}")]
    Protocol(String),
    #[error("Redis refused {what}: {message}")]
    Refused { what: &'static str, message: String },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{addr} is not the master (its role: {role}); asking the Sentinels again")]
    NotMaster { addr: Addr, role: String },
    #[error("no Sentinel named a master: {0}")]
    NoMaster(String),
    #[error("the master moved to {0}")]
    MasterMoved(Addr),
    #[error("the cluster's slots moved ({0}); reading its topology again")]
    SlotsMoved(String),
    #[error("cluster topology: {0}")]
    Topology(String),
}

/// Appends one command (an array of bulk strings) to `buf`.
pub fn encode(buf: &mut BytesMut, args: &[&[u8]]) {
    let frames: Vec<BorrowedFrame<'_>> =
        args.iter().map(|a| BorrowedFrame::BulkString(a)).collect();
    // Encoding into a growable buffer cannot fail.
    let _ = redis_protocol::resp2::encode::extend_encode_borrowed(
        buf,
        &BorrowedFrame::Array(&frames),
        false,
    );
}

/// Bytes read per wake-up at most, so a busy link cannot starve the shard.
const READ_BUDGET: usize = 1024 * 1024;
/// Unacknowledged data older than this breaks the connection (TCP_USER_TIMEOUT).
const USER_TIMEOUT: Duration = Duration::from_secs(10);

/// Resolves `host:port` on a short-lived thread; the shard waits without blocking.
async fn resolve(address: String) -> Result<Vec<std::net::SocketAddr>, LinkError> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = address.parse() {
        return Ok(vec![addr]);
    }
    let (tx, rx) = flume::bounded(1);
    let shown = address.clone();
    std::thread::Builder::new()
        .name("ringway-resolve".into())
        .spawn(move || {
            let _ = tx.send(address.to_socket_addrs().map(Iterator::collect::<Vec<_>>));
        })?;
    match rx.recv_async().await {
        Ok(Ok(addrs)) if !addrs.is_empty() => Ok(addrs),
        Ok(Ok(_)) => Err(LinkError::Connect {
            addr: shown,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        }),
        Ok(Err(source)) => Err(LinkError::Connect {
            addr: shown,
            source,
        }),
        Err(_) => Err(LinkError::Connect {
            addr: shown,
            source: std::io::Error::other("resolver thread failed"),
        }),
    }
}

pub struct Link {
    stream: TcpStream,
    fd: RawFd,
    rbuf: BytesMut,
    scratch: Box<[u8]>,
    /// `rediss://`: the TLS session every byte goes through.
    tls: Option<Box<ClientConnection>>,
    /// The server this link is connected to.
    pub addr: Addr,
}

/// Runs the client side of a TLS handshake with Redis at `host`.
async fn tls_handshake(
    stream: &mut TcpStream,
    host: &str,
) -> Result<Box<ClientConnection>, LinkError> {
    let name = ServerName::try_from(host.to_string())
        .map_err(|_| LinkError::Tls(format!("{host:?} is not a valid server name")))?;
    let mut s = Box::new(
        ClientConnection::new(crate::tls::client_config(), name)
            .map_err(|e| LinkError::Tls(e.to_string()))?,
    );
    crate::tls::handshake(stream, &mut s, Vec::new()).await?;
    Ok(s)
}

impl From<crate::tls::Stopped> for LinkError {
    fn from(e: crate::tls::Stopped) -> Self {
        match e {
            crate::tls::Stopped::Io(e) => Self::Io(e),
            crate::tls::Stopped::Tls(e) => Self::Tls(e.to_string()),
            crate::tls::Stopped::Closed => Self::Closed,
        }
    }
}

impl Link {
    /// Opens a connection to `addr`, with TLS for `tls_host` when given. The host name
    /// is resolved on a helper thread (a slow resolver must not stall the shard),
    /// every address is tried in turn, and the socket gets keepalives and a TCP user
    /// timeout so a host that vanishes without a reset is noticed within seconds.
    pub async fn open(addr: &Addr, tls_host: Option<&str>) -> Result<Self, LinkError> {
        let addrs = resolve(addr.to_string()).await?;
        let mut last = None;
        let mut stream = None;
        for a in &addrs {
            match TcpStream::connect_addr(*a).await {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let mut stream = stream.ok_or_else(|| LinkError::Connect {
            addr: addr.to_string(),
            source: last.unwrap_or_else(|| std::io::ErrorKind::NotFound.into()),
        })?;
        let _ = stream.set_nodelay(true);
        if let Err(e) = crate::sys::set_liveness(
            stream.as_raw_fd(),
            Duration::from_secs(5),
            Duration::from_secs(2),
            3,
            USER_TIMEOUT,
        ) {
            tracing::debug!(error = %e, "could not set keepalives on the redis socket");
        }
        let fd = stream.as_raw_fd();
        let tls = match tls_host {
            Some(host) => Some(tls_handshake(&mut stream, host).await?),
            None => None,
        };
        Ok(Link {
            fd,
            stream,
            rbuf: BytesMut::with_capacity(16 * 1024),
            scratch: vec![0u8; 64 * 1024].into_boxed_slice(),
            tls,
            addr: addr.clone(),
        })
    }

    /// Connects to the URL's Redis (through its Sentinels: to the master they name,
    /// checked to be one), authenticates, selects the database and names the
    /// connection (`CLIENT SETNAME`, so that `CLIENT LIST` tells which gateway link it
    /// is; a refusal is ignored).
    pub async fn connect(
        url: &RedisUrl,
        timeout: Duration,
        name: Option<&str>,
    ) -> Result<Self, LinkError> {
        // A cluster's links go to each master (`masters`); this is the first seed that
        // answers, for a look at the server (`ringway doctor`).
        if let Target::Cluster { seeds } = &url.target {
            let mut last = LinkError::Topology("no seed".into());
            for seed in seeds {
                match Box::pin(Link::connect(&url.at(seed), timeout, name)).await {
                    Ok(link) => return Ok(link),
                    Err(e) => last = e,
                }
            }
            return Err(last);
        }
        let setup = async {
            let (addr, must_be_master) = match &url.target {
                Target::Server(a) => (a.clone(), false),
                Target::Sentinel { .. } => (super::sentinel::master(url).await?, true),
                // Connected through a seed above.
                Target::Cluster { .. } => {
                    return Err(LinkError::Topology("no seed to connect to".into()))
                }
            };
            let tls_host = url.tls.then_some(addr.host.as_str());
            let mut link = Link::open(&addr, tls_host).await?;
            let mut out = BytesMut::new();
            let mut expect = Vec::new();
            if let Some(password) = &url.password {
                match &url.username {
                    Some(user) => {
                        encode(&mut out, &[b"AUTH", user.as_bytes(), password.as_bytes()])
                    }
                    None => encode(&mut out, &[b"AUTH", password.as_bytes()]),
                }
                expect.push("AUTH");
            }
            if url.db != 0 {
                encode(&mut out, &[b"SELECT", url.db.to_string().as_bytes()]);
                expect.push("SELECT");
            }
            if let Some(name) = name {
                encode(&mut out, &[b"CLIENT", b"SETNAME", name.as_bytes()]);
                expect.push("CLIENT SETNAME");
            }
            if must_be_master {
                // During a failover a Sentinel may still name the old master, which
                // may already be a replica.
                encode(&mut out, &[b"ROLE"]);
                expect.push("ROLE");
            }
            // A Redis that is hung still completes the TCP handshake (the kernel does):
            // only an answer shows it is there.
            encode(&mut out, &[b"PING"]);
            expect.push("PING");
            link.write(out.freeze()).await?;
            for what in expect {
                match link.next_frame().await? {
                    BytesFrame::Error(_) if what == "CLIENT SETNAME" => {}
                    BytesFrame::Error(message) => {
                        return Err(LinkError::Refused {
                            what,
                            message: message.to_string(),
                        })
                    }
                    BytesFrame::Array(role) if what == "ROLE" => match role.first() {
                        Some(BytesFrame::BulkString(r)) if &r[..] == b"master" => {}
                        other => {
                            let role = match other {
                                Some(BytesFrame::BulkString(r)) => {
                                    String::from_utf8_lossy(r).into_owned()
                                }
                                _ => "unknown".into(),
                            };
                            return Err(LinkError::NotMaster { addr, role });
                        }
                    },
                    _ => {}
                }
            }
            Ok(link)
        };
        monoio::time::timeout(timeout, setup)
            .await
            .map_err(|_| LinkError::Timeout)?
    }

    /// Writes `buf` completely.
    pub async fn write(&mut self, buf: Bytes) -> Result<(), LinkError> {
        let res = match self.tls.as_deref_mut() {
            None => self.stream.write_all(buf).await.0,
            Some(s) => {
                // In pieces of the session's buffer limit, each encrypted out at once.
                let mut out = Vec::with_capacity(buf.len() + buf.len() / 256 + 64);
                let mut at = 0;
                while at < buf.len() {
                    at += s.writer().write(&buf[at..])?;
                    while s.wants_write() {
                        s.write_tls(&mut out)?;
                    }
                }
                self.stream.write_all(out).await.0
            }
        };
        res?;
        Ok(())
    }

    /// Waits for something to read, at most `wait` or until `wake` is ready, and moves
    /// what arrived into the read buffer.
    ///
    /// The socket is read whichever way the wait ends. A wake that is ready before the
    /// socket's readiness comes back (with io_uring that takes a trip through the ring)
    /// would otherwise win every time while wakes keep coming: a burst of connections
    /// closing wakes the command task over and over, and its replies stayed unread
    /// until the reply timeout broke a connection to a Redis that had answered.
    pub async fn fill_within(
        &mut self,
        wait: Duration,
        wake: impl std::future::Future<Output = ()>,
    ) -> Result<(), LinkError> {
        let readable = monoio::select! {
            r = self.readable() => Some(r),
            _ = wake => None,
            _ = monoio::time::sleep(wait) => None,
        };
        if let Some(r) = readable {
            r?;
        }
        self.fill()
    }

    /// Waits until the socket has something to read (or is closed).
    pub async fn readable(&self) -> Result<(), LinkError> {
        self.stream.readable(false).await?;
        Ok(())
    }

    /// Moves what the socket holds into the read buffer, without waiting.
    pub fn fill(&mut self) -> Result<(), LinkError> {
        let mut total = 0;
        loop {
            match crate::sys::recv_nonblocking(self.fd, &mut self.scratch) {
                Ok(0) => return Err(LinkError::Closed),
                Ok(n) => {
                    match self.tls.as_deref_mut() {
                        None => self.rbuf.extend_from_slice(&self.scratch[..n]),
                        Some(s) => {
                            crate::tls::feed(s, &self.scratch[..n])?;
                            let mut plain = [0u8; 16 * 1024];
                            loop {
                                match s.reader().read(&mut plain) {
                                    Ok(0) => return Err(LinkError::Closed),
                                    Ok(m) => self.rbuf.extend_from_slice(&plain[..m]),
                                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                                    Err(e) => return Err(e.into()),
                                }
                            }
                        }
                    }
                    total += n;
                    if n < self.scratch.len() || total >= READ_BUDGET {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The next complete frame already read, if any.
    pub fn next_buffered(&mut self) -> Result<Option<BytesFrame>, LinkError> {
        match redis_protocol::resp2::decode::decode_bytes_mut(&mut self.rbuf) {
            Ok(Some((frame, _, _))) => Ok(Some(frame)),
            Ok(None) => Ok(None),
            Err(e) => Err(LinkError::Protocol(e.to_string())),
        }
    }

    /// Waits for the next frame.
    pub async fn next_frame(&mut self) -> Result<BytesFrame, LinkError> {
        loop {
            if let Some(frame) = self.next_buffered()? {
                return Ok(frame);
            }
            self.readable().await?;
            self.fill()?;
        }
    }
}

/// Keeps a quiet connection honest: PINGs it after `every` without traffic, and fails
/// it when a PING goes unanswered for `timeout` (Redis gone or hung, even if TCP has not
/// noticed).
pub struct Keepalive {
    last_traffic: Instant,
    ping_sent: Option<Instant>,
    every: Duration,
    timeout: Duration,
}

impl Keepalive {
    /// `pinged`: a PING was just written with the connection's first commands.
    pub fn new(every: Duration, timeout: Duration, pinged: bool) -> Self {
        let now = Instant::now();
        Self {
            last_traffic: now,
            ping_sent: pinged.then_some(now),
            every,
            timeout,
        }
    }

    /// Something arrived.
    pub fn heard(&mut self) {
        self.last_traffic = Instant::now();
        self.ping_sent = None;
    }

    /// PINGs when due, fails when a PING is overdue; how long until it must be asked
    /// again.
    pub async fn check(&mut self, link: &mut Link) -> Result<Duration, LinkError> {
        if let Some(sent) = self.ping_sent {
            if sent.elapsed() > self.timeout {
                return Err(LinkError::NoAnswer(self.timeout));
            }
        } else if self.last_traffic.elapsed() >= self.every {
            let mut out = BytesMut::new();
            encode(&mut out, &[b"PING"]);
            link.write(out.freeze()).await?;
            self.ping_sent = Some(Instant::now());
        }
        Ok(match self.ping_sent {
            Some(sent) => self.timeout.saturating_sub(sent.elapsed()),
            None => self.every.saturating_sub(self.last_traffic.elapsed()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_commands_as_bulk_string_arrays() {
        let mut buf = BytesMut::new();
        encode(&mut buf, &[b"PUBLISH", b"ringway:topic:a", b"{}"]);
        assert_eq!(
            &buf[..],
            b"*3\r\n$7\r\nPUBLISH\r\n$15\r\nringway:topic:a\r\n$2\r\n{}\r\n"
        );
    }
}
