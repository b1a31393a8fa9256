//! One Redis connection on a shard's runtime: connect under a timeout, AUTH and SELECT,
//! write pipelined commands, decode RESP2 replies and pushes.
//!
//! Reads wait for readiness and then `recv` without blocking into a small buffer owned
//! by the link, so waiting for Redis can be raced against other work (`select!`)
//! without ever dropping an in-flight read.

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;
use redis_protocol::resp2::types::{BorrowedFrame, BytesFrame};

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
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed by Redis")]
    Closed,
    #[error("RESP protocol error: {0}")]
    Protocol(String),
    #[error("Redis refused {what}: {message}")]
    Refused { what: &'static str, message: String },
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

pub struct Link {
    stream: TcpStream,
    fd: RawFd,
    rbuf: BytesMut,
    scratch: Box<[u8]>,
}

impl Link {
    /// Connects, authenticates and selects the database.
    pub async fn connect(url: &RedisUrl, timeout: Duration) -> Result<Self, LinkError> {
        let setup = async {
            let addr = url.address();
            let stream = TcpStream::connect(addr.as_str())
                .await
                .map_err(|source| LinkError::Connect { addr, source })?;
            let _ = stream.set_nodelay(true);
            let mut link = Link {
                fd: stream.as_raw_fd(),
                stream,
                rbuf: BytesMut::with_capacity(16 * 1024),
                scratch: vec![0u8; 64 * 1024].into_boxed_slice(),
            };
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
            if !out.is_empty() {
                link.write(out.freeze()).await?;
                for what in expect {
                    if let BytesFrame::Error(message) = link.next_frame().await? {
                        return Err(LinkError::Refused {
                            what,
                            message: message.to_string(),
                        });
                    }
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
        let (res, _) = self.stream.write_all(buf).await;
        res?;
        Ok(())
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
                    self.rbuf.extend_from_slice(&self.scratch[..n]);
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
