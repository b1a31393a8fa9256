//! The node: what all shards of one process share (its id, the shard inboxes, the
//! message-id sequence) and the code that starts and stops the shard threads.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::Shard;
use crate::config::{Config, Driver};
use crate::metrics::{Counter, ShardMetrics};

/// Messages a shard accepts from other threads.
#[derive(Debug)]
pub enum Inbox {
    /// Deliver an already-framed topic message to local subscribers.
    Publish { topic: Arc<str>, frame: Bytes },
    /// Stop accepting and close every connection with 1001.
    Drain,
}

/// How other threads reach one shard.
#[derive(Debug)]
pub struct ShardLink {
    pub tx: flume::Sender<Inbox>,
    pub metrics: Arc<ShardMetrics>,
    pub cpu: usize,
}

/// State shared by every shard of this process.
#[derive(Debug)]
pub struct Node {
    pub id: String,
    pub shards: Vec<ShardLink>,
    /// The I/O driver the shards run on: "io_uring" or "epoll".
    pub driver: &'static str,
    pub listen: SocketAddr,
    seq: AtomicU64,
    ready: AtomicBool,
    draining: AtomicBool,
    /// Messages accepted for publishing (client or API).
    pub published: Counter,
}

impl Node {
    /// A new message id, `<unix ms>-<sequence>`, unique and increasing within the node.
    pub fn next_message_id(&self) -> String {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        format!("{ms}-{seq}")
    }

    /// Every shard listens and the node is not draining.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.draining.load(Ordering::Acquire)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("driver io_uring requested but io_uring is not available (kernel, io_uring_disabled sysctl or seccomp); use --driver epoll")]
    NoUring,
    #[error("shard {shard} failed to start: {message}")]
    Shard { shard: usize, message: String },
}

/// A started node: its shared state and the shard threads.
pub struct RunningNode {
    pub node: Arc<Node>,
    threads: Vec<JoinHandle<()>>,
}

impl RunningNode {
    /// Asks every shard to drain, then waits for all of them to finish.
    pub fn shutdown(self) {
        self.node.draining.store(true, Ordering::Release);
        for link in &self.node.shards {
            // A full inbox must not block the drain: keep trying briefly.
            let mut msg = Inbox::Drain;
            for _ in 0..500 {
                match link.tx.try_send(msg) {
                    Ok(()) => break,
                    Err(flume::TrySendError::Full(m)) => {
                        msg = m;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(flume::TrySendError::Disconnected(_)) => break,
                }
            }
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Binds one listener per shard, starts the shard threads and waits until all listen.
pub fn start(cfg: Arc<Config>) -> Result<RunningNode, StartError> {
    let cpus = crate::sys::allowed_cpus();
    let count = if cfg.shards == 0 {
        cpus.len()
    } else {
        cfg.shards
    };
    let uring = match cfg.driver {
        Driver::Epoll => false,
        Driver::Auto => monoio::utils::detect_uring(),
        Driver::IoUring if monoio::utils::detect_uring() => true,
        Driver::IoUring => return Err(StartError::NoUring),
    };
    if cfg.driver == Driver::Auto && !uring {
        tracing::warn!(
            "io_uring is not available (kernel, io_uring_disabled or seccomp): using epoll"
        );
    }
    // Bind every listener before starting any thread, so a port clash fails cleanly.
    // The first bind resolves port 0; the others share the port it got.
    let listen_err = |source| StartError::Listen {
        addr: cfg.listen,
        source,
    };
    let first = bind_listener(cfg.listen, cfg.backlog).map_err(listen_err)?;
    let listen = first.local_addr().map_err(listen_err)?;
    let mut listeners = vec![first];
    for _ in 1..count {
        listeners.push(bind_listener(listen, cfg.backlog).map_err(listen_err)?);
    }
    let mut receivers = Vec::with_capacity(count);
    let mut links = Vec::with_capacity(count);
    for i in 0..count {
        let (tx, rx) = flume::bounded(cfg.inbox_capacity);
        receivers.push(rx);
        links.push(ShardLink {
            tx,
            metrics: Arc::new(ShardMetrics::default()),
            cpu: cpus[i % cpus.len()],
        });
    }
    let node = Arc::new(Node {
        id: cfg.node_id(),
        shards: links,
        driver: if uring { "io_uring" } else { "epoll" },
        listen,
        seq: AtomicU64::new(0),
        ready: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        published: Counter::default(),
    });
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut threads = Vec::with_capacity(count);
    for (i, (listener, inbox)) in listeners.into_iter().zip(receivers).enumerate() {
        let (cfg, node, ready) = (cfg.clone(), node.clone(), ready_tx.clone());
        let entries = cfg.uring_entries;
        let spawned = std::thread::Builder::new()
            .name(format!("ringway-shard-{i}"))
            .spawn(move || {
                let cpu = node.shards[i].cpu;
                if let Err(e) = monoio::utils::bind_to_cpu_set([cpu]) {
                    tracing::warn!(shard = i, cpu, error = ?e, "could not pin shard to its CPU");
                }
                let shard_node = node.clone();
                let make = move |on_uring: bool| {
                    let shard = Rc::new(Shard::new(i, cfg, shard_node));
                    super::run(shard, listener, !on_uring, inbox, ready)
                };
                run_on_runtime(uring, entries, i, make);
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                return Err(StartError::Shard {
                    shard: i,
                    message: e.to_string(),
                })
            }
        }
    }
    drop(ready_tx);
    for _ in 0..count {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(message)) => return Err(StartError::Shard { shard: 0, message }),
            Err(_) => {
                return Err(StartError::Shard {
                    shard: 0,
                    message: "exited during start".into(),
                })
            }
        }
    }
    node.ready.store(true, Ordering::Release);
    Ok(RunningNode { node, threads })
}

/// Builds the shard's runtime on the chosen driver and runs the shard to completion.
fn run_on_runtime<F, Fut>(uring: bool, entries: u32, index: usize, make: F)
where
    F: FnOnce(bool) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if uring {
        match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(entries)
            .enable_timer()
            .build()
        {
            Ok(mut rt) => return rt.block_on(make(true)),
            Err(e) => {
                tracing::warn!(shard = index, error = %e, "io_uring runtime failed to start: using epoll")
            }
        }
    }
    match monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
    {
        Ok(mut rt) => rt.block_on(make(false)),
        Err(e) => tracing::error!(shard = index, error = %e, "epoll runtime failed to start"),
    }
}

/// A listening socket with SO_REUSEPORT, so every shard has its own accept queue.
fn bind_listener(addr: SocketAddr, backlog: u32) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}
