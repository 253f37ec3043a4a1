//! Verification keys: the configured ones and those of a JWKS file, which is re-read when it
//! changes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;

use super::KeyError;

#[derive(Clone)]
pub(super) struct Key {
    pub(super) alg: Algorithm,
    pub(super) kid: Option<String>,
    pub(super) key: DecodingKey,
}

/// Keys from a JWKS file, swapped whole when the file changes.
pub(super) struct Jwks {
    pub(super) path: PathBuf,
    pub(super) keys: RwLock<Arc<Vec<Key>>>,
    /// Modification time of the file last loaded, to notice changes.
    pub(super) loaded: Mutex<Option<SystemTime>>,
}

impl Jwks {
    pub(super) fn snapshot(&self) -> Arc<Vec<Key>> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Reads a JWKS file. Only asymmetric signature keys with a supported algorithm are used (a
/// shared secret has no place in a key set meant to be public); any other key is skipped
/// and logged, so one key an identity provider adds for another purpose does not fail the
/// set. A set with no usable key is an error: the caller keeps the keys it had.
pub(super) fn load_jwks(path: &Path) -> Result<(Option<SystemTime>, Vec<Key>), KeyError> {
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
pub(super) fn jwk_key(raw: serde_json::Value) -> Result<Key, String> {
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
