//! Token verification, before any upgrade or publish.
//!
//! The key is chosen by the token's `alg` (and `kid`) from the keys the operator configured,
//! and only those algorithms are accepted: there is no `none`, and an HS256 token can never
//! be checked against an RSA public key used as an HMAC secret.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{AuthConfig, Config};

/// The scope a publisher token must carry.
pub const PUBLISH_SCOPE: &str = "events:publish";
/// The scope an operator token needs for `/v1/stats`.
pub const STATS_SCOPE: &str = "gateway:stats";
/// The scope that lets a backend close and revoke a user's sessions (`POST /v1/disconnect`).
pub const DISCONNECT_SCOPE: &str = "sessions:disconnect";
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

#[derive(Clone)]
struct Key {
    alg: Algorithm,
    kid: Option<String>,
    key: DecodingKey,
}

/// Keys from a JWKS file, swapped whole when the file changes.
struct Jwks {
    path: PathBuf,
    keys: RwLock<Arc<Vec<Key>>>,
    /// Modification time of the file last loaded, to notice changes.
    loaded: Mutex<Option<SystemTime>>,
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

impl Jwks {
    fn snapshot(&self) -> Arc<Vec<Key>> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Reads a JWKS file. Only asymmetric signature keys with a supported algorithm are used (a
/// shared secret has no place in a key set meant to be public); any other key is skipped
/// and logged, so one key an identity provider adds for another purpose does not fail the
/// set. A set with no usable key is an error: the caller keeps the keys it had.
fn load_jwks(path: &Path) -> Result<(Option<SystemTime>, Vec<Key>), KeyError> {
    let fail = |reason: String| KeyError::Jwks {
        path: path.display().to_string(),
        reason,
    };
    #[derive(Deserialize)]
    struct RawSet {
        keys: Vec<serde_json::Value>,
    }
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let set: RawSet = serde_json::from_str(&text).map_err(|e| fail(e.to_string()))?;
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    for (i, raw) in set.keys.into_iter().enumerate() {
        match jwk_key(raw) {
            Ok(key) => keys.push(key),
            Err(reason) => {
                tracing::warn!(path = %path.display(), key = i, %reason, "JWKS key skipped");
                skipped.push(format!("keys[{i}]: {reason}"));
            }
        }
    }
    if keys.is_empty() {
        return Err(fail(if skipped.is_empty() {
            "the key set is empty".into()
        } else {
            format!("no usable key ({})", skipped.join("; "))
        }));
    }
    Ok((modified, keys))
}

/// One JWKS entry as a verification key, or why it cannot be one.
fn jwk_key(raw: serde_json::Value) -> Result<Key, String> {
    let jwk: Jwk = serde_json::from_value(raw).map_err(|e| format!("not a usable JWK: {e}"))?;
    let kid = jwk.common.key_id.clone();
    if let Some(usage) = &jwk.common.public_key_use
        && *usage != PublicKeyUse::Signature
    {
        return Err(format!("key {kid:?} is not for signatures (use {usage:?})"));
    }
    if let Some(ops) = &jwk.common.key_operations
        && !ops.contains(&KeyOperations::Verify)
    {
        return Err(format!(
            "key {kid:?} does not allow verify (key_ops {ops:?})"
        ));
    }
    let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
        (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
        // The curve must be the algorithm's: a P-384 key without `alg` is not an ES256 key.
        (AlgorithmParameters::EllipticCurve(ec), None | Some(KeyAlgorithm::ES256))
            if ec.curve == EllipticCurve::P256 =>
        {
            Algorithm::ES256
        }
        (AlgorithmParameters::OctetKeyPair(okp), None | Some(KeyAlgorithm::EdDSA))
            if okp.curve == EllipticCurve::Ed25519 =>
        {
            Algorithm::EdDSA
        }
        (_, alg) => {
            return Err(format!(
                "key {kid:?}: only RS256, ES256 and EdDSA public keys are accepted (alg {alg:?})"
            ));
        }
    };
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("key {kid:?}: {e}"))?;
    Ok(Key { alg, kid, key })
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

/// Longest a revocation may last: a token outliving it is a token policy problem.
pub const MAX_REVOCATION_SECS: u64 = 30 * 24 * 3600;

/// Tokens refused before their expiry: all of an identity's tokens issued up to a moment
/// (logged out everywhere, account suspended), or those of one token session (`sid`).
/// Each entry lasts until the operator's `until`, which should cover the tokens' lifetime.
///
/// Bounded per tenant (`limits.max_revocations_per_tenant`) and in all
/// (`limits.max_revocations`); past a bound a new revocation is refused, never an old one
/// forgotten early.
#[derive(Debug)]
pub struct Revocations {
    entries: RwLock<RevocationTable>,
    per_tenant: usize,
    total: usize,
}

#[derive(Debug, Default)]
struct RevocationTable {
    entries: HashMap<(Identity, Option<String>), Revocation>,
    /// Entries per tenant, for the quota without a scan.
    per_tenant: HashMap<Option<String>, usize>,
}

#[derive(Debug, Clone, Copy)]
struct Revocation {
    /// When it was made: identity-wide, tokens issued at or before this are refused.
    at: u64,
    until: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RevocationsFull {
    #[error(
        "tenant {tenant:?} holds {limit} revocations in force (limits.max_revocations_per_tenant); \
         the sessions were closed, the tokens are not revoked: retry when some have expired"
    )]
    Tenant {
        tenant: Option<String>,
        limit: usize,
    },
    #[error(
        "{limit} revocations are in force on this node (limits.max_revocations); the sessions \
         were closed, the tokens are not revoked: retry when some have expired"
    )]
    Node { limit: usize },
}

