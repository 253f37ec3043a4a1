//! Why a session ends, and what the client and the guest are told.

use crate::sandbox::{CloseReason, Fault};

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    /// The client sent Close or the stream ended.
    Client,
    Idle,
    TokenExpired,
    Shutdown,
    SlowClient,
    DeadPeer,
    RateLimited,
    /// An in-band refresh carried a token for another user.
    ForeignRefresh,
    /// An operator closed it (`POST /v1/disconnect`).
    Disconnected,
    /// Cluster mode: the event log did not answer (a feed or a resume).
    LogUnavailable,
    TooBig,
    InvalidUtf8,
    /// The client broke the WebSocket protocol.
    Protocol,
    Transport,
    Fault(Fault),
}

impl End {
    pub(super) fn label(self) -> &'static str {
        match self {
            End::Client => "client",
            End::Idle => "idle",
            End::TokenExpired => "token_expired",
            End::Shutdown => "shutdown",
            End::SlowClient => "slow_client",
            End::DeadPeer => "dead_peer",
            End::RateLimited => "rate_limited",
            End::ForeignRefresh => "foreign_refresh",
            End::Disconnected => "disconnected",
            End::LogUnavailable => "event_log_unavailable",
            End::TooBig => "message_too_big",
            End::InvalidUtf8 => "invalid_utf8",
            End::Protocol => "protocol_error",
            End::Transport => "transport",
            End::Fault(_) => "guest_fault",
        }
    }

    /// The close frame to send, if the socket can still take one.
    pub(super) fn close_frame(self) -> Option<(u16, String)> {
        use super::close_code::*;
        Some(match self {
            End::Client | End::Transport => return None,
            End::Idle => (NORMAL, "idle timeout".into()),
            End::TokenExpired => (POLICY, "token expired".into()),
            End::Shutdown => (
                GOING_AWAY,
                "gateway shutting down; resume with since".into(),
            ),
            End::SlowClient => (SLOW_CLIENT, "slow client".into()),
            End::DeadPeer => (GOING_AWAY, "no answer to pings".into()),
            End::RateLimited => (POLICY, "message rate exceeded".into()),
            End::ForeignRefresh => (POLICY, "refresh token is for another user".into()),
            End::Disconnected => (DISCONNECTED, "disconnected".into()),
            End::LogUnavailable => (
                TRY_AGAIN_LATER,
                "event log unavailable; reconnect with since".into(),
            ),
            End::TooBig => (TOO_BIG, "message too big".into()),
            End::InvalidUtf8 => (INVALID_PAYLOAD, "invalid UTF-8 in text frame".into()),
            End::Protocol => (PROTOCOL, "websocket protocol error".into()),
            End::Fault(f) if f.is_policy() => (POLICY, format!("policy violation: {}", f.as_str())),
            End::Fault(f) => (GUEST_FAULT, format!("guest fault: {}", f.as_str())),
        })
    }

    pub(super) fn guest_reason(self) -> CloseReason {
        match self {
            End::Client => CloseReason::Client,
            End::Idle => CloseReason::Idle,
            // Its credentials no longer hold, as at expiry (the world has no other word).
            End::TokenExpired | End::Disconnected => CloseReason::TokenExpired,
            End::Shutdown | End::LogUnavailable => CloseReason::Shutdown,
            End::SlowClient => CloseReason::SlowClient,
            End::DeadPeer => CloseReason::Client,
            End::RateLimited
            | End::ForeignRefresh
            | End::TooBig
            | End::InvalidUtf8
            | End::Protocol
            | End::Transport
            | End::Fault(_) => CloseReason::Error,
        }
    }
}

/// Maps a read error to how the session ends, so that a bad frame gets its specific code.
pub(super) fn classify(err: axum::Error) -> End {
    use tokio_tungstenite::tungstenite::Error as WsError;
    use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
    match err.into_inner().downcast::<WsError>() {
        Ok(err) => match *err {
            WsError::Capacity(CapacityError::MessageTooLong { .. }) => End::TooBig,
            WsError::Utf8(_) => End::InvalidUtf8,
            // A peer gone without a close handshake is not a protocol breach.
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::Transport,
            WsError::Protocol(_) => End::Protocol,
            _ => End::Transport,
        },
        Err(_) => End::Transport,
    }
}
