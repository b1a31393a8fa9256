//! Client identity: verifies the JWT a client presents at the upgrade and yields its
//! user id (`sub`) and what it grants (`topics`, `publish`, `subscribe`: lists of
//! topics, `prefix*` allowed in the first two; `crate::permissions` applies them). Keys
//! come from `jwt_secret` (HS256), `jwt_key` (a PEM public key: RSA for RS256, Ed25519
//! for EdDSA, P-256 for ES256) or `jwt_jwks_url` (a key set by `kid`, `crate::jwks`).
//! With none configured every client is anonymous. `sub` and `exp` are required, `nbf` is checked when present
//! (60 s leeway), and `aud` / `iss` when `jwt_audience` / `jwt_issuer` are set.

use std::sync::Arc;

use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::Config;
use crate::jwks::KeySet;
use crate::permissions::{check_patterns, Grants};

/// Why a client was refused at the upgrade (HTTP 401, this text in the body).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a token is required (Authorization: Bearer, Sec-WebSocket-Protocol bearer.<token>, or ?token=)")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token algorithm not accepted")]
    WrongAlgorithm,
    #[error("token has no `sub` (user id) or it is longer than 256 bytes")]
    NoSubject,
    #[error("token has no `exp`")]
    NoExpiry,
    #[error("token audience not accepted")]
    WrongAudience,
    #[error("token issuer not accepted")]
    WrongIssuer,
    #[error("malformed token")]
    Malformed,
    #[error("token claims `topics`, `publish` and `subscribe` must be lists of topics (`*` only at the end, and not in `subscribe`)")]
    BadGrant,
    #[error("token key id (`kid`) is not among the published keys (jwt_jwks_url); they are being fetched again, retry shortly")]
    UnknownKey,
    #[error("token keys not fetched yet from jwt_jwks_url; retry shortly")]
    KeysUnavailable,
}

/// Who a connection is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Anonymous,
    /// The user id, what the token grants beyond the topic namespaces, and when the
    /// token expires (`exp`, Unix seconds).
    User {
        user: Arc<str>,
        grants: Grants,
        exp: u64,
    },
}

/// Why the configured key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read jwt_key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("jwt_key {path}: not an RSA, Ed25519 or P-256 public key in PEM form")]
    Pem { path: String },
    #[error("{0}")]
    Jwks(#[from] crate::jwks::FetchError),
}

/// Verifies tokens; shared by every shard.
pub struct Authenticator {
    key: Option<Keys>,
    allow_anonymous: bool,
    leeway: u64,
}

enum Keys {
    /// `jwt_secret` or `jwt_key`.
    Fixed(Box<(DecodingKey, Validation)>),
    /// `jwt_jwks_url`: the set, and the validation for each algorithm it may name.
    Published {
        set: Arc<KeySet>,
        validations: Vec<Validation>,
    },
}

/// The algorithms a published key may verify.
const PUBLISHED: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("enabled", &self.key.is_some())
            .field("allow_anonymous", &self.allow_anonymous)
            .finish()
    }
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    /// Required (the validation refuses a token without it).
    #[serde(default)]
    exp: u64,
    // Read as any JSON so that a claim of the wrong shape is named in the refusal
    // rather than failing the token as malformed.
    #[serde(default)]
    topics: Option<serde_json::Value>,
    #[serde(default)]
    publish: Option<serde_json::Value>,
    #[serde(default)]
    subscribe: Option<serde_json::Value>,
}

impl Claims {
    fn grants(self) -> Result<Grants, AuthError> {
        let list = |claim: Option<serde_json::Value>, patterns: bool| match claim
            .map(serde_json::from_value::<Vec<String>>)
        {
            None => Ok(None),
            Some(Err(_)) => Err(AuthError::BadGrant),
            Some(Ok(l)) => checked(l, patterns),
        };
        Ok(Grants {
            topics: list(self.topics, true)?,
            publish: list(self.publish, true)?,
            subscribe: list(self.subscribe, false)?,
        })
    }
}

/// A claim's topics: patterns (`*` only at the end) or, for `subscribe`, exact names.
fn checked(l: Vec<String>, patterns: bool) -> Result<Option<Box<[Box<str>]>>, AuthError> {
    match l {
        l if patterns && check_patterns(&l).is_ok() => Ok(Some(boxed(l))),
        l if !patterns && l.iter().all(|t| !t.is_empty() && !t.contains('*')) => Ok(Some(boxed(l))),
        _ => Err(AuthError::BadGrant),
    }
}

fn boxed(l: Vec<String>) -> Box<[Box<str>]> {
    l.into_iter().map(String::into_boxed_str).collect()
}

impl Authenticator {
    /// Builds the verifier from the configuration at start: reads the PEM file, or
    /// fetches the key set (a failed first fetch is logged and retried, so a node can
    /// start while the identity provider is down).
    pub fn from_config(cfg: &Config) -> Result<Self, KeyError> {
        Self::build(cfg, None)
    }

