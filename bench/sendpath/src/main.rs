//! `ringway-sendpath`: what a delivery tick's writes cost on this host, two ways.
//!
//! A tick owes each of N connections a few frames. The gateway gives each connection
//! one `sendmsg(MSG_DONTWAIT)`. The alternative measured here puts the same `SENDMSG`
//! operations, `MSG_DONTWAIT` included, on an io_uring submission queue and submits
//! them in batches of 256 with one `io_uring_enter` each; on loopback every one of them
//! completes inside that call (the program checks it), so the batch keeps the
//! synchronous semantics the tick relies on and saves only the system calls.
//!
//! N loopback TCP pairs; one thread reads every receiving end (epoll), the measuring
//! thread writes. Runs alternate the two ways and the figure is the writing thread's
//! CPU time per `sendmsg`, median over the runs, and the ratio taken run by run.
//!
//!   cargo run --release -p ringway-sendpath -- [pairs=2000] [rounds=200] [frames=1] [runs=6]

use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const BATCH: usize = 256;
const FRAME: usize = 120;

fn main() {
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .map(|s| s.parse().expect("arguments are numbers"))
            .unwrap_or(default)
    };
    let (pairs, rounds, frames, runs) = (arg(1, 2000), arg(2, 200), arg(3, 1), arg(4, 6));
    let (senders, receivers) = connect(pairs);
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        std::thread::spawn(move || drain(receivers, &stop))
    };
    let fds: Vec<RawFd> = senders.iter().map(|s| s.as_raw_fd()).collect();
    let frame = [b'x'; FRAME];
    let iov: Vec<libc::iovec> = (0..frames)
        .map(|_| libc::iovec {
            iov_base: frame.as_ptr() as *mut libc::c_void,
            iov_len: FRAME,
        })
        .collect();
    let mut ring = io_uring::IoUring::new(BATCH as u32).expect("io_uring setup");
    let (mut direct, mut batched, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut sent = 0;
    for run in 0..runs {
        let a = per_send_us(&fds, rounds, &mut sent, |fds| send_each(fds, &iov));
        let b = per_send_us(&fds, rounds, &mut sent, |fds| {
            send_batched(&mut ring, fds, &iov)
        });
        println!(
            "run {run}: sendmsg {a:.2} µs, io_uring batch {b:.2} µs per send (ratio {:.3})",
            b / a
        );
        direct.push(a);
        batched.push(b);
        ratios.push(b / a);
    }
    stop.store(true, Ordering::Relaxed);
    let read = reader.join().expect("reader");
    assert_eq!(read, sent, "every byte sent was read");
    println!(
        "{pairs} connections × {rounds} rounds × {frames} frame(s) of {FRAME} B, {runs} runs: \
         median CPU per send: sendmsg {:.2} µs, io_uring batch {:.2} µs; batch ÷ sendmsg {:.3}",
        median(direct),
        median(batched),
        median(ratios)
    );
}

fn connect(n: usize) -> (Vec<TcpStream>, Vec<TcpStream>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let mut out = (Vec::new(), Vec::new());
    for _ in 0..n {
        let c = TcpStream::connect(addr).expect("connect");
        let (s, _) = l.accept().expect("accept");
        s.set_nodelay(true).expect("nodelay");
        out.0.push(s);
        out.1.push(c);
    }
    out
}

/// The writing thread's CPU time per `sendmsg` over `rounds` ticks of `write`, which
/// returns the bytes it sent (added to `sent`).
fn per_send_us(
    fds: &[RawFd],
    rounds: usize,
    sent: &mut u64,
    mut write: impl FnMut(&[RawFd]) -> u64,
) -> f64 {
    let start = thread_cpu();
    for _ in 0..rounds {
        *sent += write(fds);
    }
    (thread_cpu() - start) / (fds.len() * rounds) as f64 * 1e6
}

fn msghdr(iov: &[libc::iovec]) -> libc::msghdr {
    // SAFETY: msghdr is a plain C struct for which all zeroes is the empty header.
    let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
    h.msg_iov = iov.as_ptr() as *mut libc::iovec;
    h.msg_iovlen = iov.len() as _;
    h
}

fn send_each(fds: &[RawFd], iov: &[libc::iovec]) -> u64 {
    let h = msghdr(iov);
    let mut sent = 0;
    for &fd in fds {
        // SAFETY: `h` points at `iov`, whose buffers outlive the call.
        let n = unsafe { libc::sendmsg(fd, &h, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        assert!(n > 0, "sendmsg: {}", std::io::Error::last_os_error());
        sent += n as u64;
    }
    sent
}

fn send_batched(ring: &mut io_uring::IoUring, fds: &[RawFd], iov: &[libc::iovec]) -> u64 {
    let h = msghdr(iov);
    let mut sent = 0;
    let flags = (libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) as u32;
    for chunk in fds.chunks(BATCH) {
        {
            let mut sq = ring.submission();
            for &fd in chunk {
                let e = io_uring::opcode::SendMsg::new(io_uring::types::Fd(fd), &h)
                    .flags(flags)
                    .build();
                // SAFETY: `h` and the buffers it points at outlive the submission, which
                // completes inside `submit` below (checked after it).
                unsafe { sq.push(&e) }.expect("room for a batch");
            }
        }
        ring.submit().expect("io_uring_enter");
        let mut done = 0;
        for c in ring.completion() {
            assert!(
                c.result() > 0,
                "send: {}",
                std::io::Error::from_raw_os_error(-c.result())
            );
            sent += c.result() as u64;
            done += 1;
        }
        assert_eq!(
            done,
            chunk.len(),
            "every send completed inside the submission"
        );
    }
    sent
}

/// Reads every receiving end until told to stop; returns the bytes read.
fn drain(receivers: Vec<TcpStream>, stop: &AtomicBool) -> u64 {
    // SAFETY: plain system calls on descriptors `receivers` owns for the whole loop.
    unsafe {
        let ep = libc::epoll_create1(0);
        for (i, r) in receivers.iter().enumerate() {
            r.set_nonblocking(true).expect("nonblocking");
            let mut ev = libc::epoll_event {
                events: (libc::EPOLLIN | libc::EPOLLET) as u32,
                u64: i as u64,
            };
            libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, r.as_raw_fd(), &mut ev);
        }
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        let mut idle = 0;
        while !(stop.load(Ordering::Relaxed) && idle > 2) {
            let k = libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 100);
            idle = if k <= 0 { idle + 1 } else { 0 };
            for e in &events[..k.max(0) as usize] {
                let fd = receivers[e.u64 as usize].as_raw_fd();
                loop {
                    let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT);
                    if n <= 0 {
                        break;
                    }
                    total += n as u64;
                }
            }
        }
        libc::close(ep);
        total
    }
}

fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes the current thread's CPU clock into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
