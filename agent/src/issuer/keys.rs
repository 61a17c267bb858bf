//! The service-account issuer's public keys (a JWKS), from a file or a URL, kept fresh: a file
//! is re-read when it changes; a URL is fetched again every [`URL_REFRESH`], and sooner when a
//! token names a key id the set does not have (the issuer rotated its keys), at most every
//! [`UNKNOWN_KID_REFETCH`]. A failed fetch keeps the keys already held.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::BodyExt as _;

use crate::file_stamp::FileStamp;

/// How often a key set from a URL is fetched again.
pub const URL_REFRESH: Duration = Duration::from_secs(300);
/// The least time between fetches prompted by an unknown key id. A flood of forged key ids
/// must not turn into a flood of fetches, but it uses up this one budget for every key id: kept
/// short, so a genuinely new key is fetched within seconds even then (one small GET to the API
/// server every 10 s at worst).
pub const UNKNOWN_KID_REFETCH: Duration = Duration::from_secs(10);
/// How often a key file is looked at for changes.
const FILE_CHECK: Duration = Duration::from_secs(1);
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Real key sets are a few KiB.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// Where the keys come from.
#[derive(Clone, Debug)]
pub enum KeySource {
    File(PathBuf),
    Url {
        url: http::Uri,
        /// A bearer token sent with each fetch (re-read each time: it rotates), e.g. the agent's
        /// service-account token for the API server's `/openid/v1/jwks`.
        token_file: Option<PathBuf>,
        /// CA certificates trusted for the URL besides the system's (the cluster's CA).
        ca_file: Option<PathBuf>,
    },
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::File(path) => write!(f, "{}", path.display()),
            // Logged and told to pods: no userinfo or query, which could carry a credential.
            KeySource::Url { url, .. } => {
                write!(
                    f,
                    "{}://{}",
                    url.scheme_str().unwrap_or("https"),
                    url.host().unwrap_or_default()
                )?;
                if let Some(port) = url.port_u16() {
                    write!(f, ":{port}")?;
                }
                write!(f, "{}", url.path())
            }
        }
    }
}

/// A verification key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublicKey {
    /// RS256: modulus and exponent, big-endian.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// ES256: the uncompressed P-256 point (0x04 || x || y).
    P256 { point: Vec<u8> },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Jwk {
    pub kid: Option<String>,
    pub key: PublicKey,
}

/// The keys of a JWKS document that can verify RS256 or ES256; others are skipped.
pub fn parse_jwks(json: &[u8]) -> anyhow::Result<Vec<Jwk>> {
    #[derive(serde::Deserialize)]
    struct Set {
        keys: Vec<serde_json::Value>,
    }
    let set: Set = serde_json::from_slice(json)
        .context("not a JWKS document (a JSON object with \"keys\")")?;
    let b64 = |v: &serde_json::Value, field: &str| -> Option<Vec<u8>> {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(v[field].as_str()?.trim_end_matches('='))
            .ok()
    };
    let mut keys = Vec::new();
    for k in &set.keys {
        if k["use"].as_str().is_some_and(|u| u != "sig") {
            continue;
        }
        let key = match (k["kty"].as_str(), k["crv"].as_str()) {
            (Some("RSA"), _) => match (b64(k, "n"), b64(k, "e")) {
                (Some(n), Some(e)) if !n.is_empty() && !e.is_empty() => PublicKey::Rsa { n, e },
                _ => continue,
            },
            (Some("EC"), Some("P-256")) => match (b64(k, "x"), b64(k, "y")) {
                (Some(x), Some(y)) if x.len() == 32 && y.len() == 32 => PublicKey::P256 {
                    point: [&[4u8][..], &x, &y].concat(),
                },
                _ => continue,
            },
            _ => continue,
        };
        keys.push(Jwk {
            kid: k["kid"].as_str().map(str::to_owned),
            key,
        });
    }
    Ok(keys)
}

type HttpsClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Empty<Bytes>,
>;

/// The issuer's keys, as fresh as the rules above keep them.
pub struct KeySet {
    source: KeySource,
    client: Option<HttpsClient>,
    state: Mutex<State>,
    /// Held while the keys are looked for, so one caller fetches and the others go on with the
    /// keys already held (or wait, when they have none or need a key id they lack).
    refreshing: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    keys: Arc<Vec<Jwk>>,
    /// When the keys were last looked for (fetched, or the file looked at), and when a look was
    /// last prompted by an unknown key id.
    looked: Option<Instant>,
    prompted: Option<Instant>,
    /// The key file's version when read.
    file_stamp: Option<FileStamp>,
    /// Why the last attempt failed, while it did.
    error: Option<String>,
}