impl Default for Revocations {
    fn default() -> Self {
        let limits = crate::config::Limits::default();
        Self::new(limits.max_revocations_per_tenant, limits.max_revocations)
    }
}

impl Revocations {
    pub fn new(per_tenant: usize, total: usize) -> Self {
        Revocations {
            entries: RwLock::new(RevocationTable::default()),
            per_tenant,
            total,
        }
    }

    /// Refuses, until `until`, the tokens of `sid` (with one) or every token of `identity`
    /// issued up to now (without).
    pub fn revoke(
        &self,
        identity: Identity,
        sid: Option<String>,
        until: u64,
    ) -> Result<(), RevocationsFull> {
        self.revoke_at(identity, sid, now_secs(), until)
    }

    /// Whether a revocation of this target would be held now (one already in force always
    /// is: it is merged).
    pub fn has_room(&self, identity: &Identity, sid: Option<&str>) -> Result<(), RevocationsFull> {
        let table = self.entries.read().unwrap_or_else(|p| p.into_inner());
        self.room(&table, &(identity.clone(), sid.map(str::to_owned)))
    }

    fn room(
        &self,
        table: &RevocationTable,
        key: &(Identity, Option<String>),
    ) -> Result<(), RevocationsFull> {
        if table.entries.contains_key(key) {
            return Ok(());
        }
        let tenant = &key.0.tenant;
        if table.per_tenant.get(tenant).copied().unwrap_or(0) >= self.per_tenant {
            return Err(RevocationsFull::Tenant {
                tenant: tenant.clone(),
                limit: self.per_tenant,
            });
        }
        if table.entries.len() >= self.total {
            return Err(RevocationsFull::Node { limit: self.total });
        }
        Ok(())
    }

    /// [`Revocations::revoke`] as made at `at`: another node's, learnt through the cluster.
    /// A revocation of a target that already has one never weakens it: the two merge into
    /// the later `at` (more tokens refused) and the later `until`.
    pub fn revoke_at(
        &self,
        identity: Identity,
        sid: Option<String>,
        at: u64,
        until: u64,
    ) -> Result<(), RevocationsFull> {
        let mut table = self.entries.write().unwrap_or_else(|p| p.into_inner());
        let key = (identity, sid);
        self.room(&table, &key)?;
        let tenant = key.0.tenant.clone();
        match table.entries.get_mut(&key) {
            Some(held) => {
                held.at = held.at.max(at);
                held.until = held.until.max(until);
            }
            None => {
                table.entries.insert(key, Revocation { at, until });
                *table.per_tenant.entry(tenant).or_default() += 1;
            }
        }
        Ok(())
    }

    /// Whether `claims` belong to a revoked token. A token without `iat` cannot show it
    /// came after an identity-wide revocation, so it is refused while that lasts.
    pub fn refuses(&self, claims: &Claims, now: u64) -> bool {
        let table = self.entries.read().unwrap_or_else(|p| p.into_inner());
        if table.entries.is_empty() {
            return false;
        }
        let identity = claims.identity();
        let whole = table
            .entries
            .get(&(identity.clone(), None))
            .is_some_and(|r| now < r.until && claims.iat.is_none_or(|iat| iat <= r.at));
        let session = claims.sid.as_ref().is_some_and(|sid| {
            table
                .entries
                .get(&(identity, Some(sid.clone())))
                .is_some_and(|r| now < r.until)
        });
        whole || session
    }

    /// Forgets revocations that have run out.
    pub fn expire(&self, now: u64) {
        let mut table = self.entries.write().unwrap_or_else(|p| p.into_inner());
        let RevocationTable {
            entries,
            per_tenant,
        } = &mut *table;
        entries.retain(|(identity, _), r| {
            let keep = now < r.until;
            if !keep && let Some(n) = per_tenant.get_mut(&identity.tenant) {
                *n -= 1;
            }
            keep
        });
        per_tenant.retain(|_, n| *n > 0);
    }

