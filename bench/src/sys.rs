//! The only `unsafe` in the load generator: the file limit, `sysconf`, and the one socket
//! option socket2 does not wrap (`IP_BIND_ADDRESS_NO_PORT`). Everything else reads
//! `/proc` through `procfs`.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::AsRawFd;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit; raising soft to hard needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// Clock ticks per second for `/proc/PID/stat` times (100 if sysconf fails).
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf reads a constant; no memory is passed.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// Page size in bytes (4096 if sysconf fails).
pub fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant; no memory is passed.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// Sets `IP_BIND_ADDRESS_NO_PORT`, so that `bind(ip:0)` picks the source port at
/// `connect()` time by the full 4-tuple instead of reserving a port for every
/// destination (which would cap a source IP at the ephemeral range, ~28k, across all
/// destinations).
pub fn set_bind_address_no_port(sock: &impl AsRawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: the fd is open (borrowed from a live socket); `one` outlives the call and
    // its size is passed exactly.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Waits up to `timeout_ms` for `sock` to be readable (data, EOF or an error); returns
/// whether it is.
pub fn wait_readable(sock: &impl AsRawFd, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid, writable pollfd for the duration of the call, and the
    // count passed is 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    match rc {
        n if n > 0 => Ok(true),
        0 => Ok(false),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Counters in a file mapped shared by the load generator's processes (the closed-loop
/// window: client processes count deliveries per message, the publisher reads them).
pub struct SharedCounters {
    ptr: std::ptr::NonNull<std::sync::atomic::AtomicU32>,
    len: usize,
}

// SAFETY: the mapping is only reached through `&AtomicU32`, which is Sync; it lives until
// drop, and nothing else frees it.
unsafe impl Send for SharedCounters {}
// SAFETY: as above: every access is an atomic operation.
unsafe impl Sync for SharedCounters {}

impl SharedCounters {
    /// Maps `len` counters of `file`, which must be at least `4 * len` bytes long.
    pub fn map(file: &std::fs::File, len: usize) -> io::Result<Self> {
        let bytes = len * std::mem::size_of::<u32>();
        if file.metadata()?.len() < bytes as u64 || len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "counter file too short",
            ));
        }
        // SAFETY: a fresh shared read-write mapping of an open file of at least `bytes`
        // bytes; the kernel picks the address. The result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(p.cast()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self { ptr, len })
    }

    /// Counter `i mod len`.
    pub fn at(&self, i: u64) -> &std::sync::atomic::AtomicU32 {
        let i = (i % self.len as u64) as usize;
        // SAFETY: `i < len`, the mapping holds `len` properly aligned (page-aligned base)
        // u32s for the life of `self`, and AtomicU32 has the layout of u32.
        unsafe { &*self.ptr.as_ptr().add(i) }
    }
}

impl Drop for SharedCounters {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`, once; no reference into it
        // outlives `self`.
        unsafe {
            libc::munmap(
                self.ptr.as_ptr().cast(),
                self.len * std::mem::size_of::<u32>(),
            );
        }
    }
}
