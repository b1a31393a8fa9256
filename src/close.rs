//! Every WebSocket close code ringway sends, and the closes it starts, in one place
//! (RFC 6455 §7.4.1). The README's "Close codes the gateway sends" lists the same.

use crate::metrics::CloseReason;

/// 1000: the reply to a client's close.
pub const NORMAL: u16 = 1000;
/// 1001: idle timeout, or the server is draining (reconnect elsewhere).
pub const GOING_AWAY: u16 = 1001;
/// 1002: a framing error (unmasked frame, reserved bits or opcode, bad close frame…).
pub const PROTOCOL_ERROR: u16 = 1002;
/// 1003: a binary frame on `/ws`.
pub const UNSUPPORTED_DATA: u16 = 1003;
/// 1007: invalid UTF-8 in a text message or close reason.
pub const INVALID_PAYLOAD: u16 = 1007;
/// 1008: a policy violation: a slow consumer, or a client over its message rate.
pub const POLICY_VIOLATION: u16 = 1008;
/// 1009: a message over `max_message_bytes`.
pub const MESSAGE_TOO_BIG: u16 = 1009;
/// 4001: the client's token expired (plus the leeway) and was not refreshed.
pub const TOKEN_EXPIRED: u16 = 4001;

/// A close the connection's task should perform: the code and reason it sends, and the
/// cause it is counted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseRequest {
    pub code: u16,
    pub reason: &'static str,
    pub why: CloseReason,
}

impl CloseRequest {
    /// The connection's queue overflowed under the `close` policy.
    pub const SLOW_CONSUMER: Self = Self {
        code: POLICY_VIOLATION,
        reason: "slow consumer",
        why: CloseReason::SlowConsumer,
    };
    /// Silent for `idle_timeout_secs`.
    pub const IDLE_TIMEOUT: Self = Self {
        code: GOING_AWAY,
        reason: "idle timeout",
        why: CloseReason::IdleTimeout,
    };
    /// The node drains: reconnect elsewhere.
    pub const SHUTDOWN: Self = Self {
        code: GOING_AWAY,
        reason: "server shutting down",
        why: CloseReason::Shutdown,
    };
    /// The token's `exp` (plus the leeway) passed without a `refresh`.
    pub const TOKEN_EXPIRED: Self = Self {
        code: TOKEN_EXPIRED,
        reason: "token expired",
        why: CloseReason::TokenExpired,
    };
    /// Over `client_messages_per_sec` for `rate_limit_strikes` messages in a row.
    pub const RATE_LIMITED: Self = Self {
        code: POLICY_VIOLATION,
        reason: "rate limited",
        why: CloseReason::RateLimited,
    };
    /// A binary frame on `/ws`.
    pub const BINARY_FRAME: Self = Self {
        code: UNSUPPORTED_DATA,
        reason: "binary frames are not supported",
        why: CloseReason::ProtocolError,
    };
}

/// A close the shard asks a connection to make: one byte in every connection's handle,
/// where a whole `CloseRequest` would take 32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardClose {
    SlowConsumer,
    IdleTimeout,
    Shutdown,
    TokenExpired,
}

impl ShardClose {
    pub fn request(self) -> CloseRequest {
        match self {
            Self::SlowConsumer => CloseRequest::SLOW_CONSUMER,
            Self::IdleTimeout => CloseRequest::IDLE_TIMEOUT,
            Self::Shutdown => CloseRequest::SHUTDOWN,
            Self::TokenExpired => CloseRequest::TOKEN_EXPIRED,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_we_send_is_one_a_peer_may_receive() {
        for code in [
            NORMAL,
            GOING_AWAY,
            PROTOCOL_ERROR,
            UNSUPPORTED_DATA,
            INVALID_PAYLOAD,
            POLICY_VIOLATION,
            MESSAGE_TOO_BIG,
            TOKEN_EXPIRED,
        ] {
            assert!(crate::ws::frame::is_valid_close_code(code), "{code}");
        }
    }
}
