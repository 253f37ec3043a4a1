//! Token verification, before any upgrade or publish.
//!
//! The key is chosen by the token's `alg` (and `kid`) from the keys the operator configured,
//! and only those algorithms are accepted: there is no `none`, and an HS256 token can never
//! be checked against an RSA public key used as an HMAC secret.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{AuthConfig, Config};

/// The scope a publisher token must carry.
pub const PUBLISH_SCOPE: &str = "events:publish";

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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// Space-separated scopes, as in OAuth 2.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The client's own session id, passed to the handler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
}

impl Claims {
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
        }
    }
}

struct Key {
    alg: Algorithm,
    kid: Option<String>,
    key: DecodingKey,
}

/// Verifies tokens against the configured keys.
pub struct Verifier {
    keys: Vec<Key>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: u64,
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
    #[error("auth.public_keys: algorithm {0:?} is not one of RS256, ES256, EdDSA")]
    Algorithm(String),
    #[error("auth.public_keys: cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
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
        if keys.is_empty() {
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
            issuer: issuer.clone(),
            audience: audience.clone(),
            leeway: *leeway_secs,
        })
    }

    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let mut candidates = self.keys.iter().filter(|k| k.alg == header.alg).peekable();
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
                Ok(data) => return Ok(data.claims),
                Err(err) => {
                    last = classify(err.kind());
                    // Only a bad signature means another key of the same kind may fit.
                    if last != AuthError::Signature {
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
