//! Bearer-token authentication: a JWT in `Authorization: Bearer ...` becomes a [`Principal`].
//!
//! Signatures are verified against configured public keys (ES256 or RS256 only: `alg: none`
//! and HMAC are refused because the header's algorithm must be one the key was configured
//! for); `exp` and `aud` are always checked, and the claims `sub`, `role`, `org` and `purpose`
//! are required.
//!
//! # Why verified tokens are remembered
//! A portal sends the same bearer token with every request for the token's lifetime, and an
//! ES256 signature check costs about 3 million instructions (a third of a cached
//! `$everything`, measured with callgrind). So a token that verified is remembered, keyed by
//! the SHA-256 of its bytes (the token itself is never kept), with the instant it stops being
//! acceptable (`exp` plus the leeway). Keys, audience and issuer are fixed for a
//! [`Verifier`]'s life, so a remembered decision stays right until that instant; a token that
//! fails is never remembered, so a bad token costs a full check every time. The memory is
//! bounded: when full, expired entries go, and if none have expired, all do.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use connectors::OdsCode;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::principal::Principal;

/// Most verified tokens remembered at once.
const MAX_REMEMBERED: usize = 4096;

/// The demo region's signing key. It is public (it is in this repository): tokens it signs
/// prove nothing, and `tributary serve` never trusts it unless a config names its public half.
const DEMO_SIGNING_KEY: &[u8] = include_bytes!("demo-signing-key.pem");
/// The public half of [`DEMO_SIGNING_KEY`].
pub const DEMO_VERIFYING_KEY: &str = include_str!("demo-verifying-key.pem");
/// The key id demo tokens carry.
pub const DEMO_KEY_ID: &str = "tributary-demo";
/// The audience demo tokens are minted for.
pub const DEMO_AUDIENCE: &str = "tributary";

/// Why a request is not authenticated. Messages are safe to return to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token: send `Authorization: Bearer <token>`")]
    Missing,
    #[error("the Authorization header is not a bearer token")]
    NotBearer,
    #[error("the bearer token has expired")]
    Expired,
    #[error("the bearer token's signature does not verify")]
    BadSignature,
    #[error("the bearer token's algorithm is not accepted (ES256 or RS256 only)")]
    BadAlgorithm,
    #[error("the bearer token is for another audience")]
    BadAudience,
    #[error("the bearer token is not valid yet")]
    NotYetValid,
    #[error("the bearer token lacks a required claim or a claim is malformed: {0}")]
    BadClaims(String),
    #[error("the bearer token is malformed")]
    Malformed,
}

impl AuthError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::NotBearer => "not_bearer",
            Self::Expired => "expired",
            Self::BadSignature => "bad_signature",
            Self::BadAlgorithm => "bad_algorithm",
            Self::BadAudience => "bad_audience",
            Self::NotYetValid => "not_yet_valid",
            Self::BadClaims(_) => "bad_claims",
            Self::Malformed => "malformed",
        }
    }
}

/// The claims a token must carry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    /// National RBAC role code.
    pub role: String,
    /// The caller's organisation's ODS code.
    pub org: String,
    pub purpose: String,
    /// One audience or several (RFC 7519 allows both); jsonwebtoken checks ours is among them.
    pub aud: Audience,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
}

/// The `aud` claim: a string or an array of strings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

/// One trusted public key.
#[derive(Clone)]
pub struct TrustedKey {
    pub kid: Option<String>,
    pub algorithm: Algorithm,
    pub key: DecodingKey,
}

impl std::fmt::Debug for TrustedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustedKey")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .finish()
    }
}

impl TrustedKey {
    /// Reads a PEM public key for `algorithm` (`ES256` or `RS256`).
    pub fn from_pem(kid: Option<String>, algorithm: &str, pem: &[u8]) -> Result<Self, String> {
        let (algorithm, key) = match algorithm {
            "ES256" => (Algorithm::ES256, DecodingKey::from_ec_pem(pem)),
            "RS256" => (Algorithm::RS256, DecodingKey::from_rsa_pem(pem)),
            other => {
                return Err(format!(
                    "algorithm `{other}` is not accepted: use ES256 or RS256"
                ));
            }
        };
        let key = key.map_err(|e| format!("not a PEM public key for {algorithm:?}: {e}"))?;
        Ok(Self {
            kid,
            algorithm,
            key,
        })
    }

