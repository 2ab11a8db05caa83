//! JWT verification: who is calling and what they may do.
//!
//! Tokens are HS256 only (the algorithm is pinned so `alg: none` and key
//! confusion cannot be used), must carry `exp` and `sub`, and may be checked
//! for `iss`/`aud` (a string or a list, as RFC 7519 allows). `nbf` is
//! honoured with the same leeway as `exp`, and an optional maximum lifetime
//! refuses long-lived tokens. The `sub` claim is the caller's user ID.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};

/// The scope that lets a service set anyone's presence and use batch set.
pub const WRITE_ANY_SCOPE: &str = "presence:write";

/// Scopes as OAuth writes them (one space-separated string) or as a list.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Scope {
    Spaced(String),
    List(Vec<String>),
}

impl Scope {
    fn contains(&self, wanted: &str) -> bool {
        match self {
            Scope::Spaced(s) => s.split_whitespace().any(|s| s == wanted),
            Scope::List(list) => list.iter().any(|s| s == wanted),
        }
    }
}

/// An `aud` claim: RFC 7519 allows one string or a list of them.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

/// The claims this service reads.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Claims {
    pub sub: String,
    #[serde(deserialize_with = "exp_date")]
    pub exp: u64,
    /// When the token was issued; a NumericDate may be fractional.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "iat_date"
    )]
    pub iat: Option<u64>,
    /// Not before (checked by the validation, with the leeway).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "nbf_date"
    )]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
}

/// Reads an optional NumericDate claim (RFC 7519: seconds, possibly
/// fractional) as whole seconds; a negative or absurd value reads as 0 or
/// saturates. An error names the claim, as serde's own messages don't.
fn numeric_date_of<'de, D: serde::Deserializer<'de>>(
    d: D,
    claim: &str,
) -> Result<Option<u64>, D::Error> {
    let number = Option::<serde_json::Number>::deserialize(d).map_err(|e| {
        serde::de::Error::custom(format!(
            "'{claim}' must be a NumericDate (seconds since 1970): {e}"
        ))
    })?;
    Ok(number.map(|n| {
        n.as_u64()
            .unwrap_or_else(|| n.as_f64().map_or(0, |f| f.max(0.0) as u64))
    }))
}

fn exp_date<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    numeric_date_of(d, "exp")?.ok_or_else(|| serde::de::Error::custom("'exp' is required"))
}

fn iat_date<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    numeric_date_of(d, "iat")
}

fn nbf_date<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    numeric_date_of(d, "nbf")
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Shared: a verified token's caller is copied out of the token cache
    /// on every request.
    pub user_id: std::sync::Arc<str>,
    pub can_write_any: bool,
    /// When the token stops being accepted (unix seconds: `exp` plus the
    /// leeway), so a change stream can end with it.
    pub valid_until: u64,
}

impl Caller {
    /// A caller may set its own presence; `presence:write` may set anyone's.
    pub fn may_write(&self, user_id: &str) -> bool {
        self.can_write_any || *self.user_id == *user_id
    }
}

/// Why a request was not authenticated; each has a stable API code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token: send 'Authorization: Bearer <jwt>'")]
    MissingToken,
    #[error("the Authorization header must be 'Bearer <jwt>'")]
    MalformedHeader,
    #[error("token has expired")]
    Expired,
    #[error("token is invalid: {0}")]
    Invalid(String),
}

impl AuthError {
    /// Stable code for the JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::MissingToken => "missing_token",
            AuthError::MalformedHeader => "invalid_token",
            AuthError::Expired => "token_expired",
            AuthError::Invalid(_) => "invalid_token",
        }
    }
}

/// Clock skew allowed on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 30;

/// A token that already passed verification; its `valid_until` still
/// applies on every later use.
#[derive(Clone)]
struct Verified {
    caller: Caller,
}

