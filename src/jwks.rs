//! The token keys published at `jwt_jwks_url` (a JSON Web Key Set): fetched on a thread
//! of their own, kept by key id (`kid`), and fetched again every
//! [`REFRESH`], when a token names a key id not in the set (at most once per
//! [`MIN_INTERVAL`]), and on SIGHUP. Shards only read the set: an upgrade never waits
//! for the network. A token with an unknown key id is refused (and the fetch it sets
//! off lets the client's next attempt through once the identity provider publishes the
//! key).
//!
//! Only signature keys of the asymmetric kinds are taken (RSA, EC P-256/P-384,
//! Ed25519); a key marked for encryption, a symmetric key, or an entry that does not
//! parse is skipped and counted in the log. HTTPS uses the host's CA bundle
//! (`SSL_CERT_FILE`, or the usual paths of Debian, RHEL and Alpine), else Mozilla's.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

/// How often the set is fetched again while it holds keys.
pub const REFRESH: Duration = Duration::from_secs(300);
/// How often a fetch is tried while the set is empty (the first one failed).
pub const RETRY: Duration = Duration::from_secs(5);
/// The least time between two fetches that an unknown key id sets off.
pub const MIN_INTERVAL: Duration = Duration::from_secs(10);
/// One fetch's limit, from connect to the end of the body.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The largest key set read.
const MAX_BODY: u64 = 1024 * 1024;

/// One key of the set, with the algorithm it verifies.
pub struct Key {
    pub key: DecodingKey,
    pub alg: Algorithm,
}

/// Why the key set could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("jwt_jwks_url {url}: {reason}")]
    Http { url: String, reason: String },
    #[error("jwt_jwks_url {url}: not a JSON Web Key Set ({reason})")]
    Json { url: String, reason: String },
    #[error("jwt_jwks_url {url}: no usable signature key in the set")]
    Empty { url: String },
}

/// The keys of one URL, shared by every shard; the fetching thread ends when the last
/// holder drops it.
pub struct KeySet {
    shared: Arc<Shared>,
}

struct Shared {
    url: String,
    keys: RwLock<HashMap<String, Arc<Key>>>,
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    /// A fetch is wanted (an unknown key id): made once [`MIN_INTERVAL`] has passed.
    wanted: bool,
    /// A fetch is wanted now, however recent the last (SIGHUP).
    forced: bool,
    last_fetch: Option<Instant>,
    /// When an unknown key id last set off a fetch (they are at most [`MIN_INTERVAL`]
    /// apart, whatever fetches happen in between).
    last_wanted: Option<Instant>,
    stopped: bool,
}

impl KeySet {
    /// Fetches the set once, here, then starts the thread that keeps it fresh. With
    /// `required`, a failed first fetch is an error; otherwise it is logged and the
    /// thread keeps trying every [`RETRY`] (tokens are refused until it succeeds).
    pub fn start(url: &str, required: bool) -> Result<Self, FetchError> {
        let shared = Arc::new(Shared {
            url: url.to_string(),
            keys: RwLock::new(HashMap::new()),
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        });
        match shared.fetch() {
            Ok(()) => {}
            Err(e) if required => return Err(e),
            Err(e) => tracing::error!(error = %e, "token keys not fetched yet; retrying every 5 s"),
        }
        let worker = shared.clone();
        std::thread::Builder::new()
            .name("ringway-jwks".into())
            .spawn(move || worker.run())
            .map_err(|e| FetchError::Http {
                url: url.to_string(),
                reason: format!("cannot start the fetching thread: {e}"),
            })?;
        Ok(Self { shared })
    }

    pub fn url(&self) -> &str {
        &self.shared.url
    }

    /// The key for a token's `kid`; a token without one may use the set's only key.
    /// `None` sets off a fetch (at most once per [`MIN_INTERVAL`]).
    pub fn find(&self, kid: Option<&str>) -> Option<Arc<Key>> {
        let found = {
            let keys = self.shared.keys.read().unwrap_or_else(|e| e.into_inner());
            match kid {
                Some(kid) => keys.get(kid).cloned(),
                None if keys.len() == 1 => keys.values().next().cloned(),
                None => None,
            }
        };
        if found.is_none() && kid.is_some() {
            self.refresh();
        }
        found
    }

    /// Asks the thread to fetch the set again (an unknown key id): at once, or when
    /// [`MIN_INTERVAL`] has passed since the last fetch.
    pub fn refresh(&self) {
        let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if !state.wanted {
            state.wanted = true;
            self.shared.wake.notify_one();
        }
    }

    /// Asks the thread to fetch the set again now (SIGHUP).
    pub fn refresh_now(&self) {
        let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        state.forced = true;
        self.shared.wake.notify_one();
    }

