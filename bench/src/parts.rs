//! Client processes. One process holds at most ~20,000 sockets here (hard
//! `RLIMIT_NOFILE`), so `--procs P` re-executes this binary P times, each child owning a
//! contiguous slice of the global connection indices. The parent keeps only the
//! orchestration (and the publisher); with `--procs 1` the clients run in-process.
//!
//! Parent and child speak JSON lines: a [`PartCmd`] on the child's stdin, one
//! [`PartReply`] on its stdout. A child finds its slice in the environment variable
//! [`PART_ENV`] (`offset,count,concurrency`), parses the same command line as its
//! parent, and exits after `close` or `churn`, or when its stdin closes (the parent is
//! gone).

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::client::{Client, ClientCfg};
use crate::stats::{ChurnReport, CloseReport, DrainReport, OpenReport};

/// Environment variable that makes this binary a child: `offset,count,concurrency`.
pub const PART_ENV: &str = "RINGWAY_BENCH_PART";

/// Parent → child.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum PartCmd {
    Open {
        timeout_ms: u64,
    },
    Drain {
        published: u64,
        not_ok: Vec<u64>,
        timeout_ms: u64,
    },
    Close,
    Churn {
        timeout_ms: u64,
    },
}

/// Child → parent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum PartReply {
    Opened(OpenReport),
    Drained(DrainReport),
    Closed(CloseReport),
    Churned(ChurnReport),
    Failed { error: String },
}

/// Runs one command on an in-process client.
pub fn execute(client: &mut Option<Client>, cmd: PartCmd) -> PartReply {
    let Some(c) = client.as_ref() else {
        return PartReply::Failed {
            error: "client already closed".into(),
        };
    };
    let r = match cmd {
        PartCmd::Open { timeout_ms } => c
            .open(Duration::from_millis(timeout_ms))
            .map(PartReply::Opened),
        PartCmd::Drain {
            published,
            not_ok,
            timeout_ms,
        } => c
            .drain(
                published,
                not_ok.into_iter().collect::<HashSet<_>>(),
                Duration::from_millis(timeout_ms),
            )
            .map(PartReply::Drained),
        PartCmd::Churn { timeout_ms } => c
            .churn(Duration::from_millis(timeout_ms))
            .map(PartReply::Churned),
        PartCmd::Close => client
            .take()
            .expect("checked above")
            .close()
            .map(PartReply::Closed),
    };
    r.unwrap_or_else(|error| PartReply::Failed { error })
}

/// A slice of the connections, in this process or in a child.
pub enum Part {
    Local {
        client: Option<Client>,
        queued: Option<PartCmd>,
    },
    Child {
        child: Child,
        stdin: Option<ChildStdin>,
        lines: Receiver<String>,
    },
}

impl Part {
    /// The in-process part.
    pub fn local(cfg: ClientCfg) -> std::io::Result<Self> {
        Ok(Self::Local {
            client: Some(Client::start(cfg)?),
            queued: None,
        })
    }

    /// Re-executes this binary with the same arguments as a child owning
    /// `offset .. offset + count`.
    pub fn spawn(offset: u64, count: u64, concurrency: usize) -> std::io::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env(PART_ENV, format!("{offset},{count},{concurrency}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, lines) = mpsc::channel();
        std::thread::Builder::new()
            .name("bench-part-reader".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Self::Child {
            child,
            stdin,
            lines,
        })
    }

    /// Sends a command (a local part runs it in [`Part::recv`]).
    pub fn send(&mut self, cmd: &PartCmd) -> Result<(), String> {
        match self {
            Self::Local { queued, .. } => {
                *queued = Some(cmd.clone());
                Ok(())
            }
            Self::Child { stdin, .. } => {
                let s = stdin.as_mut().ok_or("child stdin closed")?;
                let mut line = serde_json::to_string(cmd).map_err(|e| e.to_string())?;
                line.push('\n');
                s.write_all(line.as_bytes())
                    .and_then(|_| s.flush())
                    .map_err(|e| format!("cannot write to client process: {e}"))
            }
        }
    }

    /// The reply to the last command, waiting at most `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Result<PartReply, String> {
        match self {
            Self::Local { client, queued } => {
                let cmd = queued.take().ok_or("no command sent")?;
                Ok(execute(client, cmd))
            }
            Self::Child { lines, .. } => match lines.recv_timeout(timeout) {
                Ok(line) => serde_json::from_str(&line)
                    .map_err(|e| format!("bad reply from client process: {e}: {line:.200}")),
                Err(RecvTimeoutError::Timeout) => {
                    Err("client process did not answer in time".into())
                }
                Err(RecvTimeoutError::Disconnected) => Err("client process exited".into()),
            },
        }
    }
}

impl Drop for Part {
    fn drop(&mut self) {
        if let Self::Child { child, stdin, .. } = self {
            // Closing stdin tells the child to close its connections and exit.
            drop(stdin.take());
            for _ in 0..100 {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends `cmd` to every part, then gathers one reply from each (in order), all within
/// `timeout`.
pub fn all(parts: &mut [Part], cmd: &PartCmd, timeout: Duration) -> Result<Vec<PartReply>, String> {
    for p in parts.iter_mut() {
        p.send(cmd)?;
    }
    let deadline = std::time::Instant::now() + timeout;
    let mut out = Vec::new();
    for p in parts.iter_mut() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match p.recv(left)? {
            PartReply::Failed { error } => return Err(error),
            r => out.push(r),
        }
    }
    Ok(out)
}

/// The child's main loop: commands from stdin, replies to stdout.
pub fn child_main(cfg: ClientCfg) -> std::process::ExitCode {
    let mut client = match Client::start(cfg) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("ringway-bench child: cannot start client threads: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let cmd: PartCmd = match serde_json::from_str(&line) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("ringway-bench child: bad command: {e}");
                break;
            }
        };
        let last = matches!(cmd, PartCmd::Close | PartCmd::Churn { .. });
        let reply = execute(&mut client, cmd);
        let mut out = serde_json::to_string(&reply).expect("reports serialize");
        out.push('\n');
        if stdout
            .write_all(out.as_bytes())
            .and_then(|_| stdout.flush())
            .is_err()
        {
            break;
        }
        if last {
            break;
        }
    }
    if let Some(c) = client.take() {
        let _ = c.close();
    }
    std::process::ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_replies_round_trip() {
        let c = PartCmd::Drain {
            published: 5,
            not_ok: vec![2],
            timeout_ms: 10,
        };
        let s = serde_json::to_string(&c).unwrap();
        assert!(s.contains("\"cmd\":\"drain\""));
        let back: PartCmd = serde_json::from_str(&s).unwrap();
        assert!(matches!(back, PartCmd::Drain { published: 5, .. }));
        let r = PartReply::Opened(OpenReport {
            opened: 3,
            ..Default::default()
        });
        let back: PartReply = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert!(matches!(back, PartReply::Opened(o) if o.opened == 3));
    }
}