/// Verifies tokens; built once from the validated settings.
///
/// Clients send the same token on every request, and checking the HS256
/// signature and parsing the claims is the costliest part of a cached read,
/// so verified tokens are remembered by their exact text (a different
/// signature is a different key) until they expire.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    /// Longest lifetime accepted, in seconds.
    max_lifetime: Option<u64>,
    /// Keyed by the token's text with the presence cache's keyed hash:
    /// every request hashes its token, and SipHash over a token's couple
    /// of hundred bytes showed in the cached read's profile.
    verified: moka::sync::Cache<String, Verified, crate::cache::KeyHasher>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").finish_non_exhaustive()
    }
}

impl Verifier {
    /// `issuer`/`audience`, when given, must match the token's claims.
    pub fn new(secret: &str, issuer: Option<&str>, audience: Option<&str>) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(iss) = issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        match audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Verifier {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation,
            max_lifetime: None,
            verified: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(std::time::Duration::from_secs(600))
                .build_with_hasher(crate::cache::KeyHasher::new()),
        }
    }

    /// Refuses tokens that live longer than `seconds`: `exp - iat`, or
    /// `exp - now` for a token without `iat`; an `iat` counts as at most
    /// the clock skew allowed ahead of now.
    pub fn with_max_lifetime(mut self, seconds: Option<u64>) -> Self {
        self.max_lifetime = seconds;
        self
    }

    /// Authenticates the value of an `Authorization` header.
    pub fn verify_header(&self, header: Option<&str>) -> Result<Caller, AuthError> {
        let header = header.ok_or(AuthError::MissingToken)?;
        let (scheme, token) = header
            .trim()
            .split_once(' ')
            .ok_or(AuthError::MalformedHeader)?;
        if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
            return Err(AuthError::MalformedHeader);
        }
        self.verify(token.trim())
    }

    /// Authenticates a bare token.
    pub fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        if let Some(hit) = self.verified.get(token) {
            if now_secs() <= hit.caller.valid_until {
                return Ok(hit.caller);
            }
            self.verified.invalidate(token);
            return Err(AuthError::Expired);
        }
        let caller = self.verify_uncached(token)?;
        self.verified.insert(
            token.to_owned(),
            Verified {
                caller: caller.clone(),
            },
        );
        Ok(caller)
    }

    fn verify_uncached(&self, token: &str) -> Result<Caller, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|err| {
                match err.kind() {
                    ErrorKind::ExpiredSignature => AuthError::Expired,
                    ErrorKind::InvalidSignature => AuthError::Invalid("bad signature".into()),
                    ErrorKind::InvalidAlgorithm => {
                        AuthError::Invalid("only HS256 tokens are accepted".into())
                    }
                    ErrorKind::MissingRequiredClaim(claim) => {
                        AuthError::Invalid(missing_claim(claim))
                    }
                    ErrorKind::InvalidIssuer => AuthError::Invalid("wrong issuer".into()),
                    ErrorKind::InvalidAudience => AuthError::Invalid("wrong audience".into()),
                    ErrorKind::ImmatureSignature => {
                        AuthError::Invalid("token not yet valid".into())
                    }
                    // The header's JSON or the claims': say which, and
                    // what is wrong with it (an `alg` of `none`, a missing
                    // `sub`, a `scope` of the wrong type).
                    ErrorKind::Json(json) => match jsonwebtoken::decode_header(token) {
                        Err(header) => AuthError::Invalid(format!(
                            "malformed token header: {}",
                            crate::model::shown(&header.to_string())
                        )),
                        Ok(_) => AuthError::Invalid(format!("malformed token claims: {json}")),
                    },
                    _ => AuthError::Invalid("malformed token".into()),
                }
            })?;
        // RFC 7515 §4.1.11: a `crit` header names extensions the token
        // must not be accepted without; this service understands none (and
        // an empty list is not allowed at all).
        if let Some(crit) = data.header.crit {
            return Err(AuthError::Invalid(format!(
                "critical header extensions {crit:?} are not supported"
            )));
        }
        let claims = data.claims;
        if claims.sub.is_empty() {
            return Err(AuthError::Invalid("empty 'sub' claim".into()));
        }
        if let Some(max) = self.max_lifetime {
            // From `iat`, but never from further ahead than the clock skew
            // allowed: an `iat` far in the future would otherwise let any
            // lifetime through, while an issuer a little ahead is normal.
            let now = now_secs();
            let start = claims.iat.unwrap_or(now).min(now + LEEWAY_SECS);
            let lifetime = claims.exp.saturating_sub(start);
            if lifetime > max {
                return Err(AuthError::Invalid(format!(
                    "token lives {lifetime} s; this service accepts at most {max} s"
                )));
            }
        }
        let can_write_any = claims
            .scope
            .as_ref()
            .is_some_and(|s| s.contains(WRITE_ANY_SCOPE));
        Ok(Caller {
            user_id: claims.sub.into(),
            can_write_any,
            valid_until: claims.exp.saturating_add(LEEWAY_SECS),
        })
    }
}