    pub fn from_pem_file(
        kid: Option<String>,
        algorithm: &str,
        path: &Path,
    ) -> Result<Self, String> {
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::from_pem(kid, algorithm, &pem)
    }

    /// The demo key's public half.
    pub fn demo() -> Self {
        match Self::from_pem(
            Some(DEMO_KEY_ID.to_owned()),
            "ES256",
            DEMO_VERIFYING_KEY.as_bytes(),
        ) {
            Ok(key) => key,
            // The key is compiled in and covered by a test; this cannot fail at run time.
            Err(e) => panic!("embedded demo key is invalid: {e}"),
        }
    }
}

/// Verifies bearer tokens.
#[derive(Debug, Clone)]
pub struct Verifier {
    keys: Vec<TrustedKey>,
    audience: String,
    issuer: Option<String>,
    leeway: Duration,
    remembered: Arc<Mutex<Remembered>>,
}

/// Tokens that verified, by the SHA-256 of the token: the principal and the first second (Unix
/// time) at which the token is no longer accepted.
#[derive(Debug, Default)]
struct Remembered {
    tokens: HashMap<[u8; 32], (Principal, u64)>,
}

impl Remembered {
    fn get(&self, key: &[u8; 32], now: u64) -> Option<Result<Principal, AuthError>> {
        let (principal, expires) = self.tokens.get(key)?;
        Some(if now < *expires {
            Ok(principal.clone())
        } else {
            Err(AuthError::Expired)
        })
    }

    fn insert(&mut self, key: [u8; 32], principal: Principal, expires: u64, now: u64) {
        if self.tokens.len() >= MAX_REMEMBERED {
            self.tokens.retain(|_, (_, e)| now < *e);
            if self.tokens.len() >= MAX_REMEMBERED {
                self.tokens.clear();
            }
        }
        self.tokens.insert(key, (principal, expires));
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Verifier {
    pub fn new(keys: Vec<TrustedKey>, audience: impl Into<String>, issuer: Option<String>) -> Self {
        Self {
            keys,
            audience: audience.into(),
            issuer,
            leeway: Duration::from_secs(30),
            remembered: Arc::default(),
        }
    }

    /// Verifies an `Authorization` header value.
    pub fn verify_header(&self, header: Option<&str>) -> Result<Principal, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let (scheme, token) = header.trim().split_once(' ').ok_or(AuthError::NotBearer)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::NotBearer);
        }
        self.verify(token.trim())
    }

    /// Verifies a compact JWT, or finds it among the tokens that verified before.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        self.verify_at(token, unix_now())
    }

    /// [`Self::verify`] with the clock given, so that expiry of a remembered token is testable.
    fn verify_at(&self, token: &str, now: u64) -> Result<Principal, AuthError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let remembered = self
            .remembered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key, now);
        if let Some(decision) = remembered {
            return decision;
        }
        let (principal, exp) = self.verify_signed(token)?;
        let expires = exp.saturating_add(self.leeway.as_secs()).saturating_add(1);
        self.remembered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, principal.clone(), expires, now);
        Ok(principal)
    }

    /// The full check: signature, algorithm, `exp`, `nbf`, `aud`, `iss` and the claims. Returns
    /// the principal and the token's `exp`.
    fn verify_signed(&self, token: &str) -> Result<(Principal, u64), AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::InvalidAlgorithmName
            | ErrorKind::UnsupportedAlgorithm
            | ErrorKind::InvalidAlgorithm => AuthError::BadAlgorithm,
            _ => AuthError::Malformed,
        })?;
        let candidates: Vec<&TrustedKey> = self
            .keys
            .iter()
            .filter(|k| k.algorithm == header.alg)
            .filter(|k| match (&header.kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            })
            .collect();
        if candidates.is_empty() {
            return Err(if self.keys.iter().any(|k| k.algorithm == header.alg) {
                AuthError::BadSignature
            } else {
                AuthError::BadAlgorithm
            });
        }
        let mut last = AuthError::BadSignature;
        for key in candidates {
            let mut validation = Validation::new(key.algorithm);
            validation.set_audience(&[&self.audience]);
            // A configured issuer must be present, not merely right when present.
            if self.issuer.is_some() {
                validation.set_required_spec_claims(&["exp", "aud", "sub", "iss"]);
            } else {
                validation.set_required_spec_claims(&["exp", "aud", "sub"]);
            }
            validation.leeway = self.leeway.as_secs();
            validation.validate_nbf = true;
            if let Some(iss) = &self.issuer {
                validation.set_issuer(&[iss]);
            }
            match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => {
                    let exp = data.claims.exp;
                    return principal_from(data.claims).map(|p| (p, exp));
                }
                Err(e) => {
                    last = match e.kind() {
                        ErrorKind::ExpiredSignature => return Err(AuthError::Expired),
                        ErrorKind::InvalidAudience => return Err(AuthError::BadAudience),
                        ErrorKind::ImmatureSignature => return Err(AuthError::NotYetValid),
                        ErrorKind::InvalidIssuer => {
                            return Err(AuthError::BadClaims("iss".to_owned()));
                        }
                        ErrorKind::MissingRequiredClaim(c) => {
                            return Err(AuthError::BadClaims(c.clone()));
                        }
                        ErrorKind::Json(_) | ErrorKind::InvalidClaimFormat(_) => {
                            return Err(AuthError::BadClaims(
                                "sub, role, org, purpose, aud and exp must all be present and strings (exp a number)".to_owned(),
                            ));
                        }
                        ErrorKind::InvalidAlgorithm => AuthError::BadAlgorithm,
                        ErrorKind::InvalidSignature => AuthError::BadSignature,
                        _ => AuthError::Malformed,
                    }
                }
            }
        }
        Err(last)
    }
}

