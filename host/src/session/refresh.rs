//! The in-band token refresh, handled by the gateway, never seen by the guest.

use crate::AppState;
use crate::auth::Identity;
use crate::sandbox::{Context, Frame};

/// The in-band token refresh, handled by the gateway, never seen by the guest:
/// `{"type":"gateway.refresh","access_token":"<jwt>"}`.
#[derive(serde::Deserialize)]
pub(super) struct Refresh {
    #[serde(rename = "type")]
    kind: String,
    access_token: String,
}

impl Refresh {
    const TYPE: &'static str = "gateway.refresh";

    pub(super) fn parse(text: &str) -> Option<Refresh> {
        // Cheap test first: most client frames are for the guest and are not parsed here.
        if text.len() > 16 << 10 || !text.contains(Self::TYPE) {
            return None;
        }
        serde_json::from_str::<Refresh>(text)
            .ok()
            .filter(|r| r.kind == Self::TYPE)
    }

    pub(super) fn apply(&self, app: &AppState, ctx: &Context, identity: &Identity) -> Refreshed {
        let claims = match app.verifier.verify(&self.access_token) {
            Ok(claims) => claims,
            Err(err) => {
                app.metrics.refusal(err.label());
                tracing::info!(
                    target: "audit",
                    conn = %ctx.connection_id,
                    user = %ctx.user_id,
                    reason = err.label(),
                    "in-band refresh refused"
                );
                let reply = serde_json::json!({
                    "type": "gateway.refresh_failed",
                    "reason": err.to_string(),
                });
                return Refreshed::Refused(Frame::Text(reply.to_string()));
            }
        };
        // The whole identity: the same `sub` in another tenant is someone else.
        if claims.identity() != *identity {
            app.metrics.refusal("foreign_refresh");
            tracing::warn!(
                target: "audit",
                conn = %ctx.connection_id,
                user = %ctx.user_id,
                "refresh with a token for another user: connection closed"
            );
            return Refreshed::ForeignUser;
        }
        // A token of another token session (`sid`) would outlive that session's revocation
        // on a connection opened under the revoked one.
        if claims.sid != ctx.session_id {
            app.metrics.refusal("foreign_session");
            tracing::info!(
                target: "audit",
                conn = %ctx.connection_id,
                user = %ctx.user_id,
                reason = "foreign_session",
                "in-band refresh refused"
            );
            let reply = serde_json::json!({
                "type": "gateway.refresh_failed",
                "reason": "the token is for another session (sid) than this connection's",
            });
            return Refreshed::Refused(Frame::Text(reply.to_string()));
        }
        let reply = serde_json::json!({"type": "gateway.refreshed", "expires_at": claims.exp});
        Refreshed::Renewed(claims.exp, Frame::Text(reply.to_string()))
    }
}

pub(super) enum Refreshed {
    /// New expiry, and the frame confirming it.
    Renewed(u64, Frame),
    /// The token was not valid; the connection lives on until its current expiry.
    Refused(Frame),
    /// A token for another user: the connection closes (policy).
    ForeignUser,
}