/// What a call to [`KeySet::keys`] has to do before it answers.
enum Look {
    /// Nothing: the keys held will do.
    None,
    /// A periodic look: done if no other caller is at it; the keys held serve meanwhile.
    Due,
    /// The caller cannot do without it: no keys are held, or its key id is unknown.
    Needed,
}

impl KeySet {
    /// A key file must be readable and hold a key at start; a URL that does not answer yet is
    /// tried again on use (the API server may be starting too).
    pub async fn new(source: KeySource) -> anyhow::Result<KeySet> {
        let client = match &source {
            KeySource::File(_) => None,
            KeySource::Url { ca_file, .. } => Some(https_client(ca_file.as_deref())?),
        };
        let set = KeySet {
            source,
            client,
            state: Mutex::new(State::default()),
            refreshing: tokio::sync::Mutex::new(()),
        };
        set.refresh().await;
        let error = set.lock().error.clone();
        match (&set.source, error) {
            (KeySource::File(path), Some(e)) => bail!("--jwks-file {}: {e}", path.display()),
            (source @ KeySource::Url { .. }, Some(e)) => {
                tracing::warn!(url = %source, "cannot fetch the issuer's keys yet; tokens are refused until they are: {e}")
            }
            _ => {}
        }
        Ok(set)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What a caller needing `kid` has to do first.
    fn look(&self, kid: Option<&str>) -> Look {
        let mut state = self.lock();
        let known = kid.is_none_or(|kid| state.keys.iter().any(|k| k.kid.as_deref() == Some(kid)));
        if state.keys.is_empty() {
            // None held (a URL that has not answered yet): try again, but not on every token.
            return if state
                .looked
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(2))
            {
                Look::Needed
            } else {
                Look::None
            };
        }
        if !known
            && state
                .prompted
                .is_none_or(|t| t.elapsed() >= UNKNOWN_KID_REFETCH)
        {
            state.prompted = Some(Instant::now());
            return Look::Needed;
        }
        let every = match &self.source {
            KeySource::File(_) => FILE_CHECK,
            KeySource::Url { .. } => URL_REFRESH,
        };
        if state.looked.is_none_or(|t| t.elapsed() >= every) {
            Look::Due
        } else {
            Look::None
        }
    }

    /// The keys, refreshed first if due; `kid` is the key id a token names, which prompts an
    /// early refresh when the set does not have it.
    pub async fn keys(&self, kid: Option<&str>) -> Result<Arc<Vec<Jwk>>, String> {
        match self.look(kid) {
            Look::None => {}
            Look::Due => {
                if let Ok(_refreshing) = self.refreshing.try_lock() {
                    self.refresh_locked().await;
                }
            }
            Look::Needed => {
                let started = Instant::now();
                let _refreshing = self.refreshing.lock().await;
                // Another caller may have just looked on this one's behalf.
                if self.lock().looked.is_none_or(|t| t < started) {
                    self.refresh_locked().await;
                }
            }
        }
        let state = self.lock();
        if state.keys.is_empty() {
            return Err(format!(
                "no keys from {}{}",
                self.source,
                state
                    .error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ));
        }
        Ok(state.keys.clone())
    }

    async fn refresh(&self) {
        let _refreshing = self.refreshing.lock().await;
        self.refresh_locked().await;
    }

    /// Looks for the keys; the caller holds `refreshing`.
    async fn refresh_locked(&self) {
        let result = match &self.source {
            KeySource::File(path) => {
                let seen = self.lock().file_stamp;
                read_file(path, seen)
            }
            KeySource::Url {
                url, token_file, ..
            } => {
                let client = self.client.as_ref().expect("a URL source has a client");
                fetch(client, url, token_file.as_deref())
                    .await
                    .map(|keys| Some((keys, None)))
            }
        };
        let mut state = self.lock();
        state.looked = Some(Instant::now());
        match result {
            Ok(Some((keys, stamp))) => {
                if *state.keys != keys {
                    tracing::info!(source = %self.source, keys = keys.len(), ids = ?keys.iter().filter_map(|k| k.kid.as_deref()).collect::<Vec<_>>(), "issuer keys loaded");
                }
                state.keys = Arc::new(keys);
                state.file_stamp = stamp.or(state.file_stamp);
                state.error = None;
            }
            Ok(None) => {}
            Err(e) => {
                let e = format!("{e:#}");
                if state.error.as_ref() != Some(&e) {
                    tracing::warn!(source = %self.source, "cannot refresh the issuer's keys; keeping the {} held: {e}", state.keys.len());
                }
                state.error = Some(e);
            }
        }
    }
}