    /// Builds the verifier again for a reload. The key set of an unchanged
    /// `jwt_jwks_url` is kept and fetched again in the background; a new URL must be
    /// fetched now, or the reload keeps the running keys.
    pub fn reloaded(cfg: &Config, running: &Self) -> Result<Self, KeyError> {
        Self::build(cfg, Some(running))
    }

    fn build(cfg: &Config, running: Option<&Self>) -> Result<Self, KeyError> {
        let key = if let Some(secret) = &cfg.jwt_secret {
            Some(Keys::Fixed(Box::new((
                DecodingKey::from_secret(secret.as_bytes()),
                validation(cfg, &[Algorithm::HS256]),
            ))))
        } else if let Some(url) = &cfg.jwt_jwks_url {
            let kept = running.and_then(|r| match &r.key {
                Some(Keys::Published { set, .. }) if set.url() == url => Some(set.clone()),
                _ => None,
            });
            let set = match kept {
                Some(set) => {
                    set.refresh_now();
                    set
                }
                None => Arc::new(KeySet::start(url, running.is_some())?),
            };
            Some(Keys::Published {
                set,
                validations: PUBLISHED.iter().map(|a| validation(cfg, &[*a])).collect(),
            })
        } else if let Some(path) = &cfg.jwt_key {
            let shown = path.display().to_string();
            let pem = std::fs::read(path).map_err(|source| KeyError::Read {
                path: shown.clone(),
                source,
            })?;
            type Parse = fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>;
            let attempts: [(Parse, &[Algorithm]); 3] = [
                (DecodingKey::from_rsa_pem, &[Algorithm::RS256]),
                (DecodingKey::from_ed_pem, &[Algorithm::EdDSA]),
                (DecodingKey::from_ec_pem, &[Algorithm::ES256]),
            ];
            let found = attempts.iter().find_map(|(parse, algs)| {
                parse(&pem)
                    .ok()
                    .map(|k| Keys::Fixed(Box::new((k, validation(cfg, algs)))))
            });
            Some(found.ok_or(KeyError::Pem { path: shown })?)
        } else {
            None
        };
        Ok(Self {
            key,
            allow_anonymous: cfg.allow_anonymous,
            leeway: cfg.jwt_leeway_secs,
        })
    }

    /// Seconds a token is still accepted after its `exp` (and before its `nbf`).
    pub fn leeway(&self) -> u64 {
        self.leeway
    }

    /// Whether tokens are checked at all.
    pub fn enabled(&self) -> bool {
        self.key.is_some()
    }

    /// Who presents `token` (`None`: no token was sent).
    pub fn identify(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        let Some(keys) = &self.key else {
            return Ok(Identity::Anonymous);
        };
        let Some(token) = token else {
            return if self.allow_anonymous {
                Ok(Identity::Anonymous)
            } else {
                Err(AuthError::Missing)
            };
        };
        let published;
        let (key, validation) = match keys {
            Keys::Fixed(fixed) => (&fixed.0, &fixed.1),
            Keys::Published { set, validations } => {
                let header =
                    jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
                published = match set.find(header.kid.as_deref()) {
                    Some(k) => k,
                    None if set.is_empty() => return Err(AuthError::KeysUnavailable),
                    None => return Err(AuthError::UnknownKey),
                };
                // The token's `alg` must be the key's (the validation lists only it).
                let i = PUBLISHED
                    .iter()
                    .position(|a| *a == published.alg)
                    .ok_or(AuthError::WrongAlgorithm)?;
                (&published.key, &validations[i])
            }
        };
        let data =
            jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    AuthError::WrongAlgorithm
                }
                ErrorKind::MissingRequiredClaim(c) if c == "exp" => AuthError::NoExpiry,
                ErrorKind::MissingRequiredClaim(_) => AuthError::NoSubject,
                ErrorKind::InvalidAudience => AuthError::WrongAudience,
                ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
                _ => AuthError::Malformed,
            })?;
        let mut claims = data.claims;
        match claims.sub.take() {
            Some(sub) if !sub.is_empty() && sub.len() <= MAX_USER_BYTES => Ok(Identity::User {
                user: Arc::from(sub),
                exp: claims.exp,
                grants: claims.grants()?,
            }),
            _ => Err(AuthError::NoSubject),
        }
    }
}

/// Longest user id accepted (it becomes part of Redis keys and every direct frame).
pub const MAX_USER_BYTES: usize = 256;

