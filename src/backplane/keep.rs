//! The connect-and-backoff loop both of a shard's Redis links run: connect (through the
//! Sentinels when configured, to every master of a cluster: `masters`), serve until
//! the connection fails, then retry with exponential backoff and jitter, or at once
//! when the master is known to have moved.
//! The link's state (and so its gauge), the reconnect counter and the outage log lines
//! are kept here, once for both links.

use std::future::Future;
use std::time::Instant;

use super::link::LinkError;
use super::masters::Masters;
use super::{Backoff, Backplane, LinkState, CONNECT_TIMEOUT};
use crate::shard::Shard;

/// Which of the shard's two links a loop runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Subscriber,
    Commands,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Subscriber => "subscriber",
            Role::Commands => "commands",
        }
    }
}

/// Runs `serve` on one connection after another, for the life of the shard or until
/// it returns `Ok` (the command link, once the shard is stopping and all is answered).
pub async fn keep_connected<F, Fut>(shard: &Shard, bp: &Backplane, role: Role, mut serve: F)
where
    F: FnMut(Masters) -> Fut,
    Fut: Future<Output = Result<(), LinkError>>,
{
    let seed = shard.index as u64 * 2 + if role == Role::Subscriber { 1 } else { 2 };
    let mut backoff = Backoff::new(seed);
    let mut outage: Option<Instant> = None;
    let name = client_name(&shard.node.id, shard.index, role);
    loop {
        if role == Role::Commands && bp.stopping.get() {
            return;
        }
        match Masters::connect(&bp.url, CONNECT_TIMEOUT, &name).await {
            Ok(link) => {
                backoff.reset();
                if let Some(since) = outage.take() {
                    tracing::info!(
                        shard = shard.index,
                        link = role.name(),
                        down_ms = since.elapsed().as_millis() as u64,
                        "redis connection restored; restoring subscriptions and presence"
                    );
                }
                // The subscriber is up only once Redis confirms what it restores.
                let state = match role {
                    Role::Subscriber => LinkState::Syncing,
                    Role::Commands => LinkState::Up,
                };
                bp.set_link(role, state);
                bp.connected_to(link.addr());
                let end = serve(link).await;
                bp.set_link(role, LinkState::Down);
                match end {
                    Ok(()) => return,
                    Err(e) => {
                        shard.metrics.redis_reconnects.inc();
                        tracing::warn!(shard = shard.index, link = role.name(), error = %e, "redis connection lost");
                        outage = Some(Instant::now());
                    }
                }
            }
            Err(e) => {
                if outage.is_none() {
                    tracing::warn!(shard = shard.index, link = role.name(), error = %e, "cannot reach redis; retrying with backoff");
                    outage = Some(Instant::now());
                }
            }
        }
        monoio::select! {
            _ = monoio::time::sleep(backoff.next_delay()) => {}
            _ = bp.retry(role).woken() => {}
        }
    }
}

/// `ringway:<node>:<shard>:<role>`, the name each link gives its connection; characters
/// Redis refuses in a name become `_`.
fn client_name(node: &str, shard: usize, role: Role) -> String {
    format!("ringway:{node}:{shard}:{}", role.name())
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_named_after_node_shard_and_role() {
        assert_eq!(
            client_name("eu-1", 3, Role::Commands),
            "ringway:eu-1:3:commands"
        );
        assert_eq!(
            client_name("a b\nç", 0, Role::Subscriber),
            "ringway:a_b__:0:subscriber"
        );
    }
}
