//! The only module allowed `unsafe`: thin wrappers over system calls that neither std,
//! socket2 nor monoio expose in the form the memory budget needs.
//!
//! Why: an idle connection must not pin a read buffer. Connections wait for readiness
//! (io_uring PollAdd or epoll) and then read with `recv(MSG_DONTWAIT)` into the shard's
//! scratch buffer; monoio's owned-buffer reads would pin one buffer per idle socket.
//! And everything a connection is owed in one shard tick leaves in one
//! `sendmsg(MSG_DONTWAIT)`, with no task wake-up or ring round trip (BENCHMARKS.md
//! measures both).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Reads what is available on `fd` into `buf` without blocking. `Ok(0)` is EOF;
/// `WouldBlock` means nothing is there.
pub fn recv_nonblocking(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid, exclusively borrowed slice of `buf.len()` writable bytes
    // for the duration of the call; recv writes at most that many. A stale or closed `fd`
    // yields EBADF, not undefined behaviour; callers pass the fd of a socket they own.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// TCP keepalives (`idle`, then every `interval`, `retries` times) and a TCP user
/// timeout on socket `fd`: a peer that vanishes without a reset breaks the connection
/// within seconds instead of the kernel's default quarter of an hour.
pub fn set_liveness(
    fd: RawFd,
    idle: std::time::Duration,
    interval: std::time::Duration,
    retries: u32,
    user_timeout: std::time::Duration,
) -> io::Result<()> {
    // SAFETY: the caller holds the socket open for the duration of this call; the
    // borrowed fd does not outlive it and is only used for setsockopt.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let sock = socket2::SockRef::from(&fd);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(interval)
        .with_retries(retries);
    sock.set_tcp_keepalive(&keepalive)?;
    sock.set_tcp_user_timeout(Some(user_timeout))
}

/// Writes what `fd` takes of `buf` without blocking and without SIGPIPE; returns the
/// bytes written. `WouldBlock` means the socket buffer is full.
pub fn send_nonblocking(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid slice of `buf.len()` readable bytes for the duration of
    // the call; send only reads it. A stale fd yields EBADF, not undefined behaviour;
    // callers pass the fd of a socket they hold open.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Writes what `fd` takes of `bufs`, in order, with one `sendmsg` that neither blocks
/// nor raises SIGPIPE (`writev` has no flags); returns the bytes written. This is how a
/// shard gives a connection everything it is owed in one system call.
pub fn send_vectored_nonblocking(fd: RawFd, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is valid (no name, no control data). `IoSlice` is
    // guaranteed ABI-compatible with `struct iovec` on Unix, and `bufs` outlives the
    // call; sendmsg only reads the slices. A stale fd yields EBADF, not undefined
    // behaviour; callers pass the fd of a socket they hold open.
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = bufs.len() as _;
        libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Shuts the read side of a listening socket: it stops listening (its queued
/// connections go to another `SO_REUSEPORT` listener when `net.ipv4.tcp_migrate_req` is
/// 1) and a pending accept returns an error.
pub fn shutdown_read(fd: RawFd) -> io::Result<()> {
    // SAFETY: shutdown takes no pointers; a stale fd yields EBADF. Callers pass the fd
    // of a listener they own.
    let rc = unsafe { libc::shutdown(fd, libc::SHUT_RD) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Shuts both directions of a connected socket: its pending read sees the end of the
/// stream, so the task reading it gives up.
pub fn shutdown_both(fd: RawFd) -> io::Result<()> {
    // SAFETY: shutdown takes no pointers; callers pass the fd of a socket whose owner
    // is still alive (an upgrade in progress), so it cannot be stale.
    let rc = unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes a connected socket out of the runtime's hands (the reactor reads and writes
/// it from then on). Panics if an operation of the runtime still holds the socket,
/// which no caller allows: the upgrade's reads and writes have all completed.
pub fn into_owned(stream: monoio::net::TcpStream) -> OwnedFd {
    use std::os::fd::IntoRawFd;
    // SAFETY: `into_raw_fd` gives up the runtime's ownership of the descriptor without
    // closing it (and removes it from the epoll driver's set), so it is owned by
    // nobody else from here on.
    unsafe { OwnedFd::from_raw_fd(stream.into_raw_fd()) }
}

/// Shuts the write side of a connected socket (after our close frame): the peer sees
/// EOF once everything queued before it is delivered.
pub fn shutdown_write(fd: RawFd) -> io::Result<()> {
    // SAFETY: shutdown takes no pointers; a stale fd yields EBADF. Callers pass the fd
    // of a socket they own.
    let rc = unsafe { libc::shutdown(fd, libc::SHUT_WR) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A shard's readiness set for its client sockets: an epoll instance (its
/// descriptor is itself readable while any socket in it is ready, so the runtime can
/// wait on it, through io_uring or epoll alike).
pub struct Epoll {
    fd: OwnedFd,
}

/// What a socket became ready for, with the value it was added under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    pub token: u64,
    /// Data, EOF, a reset or an error: read.
    pub read: bool,
    /// Room to write again.
    pub write: bool,
}

impl Epoll {
    pub fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1 takes no pointers.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by epoll_create1 and is owned by nobody else.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Watches `fd` for input, hang-ups and room to write, edge-triggered: each
    /// change is reported once, so a socket that stays idle or writable costs nothing
    /// after it is added. Closing `fd` removes it.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: token,
        };
        // SAFETY: `ev` is a valid epoll_event that outlives the call; the kernel copies
        // it. A stale `fd` yields EBADF.
        let rc = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Takes up to `events.len()` readiness reports without waiting; returns how many.
    pub fn poll(&self, events: &mut [libc::epoll_event]) -> io::Result<usize> {
        // SAFETY: `events` is a valid, exclusively borrowed array of `events.len()`
        // epoll_event structs; the kernel writes at most that many.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                events.as_mut_ptr(),
                events.len().min(i32::MAX as usize) as i32,
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// A second handle on the same epoll instance, as a stream the runtime can wait on
    /// for readability (`monoio::net::UnixStream::from_std`).
    pub fn waitable(&self) -> io::Result<std::os::unix::net::UnixStream> {
        Ok(std::os::unix::net::UnixStream::from(self.fd.try_clone()?))
    }
}

/// Decodes one readiness report.
pub fn ready(ev: &libc::epoll_event) -> Ready {
    let bits = ev.events;
    let read = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
    Ready {
        token: ev.u64,
        read: bits & read != 0,
        write: bits & (libc::EPOLLOUT | libc::EPOLLERR) as u32 != 0,
    }
}

/// CPUs in this process's affinity mask (what `taskset`/systemd `CPUAffinity` allow).
pub fn allowed_cpus() -> Vec<usize> {
    let mut cpus = Vec::new();
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        if let Some(list) = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        {
            for part in list.trim().split(',').filter(|p| !p.is_empty()) {
                let (a, b) = part.split_once('-').unwrap_or((part, part));
                if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                    cpus.extend(a..=b);
                }
            }
        }
    }
    if cpus.is_empty() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        cpus.extend(0..n);
    }
    cpus
}

/// Soft and hard `RLIMIT_NOFILE`.
pub fn nofile_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit struct that outlives the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let (_, hard) = nofile_limit()?;
    let lim = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: `lim` is a valid rlimit struct; setrlimit only reads it.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(hard)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn recv_reports_would_block_data_and_eof() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let mut buf = [0u8; 16];
        let e = recv_nonblocking(server.as_raw_fd(), &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        client.write_all(b"abc").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(recv_nonblocking(server.as_raw_fd(), &mut buf).unwrap(), 3);
        assert_eq!(&buf[..3], b"abc");
        drop(client);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(recv_nonblocking(server.as_raw_fd(), &mut buf).unwrap(), 0);
    }

    #[test]
    fn allowed_cpus_is_not_empty() {
        assert!(!allowed_cpus().is_empty());
    }
}
