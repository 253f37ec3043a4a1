//! Token verification, before any upgrade or publish.
//!
//! The key is chosen by the token's `alg` (and `kid`) from the keys the operator configured,
//! and only those algorithms are accepted: there is no `none`, and an HS256 token can never
//! be checked against an RSA public key used as an HMAC secret.

use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{AuthConfig, Config};

mod keys;
mod revocations;

use keys::{Jwks, Key, load_jwks};
pub use revocations::{MAX_REVOCATION_SECS, Revocations, RevocationsFull};

/// The scope a publisher token must carry.
pub const PUBLISH_SCOPE: &str = "events:publish";
/// The scope an operator token needs for `/v1/stats`.
pub const STATS_SCOPE: &str = "gateway:stats";
/// The scope that lets a backend close and revoke a user's sessions (`POST /v1/disconnect`).
pub const DISCONNECT_SCOPE: &str = "sessions:disconnect";
/// The scope that lets a backend ask whether a user is online (`GET /v1/presence`).
pub const PRESENCE_SCOPE: &str = "presence:read";
/// The scope that lets an operator reload the guest (`POST /v1/guest/reload`).
pub const GUEST_RELOAD_SCOPE: &str = "gateway:reload";

/// The claims the gateway reads. Anything else in the token is ignored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Defaulted so that a missing `sub` is reported as such, not as a malformed token.
    #[serde(default)]
    pub sub: String,
    #[serde(default)]
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// A string or an array of strings (RFC 7519, 4.1.3); identity providers send both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
    /// Space-separated scopes, as in OAuth 2.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The client's own session id, passed to the handler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    /// Issued at: an identity-wide revocation refuses the tokens issued before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

/// The `aud` claim in either of its two forms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl From<&str> for Audience {
    fn from(aud: &str) -> Self {
        Audience::One(aud.to_owned())
    }
}

/// Who a connection is, for routing: the token's `sub` within its `tenant` (when the token
/// names one). Two tokens with the same `sub` and different tenants, or one with a tenant
/// and one without, are different identities and never share an event.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub tenant: Option<String>,
    pub user: String,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.tenant {
            Some(tenant) => write!(f, "{tenant}/{}", self.user),
            None => f.write_str(&self.user),
        }
    }
}

impl Claims {
    /// The routing identity these claims bind a connection to.
    pub fn identity(&self) -> Identity {
        Identity {
            tenant: self.tenant.clone(),
            user: self.sub.clone(),
        }
    }

    pub fn scopes(&self) -> impl Iterator<Item = &str> {
        self.scope.as_deref().unwrap_or("").split_whitespace()
    }

    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes().any(|s| s == scope)
    }
}

/// Why a token was refused. The message is what the client sees: short, never the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing token: send Authorization: Bearer <jwt> or ?access_token=<jwt>")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("token algorithm {0} is not accepted")]
    Algorithm(String),
    #[error("token key id is unknown")]
    UnknownKey,
    #[error("token signature is invalid")]
    Signature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token issuer is not accepted")]
    Issuer,
    #[error("token audience is not accepted")]
    Audience,
    #[error("token lacks the {0} claim")]
    MissingClaim(String),
    #[error("token has been revoked")]
    Revoked,
}

impl AuthError {
    /// Short label for metrics and audit records.
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::Algorithm(_) => "algorithm",
            AuthError::UnknownKey => "unknown_kid",
            AuthError::Signature => "signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::Issuer => "issuer",
            AuthError::Audience => "audience",
            AuthError::MissingClaim(_) => "missing_claim",
            AuthError::Revoked => "revoked",
        }
    }
}

/// Verifies tokens against the configured keys.
pub struct Verifier {
    /// The HS256 secret and PEM keys, fixed at start-up.
    keys: Vec<Key>,
    jwks: Option<Jwks>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: u64,
    /// Sessions an operator revoked before their tokens expire.
    pub revocations: Revocations,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let algs: Vec<_> = self.keys.iter().map(|k| k.alg).collect();
        f.debug_struct("Verifier")
            .field("algorithms", &algs)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "no token key configured: set GATEWAY_JWT_SECRET (HS256) or auth.public_keys in the \
         config file"
    )]
    NoKeys,
    #[error("the HS256 secret must be at least 32 bytes")]
    ShortSecret,
    #[error(
        "{0} trust roots are configured (jwt_secret, each of auth.public_keys, auth.jwks_file) \
         and auth.issuer is not set: two issuers could then mint tokens with the same sub for \
         different people, who would share one identity and each other's events. Set \
         auth.issuer so that every token must name the one issuer these keys belong to, or \
         configure a single root"
    )]
    AmbiguousRoots(usize),
    #[error("auth.public_keys: algorithm {0:?} is not one of RS256, ES256, EdDSA")]
    Algorithm(String),
    #[error("auth.public_keys: cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("auth.jwks_file: cannot use {path}: {reason}")]
    Jwks { path: String, reason: String },
    #[error("auth.public_keys: {path} is not a {alg} public key in PEM: {source}")]
    Pem {
        path: String,
        alg: String,
        #[source]
        source: jsonwebtoken::errors::Error,
    },
}

