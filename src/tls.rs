//! TLS for `wss://` (`tls_cert`, `tls_key`): the server configuration made from the PEM
//! files, the handshake of an upgrade, and the record layer of established connections.
//! Also the client configuration and the handshake driver that `rediss://` links share.
//!
//! rustls runs sans-IO over our own non-blocking sockets, so the shard's send path
//! stays what it is without TLS: the tick gathers everything a connection is owed and
//! hands it over in one call, which here encrypts it into as few records as fit and
//! writes them with one `sendmsg`. A connection's TLS session lives in its shard's
//! table of sessions, indexed by the connection's key (beside the connection table,
//! like its rate bucket), so a plain connection pays one bounds check and its handle
//! does not grow.
//!
//! Backpressure: plaintext is handed to rustls only once everything it encrypted
//! before has left for the socket, so rustls holds at most one call's worth of records
//! (its buffer limit, 64 KiB) beyond the connection's own queue, and the slow-consumer
//! limit still counts what the client has not taken. While records wait for the
//! socket the connection counts as blocked, and the reactor writes them when the
//! socket has room.
//!
//! Kernel TLS (handing the record layer to the kernel after the handshake) is not
//! used: BENCHMARKS.md says why and what it would take to measure.

use std::cell::RefCell;
use std::io::{self, ErrorKind, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, ConnectionCommon, RootCertStore, ServerConfig, ServerConnection};

use crate::sys;

/// Why the certificate or key could not be put in force.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls_cert {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("tls_key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("tls_cert and tls_key do not make a usable pair: {0}")]
    Pair(rustls::Error),
}

/// The server configuration for `cert` (a PEM chain, leaf first) and `key` (a PEM
/// private key: PKCS#8, PKCS#1 or SEC1). Read from the files on every call, so a
/// reload picks up certificates renewed in place.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_err = |reason: String| TlsError::Cert {
        path: cert.to_path_buf(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_err("no CERTIFICATE block in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.to_path_buf(),
        reason: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Pair)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(TlsError::Pair)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The client configuration for connections ringway makes (`rediss://`): the host's
/// CA bundle ([`host_roots`]), or Mozilla's roots when the host has none. Made once.
pub fn client_config() -> Arc<ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = RootCertStore::empty();
            match host_roots() {
                Some(certs) => {
                    let (_, _ignored) = roots.add_parsable_certificates(certs);
                }
                None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map(|b| b.with_root_certificates(roots).with_no_client_auth());
            // The default versions of the built-in provider always build.
            Arc::new(config.unwrap_or_else(|_| {
                ClientConfig::builder()
                    .with_root_certificates(RootCertStore::empty())
                    .with_no_client_auth()
            }))
        })
        .clone()
}

/// The host's CA bundle: the file `SSL_CERT_FILE` names, or the first of the usual
/// paths of Debian/Ubuntu, RHEL/Fedora and Alpine/macOS that holds certificates.
pub fn host_roots() -> Option<Vec<CertificateDer<'static>>> {
    let candidates = std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            [
                "/etc/ssl/certs/ca-certificates.crt",
                "/etc/pki/tls/certs/ca-bundle.crt",
                "/etc/ssl/cert.pem",
            ]
            .map(PathBuf::from),
        );
    for path in candidates {
        let Ok(iter) = CertificateDer::pem_file_iter(&path) else {
            continue;
        };
        let certs: Vec<_> = iter.filter_map(Result::ok).collect();
        if !certs.is_empty() {
            return Some(certs);
        }
    }
    None
}