fn validation(cfg: &Config, algs: &[Algorithm]) -> Validation {
    let mut v = Validation::new(algs[0]);
    v.algorithms = algs.to_vec();
    v.set_required_spec_claims(&["sub", "exp"]);
    v.validate_exp = true;
    v.validate_nbf = true;
    v.leeway = cfg.jwt_leeway_secs;
    match &cfg.jwt_audience {
        Some(aud) => v.set_audience(&[aud]),
        None => v.validate_aud = false,
    }
    if let Some(iss) = &cfg.jwt_issuer {
        v.set_issuer(&[iss]);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    fn hs(secret: &str) -> Authenticator {
        let cfg = Config {
            jwt_secret: Some(secret.into()),
            ..Config::default()
        };
        Authenticator::from_config(&cfg).unwrap()
    }

    fn token(secret: &str, claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn user_of(r: Result<Identity, AuthError>) -> Result<Arc<str>, AuthError> {
        match r? {
            Identity::User { user, .. } => Ok(user),
            Identity::Anonymous => Ok("".into()),
        }
    }

    #[test]
    fn valid_expired_forged_missing() {
        let a = hs("0123456789abcdef0123");
        let ok = token(
            "0123456789abcdef0123",
            serde_json::json!({"sub": "u1", "exp": now() + 60}),
        );
        assert_eq!(user_of(a.identify(Some(&ok))), Ok("u1".into()));
        let old = token(
            "0123456789abcdef0123",
            serde_json::json!({"sub": "u1", "exp": now() - 3600}),
        );
        assert_eq!(a.identify(Some(&old)), Err(AuthError::Expired));
        let forged = token(
            "another-secret-entirely",
            serde_json::json!({"sub": "u1", "exp": now() + 60}),
        );
        assert_eq!(a.identify(Some(&forged)), Err(AuthError::BadSignature));
        assert_eq!(a.identify(None), Err(AuthError::Missing));
        assert_eq!(a.identify(Some("garbage")), Err(AuthError::Malformed));
        let nosub = token(
            "0123456789abcdef0123",
            serde_json::json!({"exp": now() + 60}),
        );
        assert_eq!(a.identify(Some(&nosub)), Err(AuthError::NoSubject));
        let noexp = token("0123456789abcdef0123", serde_json::json!({"sub": "u1"}));
        assert_eq!(a.identify(Some(&noexp)), Err(AuthError::NoExpiry));
        // Identity providers put `aud` in their tokens; unchecked unless configured.
        let aud = token(
            "0123456789abcdef0123",
            serde_json::json!({"sub": "u1", "exp": now() + 60, "aud": "chat"}),
        );
        assert_eq!(user_of(a.identify(Some(&aud))), Ok("u1".into()));
    }

    #[test]
    fn audience_and_issuer_when_configured() {
        let cfg = Config {
            jwt_secret: Some("0123456789abcdef0123".into()),
            jwt_audience: Some("chat".into()),
            jwt_issuer: Some("https://id.example".into()),
            ..Config::default()
        };
        let a = Authenticator::from_config(&cfg).unwrap();
        let claims = |aud: &str, iss: &str| serde_json::json!({"sub": "u1", "exp": now() + 60, "aud": aud, "iss": iss});
        let ok = token("0123456789abcdef0123", claims("chat", "https://id.example"));
        assert_eq!(user_of(a.identify(Some(&ok))), Ok("u1".into()));
        let other_aud = token(
            "0123456789abcdef0123",
            claims("billing", "https://id.example"),
        );
        assert_eq!(a.identify(Some(&other_aud)), Err(AuthError::WrongAudience));
        let other_iss = token(
            "0123456789abcdef0123",
            claims("chat", "https://evil.example"),
        );
        assert_eq!(a.identify(Some(&other_iss)), Err(AuthError::WrongIssuer));
    }

    #[test]
    fn grants_come_from_the_claims_and_a_bad_one_refuses_the_token() {
        let a = hs("0123456789abcdef0123");
        let tok = |extra: serde_json::Value| {
            let mut claims = serde_json::json!({"sub": "u1", "exp": now() + 60});
            claims
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            a.identify(Some(&token("0123456789abcdef0123", claims)))
        };
        let Ok(Identity::User { grants: g, .. }) =
            tok(serde_json::json!({"topics": ["a", "b:*"], "subscribe": ["c"]}))
        else {
            panic!("refused");
        };
        assert_eq!(g.topics.as_deref().map(<[_]>::len), Some(2));
        assert!(g.publish.is_none());
        assert_eq!(g.subscribe.as_deref().map(|l| &*l[0]), Some("c"));
        for bad in [
            serde_json::json!({"topics": "a"}),
            serde_json::json!({"publish": ["a*b"]}),
            serde_json::json!({"subscribe": ["a*"]}),
            serde_json::json!({"topics": [1]}),
        ] {
            assert_eq!(tok(bad.clone()), Err(AuthError::BadGrant), "{bad}");
        }
    }

    #[test]
    fn without_a_key_everyone_is_anonymous() {
        let a = Authenticator::from_config(&Config::default()).unwrap();
        assert!(!a.enabled());
        assert_eq!(a.identify(Some("anything")), Ok(Identity::Anonymous));
    }
}