    pub fn len(&self) -> usize {
        self.entries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::http::{HeaderMap, HeaderValue, header::AUTHORIZATION};
    use jsonwebtoken::jwk::Jwk;
    use serde_json::{Value, json};

    use super::*;
    use crate::config::PublicKeyConfig;

    const SECRET: &str = "auth-unit-tests-secret-0123456789abcdef";
    const ISSUER: &str = "https://keys.example";
    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");

    fn fixture(name: &str) -> PathBuf {
        Path::new(FIXTURES).join(name)
    }

    /// The private key of a fixture pair (or the test secret), to sign tokens with.
    fn signing_key(alg: Algorithm) -> EncodingKey {
        let pem = |name: &str| std::fs::read(fixture(name)).unwrap();
        match alg {
            Algorithm::HS256 => EncodingKey::from_secret(SECRET.as_bytes()),
            Algorithm::RS256 | Algorithm::RS384 => {
                EncodingKey::from_rsa_pem(&pem("rsa_private.pem")).unwrap()
            }
            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem("ec_private.pem")).unwrap(),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem("ed_private.pem")).unwrap(),
            other => panic!("no fixture key for {other:?}"),
        }
    }

    fn sign_with(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, key).unwrap()
    }

    fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
        sign_with(alg, kid, &signing_key(alg), claims)
    }

    /// Valid claims for `sub`, issued by [`ISSUER`].
    fn claims(sub: &str) -> Value {
        json!({"sub": sub, "exp": now_secs() + 600, "iss": ISSUER})
    }

    /// `claims` with `fields` set (a null value removes the field).
    fn with(mut claims: Value, fields: Value) -> Value {
        let map = claims.as_object_mut().unwrap();
        for (name, value) in fields.as_object().unwrap() {
            if value.is_null() {
                map.remove(name);
            } else {
                map.insert(name.clone(), value.clone());
            }
        }
        claims
    }

    fn public_key(alg: &str, kid: Option<&str>, file: &str) -> PublicKeyConfig {
        PublicKeyConfig {
            alg: alg.into(),
            kid: kid.map(str::to_owned),
            pem_file: fixture(file),
        }
    }

    /// The HS256 secret as the only trust root.
    fn hs256_config() -> Config {
        Config {
            jwt_secret: Some(SECRET.into()),
            ..Config::default()
        }
    }

    /// One key per asymmetric algorithm (only the RSA one with a `kid`), no secret.
    fn pem_config() -> Config {
        let mut config = Config::default();
        config.auth.issuer = Some(ISSUER.into());
        config.auth.public_keys = vec![
            public_key("RS256", Some("rsa-1"), "rsa_public.pem"),
            public_key("ES256", None, "ec_public.pem"),
            public_key("EdDSA", None, "ed_public.pem"),
        ];
        config
    }

    fn verifier(config: &Config) -> Verifier {
        Verifier::from_config(config).unwrap()
    }

    /// Why `v` refuses `token`; fails the test if it accepts it.
    fn refusal(v: &Verifier, token: &str) -> AuthError {
        match v.verify(token) {
            Ok(claims) => panic!("token accepted: {claims:?}"),
            Err(err) => err,
        }
    }

    /// A directory of its own per test, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(test: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("gateway-auth-unit-{}-{test}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The public JWK of a fixture pair, with `kid` and then `fields` set (a null value
    /// removes the field).
    fn jwk(alg: Algorithm, kid: &str, fields: Value) -> Value {
        let mut jwk =
            serde_json::to_value(Jwk::from_encoding_key(&signing_key(alg), alg).unwrap()).unwrap();
        jwk["kid"] = json!(kid);
        with(jwk, fields)
    }

    /// Writes a key set (or any text) with a chosen modification time, so that a reload
    /// sees a change however coarse the file system's clock is.
    fn write_file(path: &Path, text: &str, modified_secs: u64) {
        std::fs::write(path, text).unwrap();
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(UNIX_EPOCH + Duration::from_secs(modified_secs))
            .unwrap();
    }

    fn key_set(keys: &[Value]) -> String {
        json!({ "keys": keys }).to_string()
    }

    fn jwks_config(path: &Path) -> Config {
        let mut config = Config::default();
        config.auth.jwks_file = Some(path.to_owned());
        config
    }

    #[test]
    fn each_configured_algorithm_verifies_its_own_tokens() {
        let mut config = pem_config();
        config.jwt_secret = Some(SECRET.into());
        let v = verifier(&config);
        for (alg, kid) in [
            (Algorithm::HS256, None),
            (Algorithm::RS256, Some("rsa-1")),
            (Algorithm::ES256, None),
            (Algorithm::EdDSA, None),
        ] {
            let got = v.verify(&sign(alg, kid, &claims("alice")));
            assert_eq!(got.map(|c| c.sub), Ok("alice".into()), "{alg:?}");
        }
    }

    #[test]
    fn an_algorithm_without_a_configured_key_is_refused() {
        let hs = verifier(&hs256_config());
        let rs = sign(Algorithm::RS256, None, &claims("alice"));
        assert_eq!(refusal(&hs, &rs), AuthError::Algorithm("RS256".into()));

        let pem = verifier(&pem_config());
        let hs_token = sign(Algorithm::HS256, None, &claims("alice"));
        assert_eq!(
            refusal(&pem, &hs_token),
            AuthError::Algorithm("HS256".into())
        );
        // Same family, another algorithm: RS384 is not RS256.
        let rs384 = sign(Algorithm::RS384, Some("rsa-1"), &claims("alice"));
        assert_eq!(refusal(&pem, &rs384), AuthError::Algorithm("RS384".into()));
        assert_eq!(AuthError::Algorithm("x".into()).label(), "algorithm");
    }

    #[test]
    fn an_hs256_token_is_never_checked_against_an_rsa_public_key() {
        // The confusion attack: "sign" HS256 with the RSA public key's PEM as the secret.
        let public_pem = std::fs::read(fixture("rsa_public.pem")).unwrap();
        let confused = sign_with(
            Algorithm::HS256,
            Some("rsa-1"),
            &EncodingKey::from_secret(&public_pem),
            &claims("mallory"),
        );
        // Only RSA keys: there is no HS256 key at all.
        assert_eq!(
            refusal(&verifier(&pem_config()), &confused),
            AuthError::Algorithm("HS256".into())
        );
        // A secret beside the RSA key: the token is checked against the secret only.
        let mut both = pem_config();
        both.jwt_secret = Some(SECRET.into());
        assert_eq!(refusal(&verifier(&both), &confused), AuthError::Signature);
    }

    #[test]
    fn kid_selects_the_key_and_an_unknown_kid_is_refused() {
        let v = verifier(&pem_config());
        let unknown = sign(Algorithm::RS256, Some("rsa-2"), &claims("alice"));
        assert_eq!(refusal(&v, &unknown), AuthError::UnknownKey);
        assert_eq!(AuthError::UnknownKey.label(), "unknown_kid");
        // A token without a kid is tried against every key of its algorithm.
        let kidless = sign(Algorithm::RS256, None, &claims("alice"));
        assert!(v.verify(&kidless).is_ok());
        // A key configured without a kid accepts any kid of its algorithm.
        let ec = sign(Algorithm::ES256, Some("whatever"), &claims("alice"));
        assert!(v.verify(&ec).is_ok());
    }

    #[test]
    fn a_wrong_signature_or_a_malformed_token_is_refused() {
        let v = verifier(&hs256_config());
        let other = EncodingKey::from_secret(b"another-secret-another-secret-0123456789");
        let forged = sign_with(Algorithm::HS256, None, &other, &claims("alice"));
        assert_eq!(refusal(&v, &forged), AuthError::Signature);

        // alice's signature over mallory's claims.
        let good = sign(Algorithm::HS256, None, &claims("alice"));
        let mallory = sign(Algorithm::HS256, None, &claims("mallory"));
        let (head, rest) = good.split_once('.').unwrap();
        let signature = rest.rsplit_once('.').unwrap().1;
        let payload = mallory.split('.').nth(1).unwrap();
        let tampered = format!("{head}.{payload}.{signature}");
        assert_eq!(refusal(&v, &tampered), AuthError::Signature);

        assert_eq!(refusal(&v, "not-a-jwt"), AuthError::Malformed);
        assert_eq!(refusal(&v, ""), AuthError::Malformed);
        // Claims of the wrong type: signed, but not what the gateway reads.
        for wrong in [json!({"sub": 7}), json!({"tenant": 7}), json!({"aud": 7})] {
            let token = sign(Algorithm::HS256, None, &with(claims("x"), wrong.clone()));
            assert_eq!(refusal(&v, &token), AuthError::Malformed, "{wrong}");
        }
    }

    #[test]
    fn expiry_and_not_before_are_checked_with_the_leeway() {
        let now = now_secs();
        let expired = sign(
            Algorithm::HS256,
            None,
            &with(claims("a"), json!({"exp": now - 120})),
        );
        let early = sign(
            Algorithm::HS256,
            None,
            &with(claims("a"), json!({"nbf": now + 120})),
        );
        // Within a 60 s leeway (margins of 30 s either way, so a tick cannot flip them).
        let just_expired = sign(
            Algorithm::HS256,
            None,
            &with(claims("a"), json!({"exp": now - 30})),
        );
        let almost_valid = sign(
            Algorithm::HS256,
            None,
            &with(claims("a"), json!({"nbf": now + 30})),
        );

        let mut config = hs256_config();
        config.auth.leeway_secs = 0;
        let strict = verifier(&config);
        assert_eq!(strict.leeway_secs(), 0);
        assert_eq!(refusal(&strict, &expired), AuthError::Expired);
        assert_eq!(refusal(&strict, &just_expired), AuthError::Expired);
        assert_eq!(refusal(&strict, &early), AuthError::NotYetValid);
        assert_eq!(refusal(&strict, &almost_valid), AuthError::NotYetValid);

        config.auth.leeway_secs = 60;
        let lenient = verifier(&config);
        assert_eq!(lenient.leeway_secs(), 60);
        assert_eq!(refusal(&lenient, &expired), AuthError::Expired);
        assert_eq!(refusal(&lenient, &early), AuthError::NotYetValid);
        assert!(lenient.verify(&just_expired).is_ok());
        let claims = lenient.verify(&almost_valid).unwrap();
        assert_eq!(claims.nbf, Some(now + 30));
    }

    #[test]
    fn missing_sub_and_exp_are_reported_as_missing_claims() {
        let v = verifier(&hs256_config());
        for (name, claims) in [
            ("sub", with(claims("a"), json!({"sub": null}))),
            ("sub", with(claims("a"), json!({"sub": ""}))),
            ("exp", with(claims("a"), json!({"exp": null}))),
        ] {
            let err = v
                .verify(&sign(Algorithm::HS256, None, &claims))
                .unwrap_err();
            assert_eq!(err, AuthError::MissingClaim(name.into()), "{claims}");
            assert_eq!(err.label(), "missing_claim");
            assert!(err.to_string().contains(name), "{err}");
        }
    }

    #[test]
    fn audience_may_be_a_string_or_an_array_and_one_element_must_match() {
        let mut config = hs256_config();
        config.auth.audience = Some("agent-events".into());
        let v = verifier(&config);
        let token = |aud: Value| {
            sign(
                Algorithm::HS256,
                None,
                &with(claims("a"), json!({"aud": aud})),
            )
        };

        let one = v.verify(&token(json!("agent-events"))).unwrap();
        assert_eq!(one.aud, Some(Audience::from("agent-events")));
        let many = v
            .verify(&token(json!(["billing", "agent-events"])))
            .unwrap();
        assert_eq!(
            many.aud,
            Some(Audience::Many(vec![
                "billing".into(),
                "agent-events".into()
            ]))
        );
        assert_eq!(refusal(&v, &token(json!("billing"))), AuthError::Audience);
        assert_eq!(
            refusal(&v, &token(json!(["billing", "search"]))),
            AuthError::Audience
        );
        assert_eq!(refusal(&v, &token(json!([]))), AuthError::Audience);
        let no_aud = sign(Algorithm::HS256, None, &claims("a"));
        assert_eq!(refusal(&v, &no_aud), AuthError::MissingClaim("aud".into()));

        // No audience configured: any audience, or none, is accepted.
        let open = verifier(&hs256_config());
        for aud in [json!("billing"), json!(["billing", "search"])] {
            assert!(open.verify(&token(aud.clone())).is_ok(), "{aud}");
        }
        assert!(open.verify(&no_aud).is_ok());
    }

    #[test]
    fn issuer_is_required_and_checked_when_configured() {
        let mut config = hs256_config();
        config.auth.issuer = Some(ISSUER.into());
        let v = verifier(&config);
        let token = |claims: Value| sign(Algorithm::HS256, None, &claims);

        let good = v.verify(&token(claims("a"))).unwrap();
        assert_eq!(good.iss.as_deref(), Some(ISSUER));
        let wrong = with(claims("a"), json!({"iss": "https://evil.example"}));
        assert_eq!(refusal(&v, &token(wrong.clone())), AuthError::Issuer);
        let missing = with(claims("a"), json!({"iss": null}));
        assert_eq!(
            refusal(&v, &token(missing.clone())),
            AuthError::MissingClaim("iss".into())
        );

        // Not configured: not required, and any issuer passes.
        let open = verifier(&hs256_config());
        assert!(open.verify(&token(wrong)).is_ok());
        assert!(open.verify(&token(missing)).is_ok());
    }

    #[test]
    fn identity_is_the_tenant_and_the_sub() {
        let v = verifier(&hs256_config());
        let plain = v
            .verify(&sign(Algorithm::HS256, None, &claims("alice")))
            .unwrap();
        let acme = v
            .verify(&sign(
                Algorithm::HS256,
                None,
                &with(claims("alice"), json!({"tenant": "acme", "sid": "s-1"})),
            ))
            .unwrap();
        let globex = with(claims("alice"), json!({"tenant": "globex"}));
        let globex = v.verify(&sign(Algorithm::HS256, None, &globex)).unwrap();

        assert_eq!(
            acme.identity(),
            Identity {
                tenant: Some("acme".into()),
                user: "alice".into(),
            }
        );
        assert_eq!(acme.sid.as_deref(), Some("s-1"));
        assert_eq!(
            plain.identity(),
            Identity {
                tenant: None,
                user: "alice".into(),
            }
        );
        // One sub, three identities.
        assert_ne!(plain.identity(), acme.identity());
        assert_ne!(acme.identity(), globex.identity());
        assert_eq!(acme.identity().to_string(), "acme/alice");
        assert_eq!(plain.identity().to_string(), "alice");
    }

    #[test]
    fn scopes_are_space_separated() {
        let v = verifier(&hs256_config());
        let scoped = with(
            claims("backend"),
            json!({"scope": " gateway:stats  events:publish "}),
        );
        let scoped = v.verify(&sign(Algorithm::HS256, None, &scoped)).unwrap();
        assert!(scoped.has_scope(PUBLISH_SCOPE));
        assert!(scoped.has_scope(STATS_SCOPE));
        assert!(!scoped.has_scope("events"));
        assert_eq!(scoped.scopes().count(), 2);
        let unscoped = v.verify(&sign(Algorithm::HS256, None, &claims("a")));
        assert!(!unscoped.unwrap().has_scope(PUBLISH_SCOPE));
    }

    #[test]
    fn bearer_reads_only_the_bearer_scheme_case_insensitively() {
        let header = |value: HeaderValue| {
            let mut headers = HeaderMap::new();
            headers.insert(AUTHORIZATION, value);
            headers
        };
        for value in [
            "Bearer abc.def",
            "bearer abc.def",
            "BEARER abc.def",
            "Bearer  abc.def ",
        ] {
            assert_eq!(
                bearer(&header(HeaderValue::from_static(value))),
                Some("abc.def"),
                "{value:?}"
            );
        }
        assert_eq!(bearer(&HeaderMap::new()), None);
        for value in ["Basic YWxhZGRpbjpvcGVu", "Token abc", "Bearer", "Bearerabc"] {
            assert_eq!(
                bearer(&header(HeaderValue::from_static(value))),
                None,
                "{value:?}"
            );
        }
        let not_text = HeaderValue::from_bytes(b"Bearer \xffabc").unwrap();
        assert_eq!(bearer(&header(not_text)), None);
    }

    #[test]
    fn several_trust_roots_need_an_issuer() {
        let dir = TempDir::new("roots");
        let jwks = dir.path("jwks.json");
        write_file(
            &jwks,
            &key_set(&[jwk(Algorithm::ES256, "ec", json!({}))]),
            1_000_000,
        );

        let mut secret_and_pem = hs256_config();
        secret_and_pem.auth.public_keys = vec![public_key("RS256", None, "rsa_public.pem")];
        let mut two_pems = Config::default();
        two_pems.auth.public_keys = pem_config().auth.public_keys[..2].to_vec();
        let mut secret_and_jwks = jwks_config(&jwks);
        secret_and_jwks.jwt_secret = Some(SECRET.into());
        let mut all = pem_config();
        all.jwt_secret = Some(SECRET.into());
        all.auth.jwks_file = Some(jwks.clone());
        all.auth.issuer = None;

        for (config, roots) in [
            (&mut secret_and_pem, 2),
            (&mut two_pems, 2),
            (&mut secret_and_jwks, 2),
            (&mut all, 5),
        ] {
            match Verifier::from_config(config) {
                Err(KeyError::AmbiguousRoots(n)) => assert_eq!(n, roots),
                other => panic!("{roots} roots without an issuer: {other:?}"),
            }
            config.auth.issuer = Some(ISSUER.into());
            assert!(Verifier::from_config(config).is_ok(), "{roots} roots");
        }

        // One root needs no issuer, whichever kind it is.
        for config in [
            hs256_config(),
            jwks_config(&jwks),
            Config {
                auth: AuthConfig {
                    public_keys: vec![public_key("EdDSA", None, "ed_public.pem")],
                    ..AuthConfig::default()
                },
                ..Config::default()
            },
        ] {
            assert!(Verifier::from_config(&config).is_ok(), "{config:?}");
        }
    }

    #[test]
    fn unusable_key_configuration_is_refused_at_start() {
        assert!(matches!(
            Verifier::from_config(&Config::default()),
            Err(KeyError::NoKeys)
        ));
        let short = Config {
            jwt_secret: Some("too-short".into()),
            ..Config::default()
        };
        assert!(matches!(
            Verifier::from_config(&short),
            Err(KeyError::ShortSecret)
        ));
        let mut config = Config::default();
        config.auth.public_keys = vec![public_key("HS256", None, "rsa_public.pem")];
        assert!(matches!(
            Verifier::from_config(&config),
            Err(KeyError::Algorithm(alg)) if alg == "HS256"
        ));
        config.auth.public_keys = vec![public_key("RS256", None, "no-such-file.pem")];
        assert!(matches!(
            Verifier::from_config(&config),
            Err(KeyError::Read { .. })
        ));
        config.auth.public_keys = vec![public_key("RS256", None, "ec_public.pem")];
        assert!(matches!(
            Verifier::from_config(&config),
            Err(KeyError::Pem { .. })
        ));
    }

    #[test]
    fn jwks_keys_not_meant_for_verification_are_skipped() {
        let dir = TempDir::new("skipped");
        let path = dir.path("jwks.json");
        let keys = [
            jwk(Algorithm::RS256, "rsa-enc", json!({"use": "enc"})),
            jwk(
                Algorithm::ES256,
                "ec-sign-only",
                json!({"key_ops": ["sign"]}),
            ),
            jwk(Algorithm::HS256, "oct", json!({})),
            jwk(Algorithm::RS256, "rsa-512", json!({"alg": "RS512"})),
            jwk(Algorithm::RS256, "rsa-unknown", json!({"alg": "XY999"})),
            json!({"kty": "nonsense", "kid": "junk"}),
            jwk(Algorithm::EdDSA, "ed-good", json!({"use": "sig"})),
            jwk(
                Algorithm::ES256,
                "ec-good",
                json!({"alg": null, "key_ops": ["verify"]}),
            ),
        ];
        write_file(&path, &key_set(&keys), 1_000_000);

        let (modified, loaded) = load_jwks(&path).unwrap();
        assert_eq!(modified, Some(UNIX_EPOCH + Duration::from_secs(1_000_000)));
        let loaded: Vec<_> = loaded
            .iter()
            .map(|k| (k.kid.clone().unwrap(), k.alg))
            .collect();
        assert_eq!(
            loaded,
            [
                ("ed-good".to_owned(), Algorithm::EdDSA),
                ("ec-good".to_owned(), Algorithm::ES256),
            ]
        );

        let v = verifier(&jwks_config(&path));
        assert_eq!(v.jwks_path(), Some(path.as_path()));
        for (alg, kid) in [(Algorithm::EdDSA, "ed-good"), (Algorithm::ES256, "ec-good")] {
            assert!(
                v.verify(&sign(alg, Some(kid), &claims("a"))).is_ok(),
                "{kid}"
            );
        }
        // What the skipped keys would have verified.
        assert_eq!(
            refusal(&v, &sign(Algorithm::RS256, Some("rsa-enc"), &claims("a"))),
            AuthError::Algorithm("RS256".into())
        );
        assert_eq!(
            refusal(
                &v,
                &sign(Algorithm::ES256, Some("ec-sign-only"), &claims("a"))
            ),
            AuthError::UnknownKey
        );
        assert_eq!(
            refusal(&v, &sign(Algorithm::HS256, Some("oct"), &claims("a"))),
            AuthError::Algorithm("HS256".into())
        );
    }

    #[test]
    fn a_jwks_file_without_a_usable_key_is_an_error() {
        let dir = TempDir::new("unusable");
        let path = dir.path("jwks.json");
        let reason = |text: &str| {
            write_file(&path, text, 1_000_000);
            match load_jwks(&path) {
                Err(KeyError::Jwks { reason, .. }) => reason,
                Err(other) => panic!("{text}: {other}"),
                Ok((_, keys)) => panic!("{text}: {} keys loaded", keys.len()),
            }
        };
        assert!(reason(r#"{"keys": []}"#).contains("empty"));
        let only_secret = key_set(&[jwk(Algorithm::HS256, "oct", json!({}))]);
        let why = reason(&only_secret);
        assert!(
            why.contains("no usable key") && why.contains("keys[0]"),
            "{why}"
        );
        reason("{ not json");
        reason(r#"{"no_keys": 1}"#);

        // At start-up too, and a missing file the same way.
        write_file(&path, r#"{"keys": []}"#, 1_000_000);
        assert!(matches!(
            Verifier::from_config(&jwks_config(&path)),
            Err(KeyError::Jwks { .. })
        ));
        assert!(matches!(
            Verifier::from_config(&jwks_config(&dir.path("missing.json"))),
            Err(KeyError::Jwks { .. })
        ));
    }

    #[test]
    fn jwks_reload_follows_the_file_and_keeps_the_keys_when_it_is_broken() {
        let dir = TempDir::new("reload");
        let path = dir.path("jwks.json");
        write_file(
            &path,
            &key_set(&[jwk(Algorithm::RS256, "2026-10", json!({}))]),
            1_000_000,
        );
        let v = verifier(&jwks_config(&path));
        let old = sign(Algorithm::RS256, Some("2026-10"), &claims("a"));
        let new = sign(Algorithm::ES256, Some("2026-11"), &claims("a"));
        assert!(v.verify(&old).is_ok());
        assert_eq!(refusal(&v, &new), AuthError::Algorithm("ES256".into()));

        // Unchanged file: nothing to do unless forced.
        assert_eq!(v.reload_jwks(false).unwrap(), None);
        assert_eq!(v.reload_jwks(true).unwrap(), Some(1));

        // Rotated: noticed by its modification time.
        write_file(
            &path,
            &key_set(&[jwk(Algorithm::ES256, "2026-11", json!({}))]),
            1_000_010,
        );
        assert_eq!(v.reload_jwks(false).unwrap(), Some(1));
        assert!(v.verify(&new).is_ok());
        assert_eq!(refusal(&v, &old), AuthError::Algorithm("RS256".into()));
        assert_eq!(v.reload_jwks(false).unwrap(), None);

        // Broken or emptied files fail the reload and keep the keys in use, forced or not.
        for (text, modified) in [
            ("{ not json", 1_000_020),
            (r#"{"keys": []}"#, 1_000_030),
            (
                &*key_set(&[jwk(Algorithm::HS256, "oct", json!({}))]),
                1_000_040,
            ),
        ] {
            write_file(&path, text, modified);
            assert!(v.reload_jwks(false).is_err(), "{text}");
            assert!(v.reload_jwks(true).is_err(), "{text}");
            assert!(v.verify(&new).is_ok(), "{text}");
        }
        // A failed reload does not count as loaded: fixing the file is picked up.
        write_file(
            &path,
            &key_set(&[
                jwk(Algorithm::ES256, "2026-11", json!({})),
                jwk(Algorithm::RS256, "2026-10", json!({})),
            ]),
            1_000_050,
        );
        assert_eq!(v.reload_jwks(false).unwrap(), Some(2));
        assert!(v.verify(&old).is_ok() && v.verify(&new).is_ok());

        // The file gone: an error, and the keys stay.
        std::fs::remove_file(&path).unwrap();
        assert!(v.reload_jwks(false).is_err());
        assert!(v.verify(&new).is_ok());

        // Without a JWKS file there is nothing to reload.
        assert_eq!(verifier(&hs256_config()).reload_jwks(true).unwrap(), None);
    }

    #[test]
    fn revocations_are_bounded_per_tenant_and_never_weakened() {
        let revocations = Revocations::new(2, 3);
        let who = |tenant: &str, user: &str| Identity {
            tenant: Some(tenant.into()),
            user: user.into(),
        };
        let now = now_secs();
        revocations.revoke(who("a", "u1"), None, now + 100).unwrap();
        revocations.revoke(who("a", "u2"), None, now + 100).unwrap();
        // Tenant a is at its quota; tenant b is not affected by it.
        assert!(matches!(
            revocations.revoke(who("a", "u3"), None, now + 100),
            Err(RevocationsFull::Tenant { limit: 2, .. })
        ));
        assert!(
            revocations.has_room(&who("a", "u1"), None).is_ok(),
            "held: merged"
        );
        revocations.revoke(who("b", "u1"), None, now + 100).unwrap();
        // The node-wide bound.
        assert!(matches!(
            revocations.revoke(who("c", "u1"), None, now + 100),
            Err(RevocationsFull::Node { limit: 3 })
        ));
        // A shorter revocation of the same target does not shorten the one in force.
        revocations
            .revoke_at(who("a", "u1"), None, now, now + 5)
            .unwrap();
        let token = Claims {
            sub: "u1".into(),
            exp: now + 3600,
            nbf: None,
            iss: None,
            aud: None,
            scope: None,
            tenant: Some("a".into()),
            sid: None,
            iat: Some(now),
        };
        assert!(revocations.refuses(&token, now + 50));
        // Expiry frees the tenant's quota.
        revocations.expire(now + 100);
        assert!(revocations.is_empty());
        revocations.revoke(who("a", "u3"), None, now + 200).unwrap();
    }

    #[test]
    fn revocations_hold_until_their_end_and_then_are_forgotten() {
        let revocations = Revocations::default();
        let now = now_secs();
        let claims = |sid: Option<&str>, iat: Option<u64>| Claims {
            sub: "alice".into(),
            exp: now + 3600,
            nbf: None,
            iss: None,
            aud: None,
            scope: None,
            tenant: None,
            sid: sid.map(Into::into),
            iat,
        };
        let alice = claims(None, None).identity();
        revocations
            .revoke(alice.clone(), Some("s1".into()), now + 10)
            .unwrap();
        assert!(revocations.refuses(&claims(Some("s1"), Some(now)), now));
        assert!(!revocations.refuses(&claims(Some("s2"), Some(now)), now));
        assert!(!revocations.refuses(&claims(None, Some(now)), now));
        revocations.revoke(alice, None, now + 20).unwrap();
        assert!(revocations.refuses(&claims(None, Some(now)), now));
        assert!(revocations.refuses(&claims(None, None), now));
        assert!(!revocations.refuses(&claims(None, Some(now + 1)), now));
        // At its end a revocation stops refusing, and expiry forgets it.
        assert!(revocations.refuses(&claims(Some("s1"), Some(now + 1)), now + 9));
        assert!(!revocations.refuses(&claims(Some("s1"), Some(now + 1)), now + 10));
        revocations.expire(now + 10);
        assert_eq!(revocations.len(), 1);
        revocations.expire(now + 20);
        assert!(revocations.is_empty());
    }
}
