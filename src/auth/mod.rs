//! Bearer-token authentication: a JWT in `Authorization: Bearer ...` becomes a [`Principal`].
//!
//! Signatures are verified against configured public keys (ES256 or RS256 only: `alg: none`
//! and HMAC are refused because the header's algorithm must be one the key was configured
//! for); `exp` and `aud` are always checked, and the claims `sub`, `role`, `org` and `purpose`
//! are required.

use std::{path::Path, time::Duration};

use connectors::OdsCode;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

use crate::principal::Principal;

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
}

impl Verifier {
    pub fn new(keys: Vec<TrustedKey>, audience: impl Into<String>, issuer: Option<String>) -> Self {
        Self {
            keys,
            audience: audience.into(),
            issuer,
            leeway: Duration::from_secs(30),
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

    /// Verifies a compact JWT.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
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
                Ok(data) => return principal_from(data.claims),
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

    #[test]
    fn a_tampered_payload_fails_the_signature() {
        let token =
            mint_demo_token("u1", "R8008", "RXL", "direct-care", Duration::from_secs(60)).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let forged = b64(
            r#"{"sub":"u1","role":"R8000","org":"RXL","purpose":"direct-care","aud":"tributary","exp":99999999999}"#,
        );
        let tampered = format!("{}.{forged}.{}", parts[0], parts[2]);
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
}
