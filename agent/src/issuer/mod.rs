//! Local verification of a pod's service-account token against the cluster issuer's keys
//! (`keys`, from `--jwks-file` or `--jwks-url`): the signature (RS256 or ES256), then `iss`,
//! `aud`, `exp`, `nbf` and the `kubernetes.io` claims. In `sts` mode nothing upstream does this,
//! so it is required; in `eks-auth` mode EKS Auth does it too, and the agent does it first when
//! given the keys, so that a forged token costs no EKS Auth call and spends no budget.

pub mod keys;

use base64::Engine as _;
use serde::Deserialize;

use self::keys::PublicKey;
pub use self::keys::{KeySet, KeySource};
use crate::{
    token::{self, TokenClaims, TokenError},
    upstream::UpstreamError,
};

/// How far a token's `nbf` may be ahead of this node's clock (clock skew).
const NBF_LEEWAY_SECONDS: u64 = 60;

/// The cluster issuer's keys and what tokens must say, to verify them locally: required with
/// `--credential-source sts`, optional with `eks-auth` (then a forged token costs no EKS Auth
/// call).
#[derive(Clone, Debug)]
pub struct TokenCheck {
    pub keys: KeySource,
    /// The `iss` tokens must carry (required in sts mode; checked when given in eks-auth mode).
    pub issuer: Option<String>,
    pub audience: String,
}

pub struct Verifier {
    /// The `iss` tokens must carry; any, when `None` (EKS Auth checks it in `eks-auth` mode).
    pub issuer: Option<String>,
    pub audience: String,
    pub keys: KeySet,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
}

#[derive(Deserialize)]
struct Registered {
    iss: Option<String>,
    #[serde(default)]
    aud: Audience,
    nbf: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
    #[default]
    None,
}

impl Audience {
    fn contains(&self, aud: &str) -> bool {
        match self {
            Audience::One(a) => a == aud,
            Audience::Many(all) => all.iter().any(|a| a == aud),
            Audience::None => false,
        }
    }
}

/// The refusal of a token, shaped as EKS Auth shapes it (400 InvalidTokenException).
fn invalid(message: String) -> UpstreamError {
    UpstreamError::invalid_token(message)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Algorithm {
    Rs256,
    Es256,
}

impl Verifier {
    /// Reads the issuer's keys (a bad file or an unreachable URL fails the start).
    pub async fn new(check: TokenCheck) -> anyhow::Result<Verifier> {
        Ok(Verifier {
            issuer: check.issuer,
            audience: check.audience,
            keys: KeySet::new(check.keys).await?,
        })
    }

    /// The token's claims once it is proven to be this cluster's, for this audience, and current.
    pub async fn verify(&self, token: &str, now: u64) -> Result<TokenClaims, UpstreamError> {
        let token = token.trim();
        // Size, shape and the kubernetes.io claims first: cheap, and the same checks as today.
        let claims = token::parse(token, now).map_err(|e| match e {
            TokenError::Expired => UpstreamError::expired_token(e.to_string()),
            e => invalid(e.to_string()),
        })?;
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(signature_b64)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid("Service account token is not a valid JWT".into()));
        };
        let decode = |part: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(part.trim_end_matches('='))
                .ok()
        };
        let header: Header = decode(header_b64)
            .and_then(|h| serde_json::from_slice(&h).ok())
            .ok_or_else(|| invalid("Service account token has no readable JWT header".into()))?;
        let algorithm = match header.alg.as_str() {
            "RS256" => Algorithm::Rs256,
            "ES256" => Algorithm::Es256,
            other => {
                return Err(invalid(format!(
                    "Service account token is signed with {other:?}; only RS256 and ES256 are accepted"
                )));
            }
        };
        let signed = &token.as_bytes()[..header_b64.len() + 1 + payload_b64.len()];
        let signature = decode(signature_b64)
            .ok_or_else(|| invalid("Service account token's signature is not base64url".into()))?;
        self.check_signature(&header, algorithm, signed, &signature)
            .await?;
        // Only now are the claims worth reading: they are the issuer's.
        let registered: Registered = decode(payload_b64)
            .and_then(|p| serde_json::from_slice(&p).ok())
            .ok_or_else(|| invalid("Service account token's claims are not readable".into()))?;
        match (registered.iss.as_deref(), &self.issuer) {
            (Some(_), None) => {}
            (Some(iss), Some(issuer)) if iss == issuer => {}
            (Some(iss), Some(issuer)) => {
                return Err(invalid(format!(
                    "Service account token was issued by {iss:?}, not by this cluster's issuer {issuer:?}"
                )));
            }
            (None, _) => return Err(invalid("Service account token has no iss claim".into())),
        }
        if !registered.aud.contains(&self.audience) {
            return Err(invalid(format!(
                "Service account token is not for the audience {:?}",
                self.audience
            )));
        }
        if registered
            .nbf
            .is_some_and(|nbf| nbf > now + NBF_LEEWAY_SECONDS)
        {
            return Err(invalid(
                "Service account token is not valid yet (nbf)".into(),
            ));
        }
        Ok(claims)
    }

    /// Whether one of the issuer's keys (the one the header names, if it names one) signed
    /// `signed`.
    async fn check_signature(
        &self,
        header: &Header,
        algorithm: Algorithm,
        signed: &[u8],
        signature: &[u8],
    ) -> Result<(), UpstreamError> {
        let keys = self
            .keys
            .keys(header.kid.as_deref())
            .await
            .map_err(UpstreamError::issuer_keys_unavailable)?;
        let verified = keys
            .iter()
            .filter(|k| header.kid.is_none() || k.kid == header.kid)
            .any(|k| verifies(algorithm, &k.key, signed, signature));
        if verified {
            return Ok(());
        }
        Err(invalid(match &header.kid {
            Some(kid) if !keys.iter().any(|k| k.kid.as_deref() == Some(kid.as_str())) => {
                format!(
                    "Service account token is signed with key {kid:?}, which the issuer's keys do not include"
                )
            }
            _ => {
                "Service account token's signature does not verify against the issuer's keys".into()
            }
        }))
    }
}

fn verifies(algorithm: Algorithm, key: &PublicKey, signed: &[u8], signature: &[u8]) -> bool {
    use aws_lc_rs::signature;
    match (algorithm, key) {
        (Algorithm::Rs256, PublicKey::Rsa { n, e }) => signature::RsaPublicKeyComponents { n, e }
            .verify(&signature::RSA_PKCS1_2048_8192_SHA256, signed, signature)
            .is_ok(),
        (Algorithm::Es256, PublicKey::P256 { point }) => {
            signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                .verify(signed, signature)
                .is_ok()
        }
        _ => false,
    }
}