/// The file's keys, with its version, if it changed since `seen`. A file without a usable key
/// is an error (the keys held stay), as a URL answering without one is.
fn read_file(
    path: &Path,
    seen: Option<FileStamp>,
) -> anyhow::Result<Option<(Vec<Jwk>, Option<FileStamp>)>> {
    let stamp = FileStamp::of(path)?;
    if seen == Some(stamp) {
        return Ok(None);
    }
    let keys = parse_jwks(&std::fs::read(path)?)?;
    if keys.is_empty() {
        bail!("no RS256 or ES256 key in it");
    }
    Ok(Some((keys, Some(stamp))))
}

fn https_client(ca_file: Option<&Path>) -> anyhow::Result<HttpsClient> {
    use rustls_pki_types::{CertificateDer, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(ca) = ca_file {
        let mut added = 0;
        for cert in CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("--jwks-ca-file {}", ca.display()))?
        {
            roots
                .add(cert.with_context(|| format!("--jwks-ca-file {}", ca.display()))?)
                .with_context(|| format!("--jwks-ca-file {}", ca.display()))?;
            added += 1;
        }
        if added == 0 {
            bail!("--jwks-ca-file {}: no PEM certificate in it", ca.display());
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS set-up")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(connector),
    )
}

async fn fetch(
    client: &HttpsClient,
    url: &http::Uri,
    token_file: Option<&Path>,
) -> anyhow::Result<Vec<Jwk>> {
    let mut request = http::Request::get(url.clone()).header(
        http::header::ACCEPT,
        "application/json, application/jwk-set+json",
    );
    if let Some(file) = token_file {
        let token = std::fs::read_to_string(file)
            .with_context(|| format!("--jwks-token-file {}", file.display()))?;
        let mut bearer =
            http::HeaderValue::from_str(&format!("Bearer {}", token.trim())).map_err(|_| {
                anyhow::anyhow!(
                    "--jwks-token-file {}: not a token (it has characters a header cannot carry)",
                    file.display()
                )
            })?;
        bearer.set_sensitive(true);
        request = request.header(http::header::AUTHORIZATION, bearer);
    }
    let request = request
        .body(http_body_util::Empty::new())
        .context("building the request")?;
    let response = tokio::time::timeout(FETCH_TIMEOUT, client.request(request))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {FETCH_TIMEOUT:?}"))?
        .map_err(|e| anyhow::anyhow!("{}", crate::aws::error_chain(Some(&e))))?;
    let status = response.status();
    let body = tokio::time::timeout(
        FETCH_TIMEOUT,
        http_body_util::Limited::new(response.into_body(), MAX_JWKS_BYTES).collect(),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no whole answer within {FETCH_TIMEOUT:?}"))?
    .map_err(|e| anyhow::anyhow!("reading the answer: {e}"))?
    .to_bytes();
    if !status.is_success() {
        let hint = match status.as_u16() {
            401 | 403 => {
                " (the API server serves /openid/v1/jwks to authenticated service accounts: check --jwks-token-file)"
            }
            _ => "",
        };
        bail!("HTTP {status}{hint}");
    }
    let keys = parse_jwks(&body)?;
    if keys.is_empty() {
        bail!("no RS256 or ES256 key in the answer");
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsa_and_p256_keys_are_read_and_others_skipped() {
        let jwks = br#"{"keys":[
            {"kty":"RSA","kid":"r1","use":"sig","alg":"RS256","n":"AQAB","e":"AQAB"},
            {"kty":"EC","kid":"e1","crv":"P-256","x":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA","y":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"},
            {"kty":"EC","kid":"e2","crv":"P-384","x":"AA","y":"AA"},
            {"kty":"RSA","kid":"enc","use":"enc","n":"AQAB","e":"AQAB"},
            {"kty":"oct","k":"c2VjcmV0"}
        ]}"#;
        let keys = parse_jwks(jwks).unwrap();
        assert_eq!(
            keys.iter()
                .map(|k| k.kid.as_deref().unwrap())
                .collect::<Vec<_>>(),
            ["r1", "e1"]
        );
        assert_eq!(
            keys[0].key,
            PublicKey::Rsa {
                n: vec![1, 0, 1],
                e: vec![1, 0, 1]
            }
        );
        assert!(
            matches!(&keys[1].key, PublicKey::P256 { point } if point.len() == 65 && point[0] == 4)
        );
        assert!(parse_jwks(b"[]").is_err());
    }
}