impl Verifier {
    pub fn from_config(config: &Config) -> Result<Self, KeyError> {
        let roots = usize::from(config.jwt_secret.is_some())
            + config.auth.public_keys.len()
            + usize::from(config.auth.jwks_file.is_some());
        if roots > 1 && config.auth.issuer.is_none() {
            return Err(KeyError::AmbiguousRoots(roots));
        }
        let mut keys = Vec::new();
        if let Some(secret) = &config.jwt_secret {
            if secret.len() < 32 {
                return Err(KeyError::ShortSecret);
            }
            keys.push(Key {
                alg: Algorithm::HS256,
                kid: None,
                key: DecodingKey::from_secret(secret.as_bytes()),
            });
        }
        for pk in &config.auth.public_keys {
            let path = pk.pem_file.display().to_string();
            let pem = std::fs::read(&pk.pem_file).map_err(|source| KeyError::Read {
                path: path.clone(),
                source,
            })?;
            let (alg, key) = match pk.alg.as_str() {
                "RS256" => (Algorithm::RS256, DecodingKey::from_rsa_pem(&pem)),
                "ES256" => (Algorithm::ES256, DecodingKey::from_ec_pem(&pem)),
                "EdDSA" => (Algorithm::EdDSA, DecodingKey::from_ed_pem(&pem)),
                other => return Err(KeyError::Algorithm(other.to_owned())),
            };
            let key = key.map_err(|source| KeyError::Pem {
                path,
                alg: pk.alg.clone(),
                source,
            })?;
            keys.push(Key {
                alg,
                kid: pk.kid.clone(),
                key,
            });
        }
        let jwks = match &config.auth.jwks_file {
            Some(path) => {
                let (loaded, keys) = load_jwks(path)?;
                Some(Jwks {
                    path: path.clone(),
                    keys: RwLock::new(Arc::new(keys)),
                    loaded: Mutex::new(loaded),
                })
            }
            None => None,
        };
        if keys.is_empty() && jwks.as_ref().is_none_or(|j| j.snapshot().is_empty()) {
            return Err(KeyError::NoKeys);
        }
        let AuthConfig {
            issuer,
            audience,
            leeway_secs,
            ..
        } = &config.auth;
        Ok(Verifier {
            keys,
            jwks,
            issuer: issuer.clone(),
            audience: audience.clone(),
            leeway: *leeway_secs,
            revocations: Revocations::new(
                config.limits.max_revocations_per_tenant,
                config.limits.max_revocations,
            ),
        })
    }

    /// Re-reads the JWKS file if it changed since it was last loaded (or if `force`).
    /// Returns the number of keys now in use when it reloaded. A broken file keeps the keys
    /// already loaded.
    pub fn reload_jwks(&self, force: bool) -> Result<Option<usize>, KeyError> {
        let Some(jwks) = &self.jwks else {
            return Ok(None);
        };
        let modified = std::fs::metadata(&jwks.path)
            .and_then(|m| m.modified())
            .ok();
        let mut loaded = jwks.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if !force && modified == *loaded {
            return Ok(None);
        }
        let (modified, keys) = load_jwks(&jwks.path)?;
        let count = keys.len();
        // `load_jwks` never returns an empty set: a file emptied by a half-finished rotation
        // must not lock every client out.
        *jwks.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
        *loaded = modified;
        Ok(Some(count))
    }

    /// Clock skew allowed on `exp` and `nbf`. A live connection's token expires at
    /// `exp + leeway`, the same rule that admitted it.
    pub fn leeway_secs(&self) -> u64 {
        self.leeway
    }

    pub fn jwks_path(&self) -> Option<&Path> {
        self.jwks.as_ref().map(|j| j.path.as_path())
    }

    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let rotated = self.jwks.as_ref().map(Jwks::snapshot).unwrap_or_default();
        let mut candidates = self
            .keys
            .iter()
            .chain(rotated.iter())
            .filter(|k| k.alg == header.alg)
            .peekable();
        if candidates.peek().is_none() {
            return Err(AuthError::Algorithm(format!("{:?}", header.alg)));
        }
        let mut candidates = candidates
            .filter(|k| match (&header.kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            })
            .peekable();
        if candidates.peek().is_none() {
            return Err(AuthError::UnknownKey);
        }

        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        required.extend(self.issuer.as_ref().map(|_| "iss"));
        required.extend(self.audience.as_ref().map(|_| "aud"));
        validation.set_required_spec_claims(&required);
        match &self.issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &self.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }

        let mut last = AuthError::Signature;
        for key in candidates {
            match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
                Ok(data) if data.claims.sub.is_empty() => {
                    return Err(AuthError::MissingClaim("sub".into()));
                }
                Ok(data) if self.revocations.refuses(&data.claims, now_secs()) => {
                    return Err(AuthError::Revoked);
                }
                Ok(data) => return Ok(data.claims),
                Err(err) => {
                    last = classify(err.kind());
                    // A claim error is the token's, whatever the key; any other error
                    // (a bad signature, a key that cannot check this token) leaves the
                    // next key of the same algorithm to try.
                    if matches!(
                        last,
                        AuthError::Expired
                            | AuthError::NotYetValid
                            | AuthError::Issuer
                            | AuthError::Audience
                            | AuthError::MissingClaim(_)
                    ) {
                        break;
                    }
                }
            }
        }
        Err(last)
    }
}

fn classify(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::Issuer,
        ErrorKind::InvalidAudience => AuthError::Audience,
        ErrorKind::MissingRequiredClaim(claim) => AuthError::MissingClaim(claim.clone()),
        ErrorKind::InvalidSignature => AuthError::Signature,
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
            AuthError::Algorithm("mismatch".into())
        }
        // A claim of the wrong type (e.g. a numeric `sub`) or bad base64/JSON.
        _ => AuthError::Malformed,
    }
}

/// The token of an `Authorization: Bearer <token>` header, if there is one.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Mints an HS256 token, for `gateway token` and for tests.
pub fn mint_hs256(secret: &str, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

#[cfg(test)]
mod tests;