/// Why [`handshake`] stopped short.
#[derive(Debug, thiserror::Error)]
pub enum Stopped {
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The peer's records are not TLS we accept (the alert has been sent).
    #[error("{0}")]
    Tls(#[from] rustls::Error),
    #[error("connection closed during the TLS handshake")]
    Closed,
}

/// Drives a TLS handshake, either side, on `stream` until it completes: feeds `input`
/// (bytes already read), writes what the session has for the peer, and waits for the
/// peer's next flight. The upgrade and the Redis links run it under their timeouts.
pub async fn handshake<D>(
    stream: &mut TcpStream,
    session: &mut ConnectionCommon<D>,
    mut input: Vec<u8>,
) -> Result<(), Stopped> {
    let fd = stream.as_raw_fd();
    loop {
        if let Err(e) = feed(session, &input) {
            // The alert rustls queued tells the peer why.
            let _ = write_records(stream, session).await;
            return Err(e);
        }
        input.clear();
        write_records(stream, session).await?;
        if !session.is_handshaking() {
            return Ok(());
        }
        let mut scratch = [0u8; 4096];
        loop {
            match sys::recv_nonblocking(fd, &mut scratch) {
                Ok(0) => return Err(Stopped::Closed),
                Ok(n) => {
                    input.extend_from_slice(&scratch[..n]);
                    break;
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    stream.readable(false).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Hands records received from the peer to `session`.
pub fn feed<D>(session: &mut ConnectionCommon<D>, mut records: &[u8]) -> Result<(), Stopped> {
    while !records.is_empty() {
        if session.read_tls(&mut records)? == 0 {
            return Err(Stopped::Closed);
        }
        session.process_new_packets()?;
    }
    Ok(())
}

/// Writes every record `session` has for the peer, waiting for the socket as needed.
pub async fn write_records<D>(
    stream: &mut TcpStream,
    session: &mut ConnectionCommon<D>,
) -> Result<(), Stopped> {
    while session.wants_write() {
        let mut out = Vec::new();
        session.write_tls(&mut out)?;
        let (written, _) = stream.write_all(out).await;
        written?;
    }
    Ok(())
}

/// Why a TLS handshake did not complete.
#[derive(Debug)]
pub enum Failed {
    /// The client spoke plain HTTP to the TLS port (answered in plain text).
    PlainHttp,
    /// The TLS handshake failed (a TLS alert was sent) or the client went away.
    Handshake,
}

/// Runs the server side of a TLS handshake on `stream`. `buf` holds bytes already read
/// (after a PROXY header); on success it holds the plaintext that came behind the
/// handshake, and the session is returned for the shard's table.
pub async fn accept(
    stream: &mut TcpStream,
    config: Arc<ServerConfig>,
    buf: &mut Vec<u8>,
) -> Result<Box<ServerConnection>, Failed> {
    let mut session = Box::new(ServerConnection::new(config).map_err(|_| Failed::Handshake)?);
    let input = std::mem::take(buf);
    if looks_like_plain_http(&input) {
        return Err(Failed::PlainHttp);
    }
    handshake(stream, &mut session, input)
        .await
        .map_err(|_| Failed::Handshake)?;
    // Plaintext that came with the client's last flight (usually the upgrade request).
    let mut chunk = [0u8; 4096];
    loop {
        match session.reader().read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    Ok(session)
}

/// Sends `bytes` (an HTTP refusal) through `session` during the upgrade.
pub async fn respond(stream: &mut TcpStream, session: &mut ServerConnection, bytes: &[u8]) {
    let _ = session.writer().write_all(bytes);
    session.send_close_notify();
    let _ = write_records(stream, session).await;
}

/// A client that sends an HTTP method where a TLS record should start has the wrong
/// scheme: `ws://` to a `wss://` port.
fn looks_like_plain_http(input: &[u8]) -> bool {
    let method = input.iter().take_while(|b| b.is_ascii_uppercase()).count();
    (3..=7).contains(&method) && input.get(method) == Some(&b' ')
}

thread_local! {
    /// The shard's TLS sessions by connection key; empty when TLS is off.
    static SESSIONS: RefCell<Vec<Option<Box<ServerConnection>>>> = const { RefCell::new(Vec::new()) };
}

/// Connection `key` of this shard speaks TLS through `session` from now on.
pub fn adopt(key: u32, session: Box<ServerConnection>) {
    SESSIONS.with(|s| {
        let mut s = s.borrow_mut();
        let i = key as usize;
        if s.len() <= i {
            s.resize_with(i + 1, || None);
        }
        s[i] = Some(session);
    });
}

/// Connection `key` is gone: its session goes with it (before its key is reused).
pub fn forget(key: u32) {
    SESSIONS.with(|s| {
        if let Some(slot) = s.borrow_mut().get_mut(key as usize) {
            *slot = None;
        }
    });
}

/// Runs `f` on connection `key`'s session; `None` for a plain connection.
fn with<R>(key: u32, f: impl FnOnce(&mut ServerConnection) -> R) -> Option<R> {
    SESSIONS.with(|s| {
        let mut s = s.borrow_mut();
        s.get_mut(key as usize)?.as_deref_mut().map(f)
    })
}

/// Reads what connection `key` has received, like `recv(2)`: plaintext bytes, `Ok(0)`
/// at the end of the stream, `WouldBlock` when the socket is drained. A short count
/// means the socket was drained (the reactor's edge-triggered reads count on it).
pub fn recv(key: u32, fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    with(key, |s| recv_session(s, fd, buf)).unwrap_or_else(|| sys::recv_nonblocking(fd, buf))
}

/// [`recv`] through a session not yet in the table (the upgrade request).
pub fn recv_session(s: &mut ServerConnection, fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    let result = loop {
        match s.reader().read(&mut buf[filled..]) {
            Ok(0) if filled < buf.len() => break Ok(0), // close_notify
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => break Err(e),
        }
        if filled == buf.len() {
            break Ok(0);
        }
        match s.read_tls(&mut Socket(fd)) {
            Ok(0) => break Ok(0),
            Ok(_) => {
                if let Err(e) = s.process_new_packets() {
                    // The alert rustls queued goes out if the socket takes it.
                    let _ = flush_session(s, fd);
                    break Err(io::Error::new(ErrorKind::InvalidData, e));
                }
            }
            Err(e) => break Err(e),
        }
    };
    // A reply rustls owes the client (a key update) goes out with what can be sent.
    if s.wants_write() {
        let _ = flush_session(s, fd);
    }
    match result {
        _ if filled > 0 => Ok(filled),
        Ok(_) => Ok(0),
        Err(e) => Err(e),
    }
}

/// Sends `bufs` to connection `key`, like `sendmsg(2)`: the count of plaintext bytes
/// taken, or `WouldBlock`; a short count means the socket is full. Through TLS,
/// bytes are taken only when the records of earlier ones have all left; records the
/// socket refuses wait in the session ([`holds`]).
pub fn send_vectored(key: u32, fd: RawFd, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    with(key, |s| {
        if !flush_session(s, fd)? {
            return Err(ErrorKind::WouldBlock.into());
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut taken = s.writer().write_vectored(bufs)?;
        // More than the session's buffer limit: encrypt the rest while the socket
        // keeps taking records.
        let mut rest: Vec<IoSlice<'_>> = Vec::new();
        while flush_session(s, fd)? && taken < total {
            if rest.is_empty() {
                rest.extend_from_slice(bufs);
                advance(&mut rest, taken);
            }
            let more = s.writer().write_vectored(&rest)?;
            if more == 0 {
                break;
            }
            taken += more;
            advance(&mut rest, more);
        }
        Ok(taken)
    })
    .unwrap_or_else(|| sys::send_vectored_nonblocking(fd, bufs))
}

/// Drops the first `n` bytes of `bufs`.
fn advance(bufs: &mut Vec<IoSlice<'_>>, n: usize) {
    let mut left = bufs.as_mut_slice();
    IoSlice::advance_slices(&mut left, n);
    let remaining = left.len();
    bufs.drain(..bufs.len() - remaining);
}

/// [`send_vectored`] of one buffer.
pub fn send(key: u32, fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    send_vectored(key, fd, &[IoSlice::new(buf)])
}

/// Whether connection `key` has records the socket has not taken yet.
pub fn holds(key: u32) -> bool {
    with(key, |s| s.wants_write()).unwrap_or(false)
}

/// Writes the records connection `key` holds; `Ok(true)` when none are left.
pub fn flush(key: u32, fd: RawFd) -> io::Result<bool> {
    with(key, |s| flush_session(s, fd)).unwrap_or(Ok(true))
}

/// Ends the TLS stream before the write side is shut: a `close_notify`, if the socket
/// takes it.
pub fn close_notify(key: u32, fd: RawFd) {
    with(key, |s| {
        s.send_close_notify();
        let _ = flush_session(s, fd);
    });
}

fn flush_session(s: &mut ServerConnection, fd: RawFd) -> io::Result<bool> {
    while s.wants_write() {
        match s.write_tls(&mut Socket(fd)) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// A connection's socket as rustls reads and writes it: non-blocking calls.
struct Socket(RawFd);

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        sys::recv_nonblocking(self.0, buf)
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        sys::send_nonblocking(self.0, buf)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        sys::send_vectored_nonblocking(self.0, bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::looks_like_plain_http;

    #[test]
    fn a_plain_http_request_is_told_from_a_client_hello() {
        assert!(looks_like_plain_http(b"GET /ws HTTP/1.1\r\n"));
        assert!(looks_like_plain_http(b"OPTIONS * HTTP/1.1\r\n"));
        assert!(!looks_like_plain_http(&[0x16, 0x03, 0x01, 0x02, 0x00]));
        assert!(!looks_like_plain_http(b"GE"));
    }
}