/// Why a required claim was refused: jsonwebtoken reports a claim that is
/// there but of the wrong type as missing too.
fn missing_claim(claim: &str) -> String {
    let wanted = match claim {
        "exp" | "nbf" | "iat" => "a NumericDate (seconds since 1970)",
        "aud" => "a string or a list of strings",
        _ => "a string",
    };
    format!("claim '{claim}' is missing or not {wanted}")
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Signs a token, for tests: no `iss` or `aud`.
pub fn mint(
    secret: &str,
    sub: &str,
    scope: &str,
    ttl_secs: u64,
) -> Result<String, jsonwebtoken::errors::Error> {
    mint_for(secret, &Grant::new(sub, scope, ttl_secs))
}

/// What a minted token says: the claims a node checks. `presence-service
/// token` fills `issuer` and `audience` from the node's own settings, so
/// the token it prints is one that node accepts.
#[derive(Debug, Clone, Default)]
pub struct Grant<'a> {
    pub sub: &'a str,
    pub scope: &'a str,
    pub ttl_secs: u64,
    pub issuer: Option<&'a str>,
    pub audience: Option<&'a str>,
}

impl<'a> Grant<'a> {
    /// A grant with no `iss` or `aud`.
    pub fn new(sub: &'a str, scope: &'a str, ttl_secs: u64) -> Self {
        Grant {
            sub,
            scope,
            ttl_secs,
            ..Grant::default()
        }
    }
}