fn principal_from(claims: Claims) -> Result<Principal, AuthError> {
    for (name, value) in [
        ("sub", &claims.sub),
        ("role", &claims.role),
        ("org", &claims.org),
        ("purpose", &claims.purpose),
    ] {
        if value.trim().is_empty() {
            return Err(AuthError::BadClaims(name.to_owned()));
        }
    }
    Ok(Principal {
        sub: claims.sub,
        role: claims.role,
        org: OdsCode::new(claims.org.trim().to_ascii_uppercase()),
        purpose: claims.purpose,
    })
}

/// Mints a token signed with the demo key (`tributary token`, the demo, tests).
pub fn mint_demo_token(
    sub: &str,
    role: &str,
    org: &str,
    purpose: &str,
    ttl: Duration,
) -> Result<String, String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| format!("system clock before 1970: {e}"))?
        .as_secs();
    let claims = Claims {
        sub: sub.to_owned(),
        role: role.to_owned(),
        org: org.to_owned(),
        purpose: purpose.to_owned(),
        aud: Audience::One(DEMO_AUDIENCE.to_owned()),
        exp: now + ttl.as_secs(),
        iat: Some(now),
        iss: None,
    };
    sign_demo(&claims)
}

/// Signs arbitrary claims with the demo key (tests use it to build bad tokens too).
pub fn sign_demo<T: Serialize>(claims: &T) -> Result<String, String> {
    let key =
        EncodingKey::from_ec_pem(DEMO_SIGNING_KEY).map_err(|e| format!("demo signing key: {e}"))?;
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(DEMO_KEY_ID.to_owned());
    jsonwebtoken::encode(&header, claims, &key).map_err(|e| format!("cannot sign token: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use base64::Engine as _;

    use super::*;

    fn verifier() -> Verifier {
        Verifier::new(vec![TrustedKey::demo()], DEMO_AUDIENCE, None)
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    }

    #[test]
    fn a_minted_token_verifies_into_its_principal() {
        let token =
            mint_demo_token("u1", "R8000", "RXL", "direct-care", Duration::from_secs(60)).unwrap();
        let p = verifier()
            .verify_header(Some(&format!("Bearer {token}")))
            .unwrap();
        assert_eq!(
            (
                p.sub.as_str(),
                p.role.as_str(),
                p.org.as_str(),
                p.purpose.as_str()
            ),
            ("u1", "R8000", "RXL", "direct-care")
        );
    }

    #[test]
    fn missing_and_non_bearer_headers_are_refused() {
        assert_eq!(verifier().verify_header(None), Err(AuthError::Missing));
        assert_eq!(
            verifier().verify_header(Some("Basic dXNlcjpwdw==")),
            Err(AuthError::NotBearer)
        );
        assert_eq!(
            verifier().verify_header(Some("Bearer not.a.jwt")),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn expired_tokens_are_refused() {
        let claims = Claims {
            sub: "u1".into(),
            role: "R8000".into(),
            org: "RXL".into(),
            purpose: "direct-care".into(),
            aud: Audience::One(DEMO_AUDIENCE.into()),
            exp: 1_000,
            iat: None,
            iss: None,
        };
        assert_eq!(
            verifier().verify(&sign_demo(&claims).unwrap()),
            Err(AuthError::Expired)
        );
    }

    #[test]
    fn alg_none_and_hmac_tokens_are_refused() {
        let body = b64(
            r#"{"sub":"u1","role":"R8000","org":"RXL","purpose":"direct-care","aud":"tributary","exp":99999999999}"#,
        );
        let none = format!("{}.{body}.", b64(r#"{"alg":"none","typ":"JWT"}"#));
        assert!(matches!(
            verifier().verify(&none),
            Err(AuthError::BadAlgorithm | AuthError::Malformed)
        ));
        let hs = format!("{}.{body}.c2ln", b64(r#"{"alg":"HS256","typ":"JWT"}"#));
        assert_eq!(verifier().verify(&hs), Err(AuthError::BadAlgorithm));
    }

    /// A clerk's genuine token, and the same with its payload rewritten to a clinician's,
    /// keeping the signature.
    fn tampered_token() -> (String, String) {
        let token =
            mint_demo_token("u1", "R8008", "RXL", "direct-care", Duration::from_secs(60)).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let forged = b64(
            r#"{"sub":"u1","role":"R8000","org":"RXL","purpose":"direct-care","aud":"tributary","exp":99999999999}"#,
        );
        let tampered = format!("{}.{forged}.{}", parts[0], parts[2]);
        (token, tampered)
    }

    #[test]
    fn a_tampered_payload_fails_the_signature() {
        let (_, tampered) = tampered_token();
        assert_eq!(verifier().verify(&tampered), Err(AuthError::BadSignature));
    }

    #[test]
    fn an_audience_array_is_accepted_and_a_configured_issuer_is_required() {
        let claims = |extra: serde_json::Value| {
            let mut c = serde_json::json!({"sub":"u1","role":"R8000","org":"RXL","purpose":"x","aud":["other","tributary"],"exp":99999999999u64});
            c.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            sign_demo(&c).unwrap()
        };
        assert!(verifier().verify(&claims(serde_json::json!({}))).is_ok());
        let pinned = Verifier::new(
            vec![TrustedKey::demo()],
            DEMO_AUDIENCE,
            Some("https://issuer.example".into()),
        );
        assert!(
            matches!(
                pinned.verify(&claims(serde_json::json!({}))),
                Err(AuthError::BadClaims(_))
            ),
            "no iss at all"
        );
        assert!(matches!(
            pinned.verify(&claims(serde_json::json!({"iss": "https://other.example"}))),
            Err(AuthError::BadClaims(_))
        ));
        assert!(
            pinned
                .verify(&claims(
                    serde_json::json!({"iss": "https://issuer.example"})
                ))
                .is_ok()
        );
    }

    #[test]
    fn wrong_audience_and_missing_claims_are_refused() {
        let wrong_aud = serde_json::json!({"sub":"u1","role":"R8000","org":"RXL","purpose":"x","aud":"other","exp":99999999999u64});
        assert_eq!(
            verifier().verify(&sign_demo(&wrong_aud).unwrap()),
            Err(AuthError::BadAudience)
        );
        let no_purpose = serde_json::json!({"sub":"u1","role":"R8000","org":"RXL","aud":"tributary","exp":99999999999u64});
        assert!(matches!(
            verifier().verify(&sign_demo(&no_purpose).unwrap()),
            Err(AuthError::BadClaims(_))
        ));
        let empty_role = serde_json::json!({"sub":"u1","role":"","org":"RXL","purpose":"x","aud":"tributary","exp":99999999999u64});
        assert_eq!(
            verifier().verify(&sign_demo(&empty_role).unwrap()),
            Err(AuthError::BadClaims("role".into()))
        );
    }

    fn remembered(v: &Verifier) -> usize {
        v.remembered.lock().unwrap().tokens.len()
    }

    #[test]
    fn a_verified_token_is_remembered_and_answers_the_same_principal() {
        let v = verifier();
        let token =
            mint_demo_token("u1", "R8000", "RXL", "direct-care", Duration::from_secs(60)).unwrap();
        let first = v.verify(&token).unwrap();
        assert_eq!(remembered(&v), 1);
        let again = v.verify(&token).unwrap();
        assert_eq!(first, again);
        assert_eq!(remembered(&v), 1, "the same token is one entry");
        // Clones of a verifier (one per facade) share what they remember.
        assert_eq!(v.clone().verify(&token).unwrap(), first);
        let other =
            mint_demo_token("u2", "R8001", "RXL", "direct-care", Duration::from_secs(60)).unwrap();
        assert_eq!(v.verify(&other).unwrap().sub, "u2");
        assert_eq!(remembered(&v), 2);
    }

    #[test]
    fn a_remembered_token_is_refused_once_past_exp_and_leeway() {
        let v = verifier();
        let now = unix_now();
        let exp = now + 60;
        let token = sign_demo(&Claims {
            sub: "u1".into(),
            role: "R8000".into(),
            org: "RXL".into(),
            purpose: "direct-care".into(),
            aud: Audience::One(DEMO_AUDIENCE.into()),
            exp,
            iat: None,
            iss: None,
        })
        .unwrap();
        assert!(v.verify_at(&token, now).is_ok());
        // Still inside the leeway: accepted, as the full check would.
        assert!(v.verify_at(&token, exp + 30).is_ok());
        assert_eq!(v.verify_at(&token, exp + 31), Err(AuthError::Expired));
        assert_eq!(v.verify_at(&token, exp + 3600), Err(AuthError::Expired));
    }

    #[test]
    fn tokens_that_fail_are_never_remembered() {
        let v = verifier();
        let (token, tampered) = tampered_token();
        for _ in 0..2 {
            assert_eq!(v.verify(&tampered), Err(AuthError::BadSignature));
        }
        let wrong_aud = serde_json::json!({"sub":"u1","role":"R8000","org":"RXL","purpose":"x","aud":"other","exp":99999999999u64});
        assert_eq!(
            v.verify(&sign_demo(&wrong_aud).unwrap()),
            Err(AuthError::BadAudience)
        );
        assert_eq!(remembered(&v), 0);
        // The genuine token still verifies after its forgery was refused.
        assert!(v.verify(&token).is_ok());
    }

    #[test]
    fn the_memory_is_bounded_and_drops_expired_tokens_first() {
        let mut r = Remembered::default();
        let p = Principal {
            sub: "u".into(),
            role: "R8000".into(),
            org: OdsCode::new("RXL".to_owned()),
            purpose: "direct-care".into(),
        };
        for i in 0..MAX_REMEMBERED {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&(i as u64).to_le_bytes());
            // Half expire at 100, half at 1000.
            let expires = if i % 2 == 0 { 100 } else { 1000 };
            r.insert(key, p.clone(), expires, 10);
        }
        assert_eq!(r.tokens.len(), MAX_REMEMBERED);
        r.insert([0xff; 32], p.clone(), 1000, 500);
        assert_eq!(
            r.tokens.len(),
            MAX_REMEMBERED / 2 + 1,
            "expired ones dropped"
        );
        assert!(r.tokens.values().all(|(_, e)| *e == 1000));
        // Full of live entries: everything goes rather than growing.
        for i in 0..MAX_REMEMBERED {
            let mut key = [1u8; 32];
            key[..8].copy_from_slice(&(i as u64).to_le_bytes());
            r.insert(key, p.clone(), 1000, 500);
        }
        assert!(r.tokens.len() <= MAX_REMEMBERED);
    }
}
