use std::path::PathBuf;
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
        let dir =
            std::env::temp_dir().join(format!("gateway-auth-unit-{}-{test}", std::process::id()));
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