    /// Keys in the set now.
    pub fn len(&self) -> usize {
        self.shared
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for KeySet {
    fn drop(&mut self) {
        let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        state.stopped = true;
        self.shared.wake.notify_one();
    }
}

impl Shared {
    /// The fetching thread: sleeps until the next refresh is due or a fetch is wanted.
    fn run(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if state.stopped {
                return;
            }
            let every = if self.keys.read().map(|k| k.is_empty()).unwrap_or(true) {
                RETRY
            } else {
                REFRESH
            };
            let since = state.last_fetch.map(|t| t.elapsed());
            let since_wanted = state.last_wanted.map(|t| t.elapsed());
            let wanted_now = state.wanted && since_wanted.is_none_or(|s| s >= MIN_INTERVAL);
            let due = state.forced || wanted_now || since.is_none_or(|s| s >= every);
            if !due {
                let mut left = since.map_or(Duration::ZERO, |s| every.saturating_sub(s));
                if state.wanted {
                    let wait =
                        since_wanted.map_or(Duration::ZERO, |s| MIN_INTERVAL.saturating_sub(s));
                    left = left.min(wait);
                }
                state = self
                    .wake
                    .wait_timeout(state, left.max(Duration::from_millis(10)))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                continue;
            }
            if wanted_now {
                state.last_wanted = Some(Instant::now());
            }
            state.wanted = false;
            state.forced = false;
            drop(state);
            if let Err(e) = self.fetch() {
                tracing::warn!(error = %e, "token keys not refreshed; the ones held stay");
            }
            state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Fetches the set and puts it in force; on failure the keys held stay.
    fn fetch(&self) -> Result<(), FetchError> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_fetch = Some(Instant::now());
        let body = get(&self.url).map_err(|reason| FetchError::Http {
            url: self.url.clone(),
            reason,
        })?;
        let (keys, skipped) = parse(&body).map_err(|reason| FetchError::Json {
            url: self.url.clone(),
            reason,
        })?;
        if keys.is_empty() {
            return Err(FetchError::Empty {
                url: self.url.clone(),
            });
        }
        tracing::info!(
            url = %self.url,
            keys = keys.len(),
            skipped,
            "token keys fetched"
        );
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
        Ok(())
    }
}

/// The usable keys of a JSON Web Key Set, by key id, and how many entries were skipped.
pub fn parse(body: &str) -> Result<(HashMap<String, Arc<Key>>, usize), String> {
    #[derive(serde::Deserialize)]
    struct Set {
        keys: Vec<serde_json::Value>,
    }
    let set: Set = serde_json::from_str(body).map_err(|e| e.to_string())?;
    let mut keys = HashMap::new();
    let mut skipped = 0;
    for (i, entry) in set.keys.into_iter().enumerate() {
        match serde_json::from_value::<Jwk>(entry)
            .ok()
            .and_then(|jwk| usable(&jwk).map(|key| (jwk.common.key_id.clone(), key)))
        {
            Some((kid, key)) => {
                // A key without an id is found only as the set's single key.
                keys.insert(kid.unwrap_or_else(|| format!("#{i}")), Arc::new(key));
            }
            None => skipped += 1,
        }
    }
    Ok((keys, skipped))
}

/// A signature key of a kind we verify, with its algorithm (from `alg`, or the only
/// one its kind and curve allow).
fn usable(jwk: &Jwk) -> Option<Key> {
    if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
        return None;
    }
    let by_kind = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        _ => return None,
    };
    let alg = match jwk.common.key_algorithm {
        Some(a) => a.to_string().parse::<Algorithm>().ok()?,
        None => by_kind,
    };
    let family_matches = match alg {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => matches!(jwk.algorithm, AlgorithmParameters::RSA(_)),
        Algorithm::ES256 | Algorithm::ES384 | Algorithm::EdDSA => alg == by_kind,
        _ => false,
    };
    if !family_matches {
        return None;
    }
    Some(Key {
        key: DecodingKey::from_jwk(jwk).ok()?,
        alg,
    })
}

/// GETs `url`, following no redirects, within [`TIMEOUT`].
fn get(url: &str) -> Result<String, String> {
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(host_roots().unwrap_or(ureq::tls::RootCerts::WebPki))
        .build();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .tls_config(tls)
        .timeout_global(Some(TIMEOUT))
        .max_redirects(0)
        .http_status_as_error(true)
        .build()
        .into();
    let mut response = agent.get(url).call().map_err(|e| e.to_string())?;
    response
        .body_mut()
        .with_config()
        .limit(MAX_BODY)
        .read_to_string()
        .map_err(|e| e.to_string())
}

/// The host's CA bundle (`crate::tls::host_roots`) in ureq's form.
fn host_roots() -> Option<ureq::tls::RootCerts> {
    let certs = crate::tls::host_roots()?
        .iter()
        .map(|der| ureq::tls::Certificate::from_der(der).to_owned())
        .collect();
    Some(ureq::tls::RootCerts::Specific(Arc::new(certs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_asymmetric_signature_keys_are_taken() {
        let set = r#"{"keys": [
            {"kty": "RSA", "kid": "r", "use": "sig", "alg": "RS256", "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw", "e": "AQAB"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": "sXch", "e": "AQAB"},
            {"kty": "oct", "kid": "s", "k": "c2VjcmV0"},
            {"kty": "OKP", "kid": "x", "crv": "X25519", "x": "AAAA"},
            {"kty": "EC", "kid": "mismatch", "alg": "RS256", "crv": "P-256", "x": "AAAA", "y": "AAAA"},
            {"kty": "weird"}
        ]}"#;
        let (keys, skipped) = parse(set).unwrap();
        assert_eq!(keys.keys().collect::<Vec<_>>(), vec!["r"]);
        assert_eq!(keys["r"].alg, Algorithm::RS256);
        assert_eq!(skipped, 5);
        assert!(parse("{}").is_err());
        assert!(parse("not json").is_err());
    }
}