/// Signs the token `grant` describes.
pub fn mint_for(secret: &str, grant: &Grant<'_>) -> Result<String, jsonwebtoken::errors::Error> {
    let now = now_secs();
    let claims = Claims {
        sub: grant.sub.to_owned(),
        exp: now.saturating_add(grant.ttl_secs),
        iat: Some(now),
        nbf: None,
        scope: (!grant.scope.is_empty()).then(|| Scope::Spaced(grant.scope.to_owned())),
        iss: grant.issuer.map(str::to_owned),
        aud: grant.audience.map(|aud| Audience::One(aud.to_owned())),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123";

    #[test]
    fn valid_token_identifies_caller() {
        let v = Verifier::new(SECRET, None, None);
        let token = mint(SECRET, "ann", "", 60).unwrap();
        let caller = v.verify_header(Some(&format!("Bearer {token}"))).unwrap();
        assert_eq!(&*caller.user_id, "ann");
        assert!(!caller.can_write_any);
        assert!(caller.may_write("ann"));
        assert!(!caller.may_write("bob"));
    }

    #[test]
    fn write_scope_in_either_form() {
        let v = Verifier::new(SECRET, None, None);
        let token = mint(SECRET, "svc", "presence:read presence:write", 60).unwrap();
        assert!(v.verify(&token).unwrap().can_write_any);
        let claims =
            serde_json::json!({"sub": "svc", "exp": u64::MAX / 2, "scope": ["presence:write"]});
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert!(v.verify(&token).unwrap().can_write_any);
        let token = mint(SECRET, "svc", "presence:writes", 60).unwrap();
        assert!(!v.verify(&token).unwrap().can_write_any);
    }

    #[test]
    fn a_remembered_token_still_expires() {
        let v = Verifier::new(SECRET, None, None);
        let claims = Claims {
            sub: "ann".into(),
            exp: now_secs() + 1,
            iat: None,
            nbf: None,
            scope: None,
            iss: None,
            aud: None,
        };
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert!(v.verify(&token).is_ok());
        assert!(v.verify(&token).is_ok(), "second use comes from the cache");
        // Pretend time passed beyond exp + leeway for the remembered entry.
        v.verified.insert(
            token.clone(),
            Verified {
                caller: Caller {
                    valid_until: now_secs() - 1,
                    ..v.verify(&token).unwrap()
                },
            },
        );
        assert_eq!(v.verify(&token), Err(AuthError::Expired));
        // A token with a forged signature never matches a remembered one.
        let forged = format!("{}x", &token[..token.len() - 1]);
        assert!(v.verify(&forged).is_err());
    }

    #[test]
    fn header_forms() {
        let v = Verifier::new(SECRET, None, None);
        assert_eq!(v.verify_header(None), Err(AuthError::MissingToken));
        assert_eq!(
            v.verify_header(Some("Basic abc")),
            Err(AuthError::MalformedHeader)
        );
        assert_eq!(
            v.verify_header(Some("Bearer")),
            Err(AuthError::MalformedHeader)
        );
        let token = mint(SECRET, "ann", "", 60).unwrap();
        assert!(v.verify_header(Some(&format!("bearer {token}"))).is_ok());
    }

    #[test]
    fn issuer_and_audience_are_enforced_when_configured() {
        let v = Verifier::new(SECRET, Some("idp"), Some("presence"));
        let plain = mint(SECRET, "ann", "", 60).unwrap();
        assert_eq!(v.verify(&plain).unwrap_err().code(), "invalid_token");
        let claims = Claims {
            sub: "ann".into(),
            exp: u64::MAX / 2,
            iat: None,
            nbf: None,
            scope: None,
            iss: Some("idp".into()),
            aud: Some(Audience::Many(vec!["other".into(), "presence".into()])),
        };
        let good = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert!(v.verify(&good).is_ok());
        let grant = Grant {
            issuer: Some("idp"),
            audience: Some("presence"),
            ..Grant::new("ann", "", 60)
        };
        let minted = mint_for(SECRET, &grant).unwrap();
        assert_eq!(&*v.verify(&minted).unwrap().user_id, "ann");
    }

    /// A token without the `iss` or `aud` a node requires is refused with
    /// the claim named, and not called a date.
    #[test]
    fn a_missing_issuer_or_audience_is_named() {
        let v = Verifier::new(SECRET, Some("idp"), Some("presence"));
        let message = |grant: &Grant<'_>| match v.verify(&mint_for(SECRET, grant).unwrap()) {
            Err(AuthError::Invalid(message)) => message,
            other => panic!("{grant:?}: {other:?}"),
        };
        let no_issuer = Grant {
            audience: Some("presence"),
            ..Grant::new("ann", "", 60)
        };
        assert_eq!(
            message(&no_issuer),
            "claim 'iss' is missing or not a string"
        );
        let no_audience = Grant {
            issuer: Some("idp"),
            ..Grant::new("ann", "", 60)
        };
        let text = message(&no_audience);
        assert_eq!(
            text,
            "claim 'aud' is missing or not a string or a list of strings"
        );
    }

    /// An unsigned token (`alg: none`) is refused for its header, which
    /// the message names.
    #[test]
    fn an_unsigned_token_is_refused_for_its_header() {
        // {"alg":"none","typ":"JWT"} . {"sub":"ann","exp":4102444800} . (no signature)
        let token = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbm4iLCJleHAiOjQxMDI0NDQ4MDB9.";
        match Verifier::new(SECRET, None, None).verify(token) {
            Err(AuthError::Invalid(message)) => {
                assert!(message.starts_with("malformed token header: "), "{message}");
                assert!(message.contains("none"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    fn sign(claims: &serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    /// A token refused for its claims says which claim is wrong.
    #[test]
    fn bad_claims_are_named() {
        let v = Verifier::new(SECRET, None, None);
        let now = now_secs();
        let message = |claims: serde_json::Value| match v.verify(&sign(&claims)) {
            Err(AuthError::Invalid(message)) => message,
            other => panic!("{claims}: {other:?}"),
        };
        assert!(message(serde_json::json!({"exp": now + 60})).contains("sub"));
        for exp in [serde_json::json!(-1), serde_json::json!("soon")] {
            let text = message(serde_json::json!({"sub": "a", "exp": exp}));
            assert!(text.contains("'exp'"), "{text}");
        }
        let text = message(serde_json::json!({"sub": "a", "exp": now + 60, "scope": 7}));
        assert!(text.contains("malformed token claims"), "{text}");
    }

    /// A token whose header lists critical extensions is refused: it must
    /// not be accepted by a verifier that doesn't understand them.
    #[test]
    fn critical_header_extensions_are_refused() {
        let v = Verifier::new(SECRET, None, None);
        let claims = serde_json::json!({"sub": "a", "exp": now_secs() + 60});
        let mut header = Header::new(Algorithm::HS256);
        header.crit = Some(vec!["exp-policy".into()]);
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        let token = jsonwebtoken::encode(&header, &claims, &key).unwrap();
        match v.verify(&token) {
            Err(AuthError::Invalid(message)) => assert!(message.contains("critical"), "{message}"),
            other => panic!("{other:?}"),
        }
        header.crit = Some(Vec::new());
        let empty = jsonwebtoken::encode(&header, &claims, &key).unwrap();
        assert!(v.verify(&empty).is_err());
        header.crit = None;
        assert!(
            v.verify(&jsonwebtoken::encode(&header, &claims, &key).unwrap())
                .is_ok()
        );
    }

    #[test]
    fn nbf_lifetime_and_audience_lists() {
        let now = now_secs();
        let v = Verifier::new(SECRET, None, None).with_max_lifetime(Some(3600));
        let early = sign(&serde_json::json!({"sub": "a", "exp": now + 60, "nbf": now + 600}));
        assert_eq!(v.verify(&early).unwrap_err().code(), "invalid_token");
        let skewed = sign(&serde_json::json!({"sub": "a", "exp": now + 60, "nbf": now + 5}));
        assert!(v.verify(&skewed).is_ok());
        let listed = sign(&serde_json::json!({"sub": "a", "exp": now + 60, "aud": ["x", "y"]}));
        assert!(v.verify(&listed).is_ok());
        let long = sign(&serde_json::json!({"sub": "a", "exp": now + 600, "iat": now - 3600}));
        assert_eq!(v.verify(&long).unwrap_err().code(), "invalid_token");
        let no_iat = sign(&serde_json::json!({"sub": "a", "exp": now + 7200}));
        assert!(v.verify(&no_iat).is_err());
        // An issuer whose clock is a little ahead issues tokens of the
        // full lifetime...
        let skewed = sign(&serde_json::json!({"sub": "a", "exp": now + 5 + 3600, "iat": now + 5}));
        assert!(v.verify(&skewed).is_ok());
        // ...but an `iat` far ahead doesn't move the lifetime's start.
        let later = now + 1_000_000;
        let ahead = sign(&serde_json::json!({"sub": "a", "exp": later + 100, "iat": later}));
        assert_eq!(v.verify(&ahead).unwrap_err().code(), "invalid_token");
        let after_exp =
            sign(&serde_json::json!({"sub": "a", "exp": now + 7200, "iat": now + 9000}));
        assert!(v.verify(&after_exp).is_err());
        let ok = sign(&serde_json::json!({"sub": "a", "exp": now + 600, "iat": now}));
        assert_eq!(v.verify(&ok).unwrap().valid_until, now + 600 + LEEWAY_SECS);
        // NumericDates may be fractional.
        let fractional = sign(&serde_json::json!(
            {"sub": "a", "exp": now as f64 + 600.5, "iat": now as f64 - 0.5, "nbf": now as f64 - 0.5}
        ));
        assert!(v.verify(&fractional).is_ok());
    }
}
