//! Projected service-account tokens, shaped like the ones kubelet mounts for EKS Pod Identity,
//! signed for real (RS256, ES256) by an [`Issuer`]: the cluster's ([`mint`]), whose signatures
//! the fake EKS Auth checks as the real one does, or a cluster's of the test's own for
//! `--credential-source sts`. [`forge`] makes what an attacker without the keys can.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};

pub const AUDIENCE: &str = "pods.eks.amazonaws.com";

#[derive(Clone, Debug)]
pub struct TokenSpec {
    pub namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub service_account: String,
    /// Seconds from now; negative for an expired token.
    pub expires_in: i64,
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The claims kubelet's projected token for `spec` carries, from issuer `iss`.
fn claims_for(spec: &TokenSpec, iss: &str) -> serde_json::Value {
    static SERIAL: AtomicU64 = AtomicU64::new(1);
    let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
    let now = now();
    serde_json::json!({
        "aud": [AUDIENCE],
        "exp": now + spec.expires_in,
        "iat": now - 1,
        "nbf": now - 1,
        "iss": iss,
        "jti": format!("jti-{serial}-{}", std::process::id()),
        "sub": format!("system:serviceaccount:{}:{}", spec.namespace, spec.service_account),
        "kubernetes.io": {
            "namespace": spec.namespace,
            "node": {"name": "e2e-node", "uid": "00000000-0000-4000-8000-000000000001"},
            "pod": {"name": spec.pod_name, "uid": spec.pod_uid},
            "serviceaccount": {"name": spec.service_account, "uid": "00000000-0000-4000-8000-000000000002"}
        }
    })
}

/// The issuer of the harness's EKS clusters (EKS's OIDC provider): the fake EKS Auth accepts
/// only tokens it signed, as the real one accepts only the cluster's.
pub const CLUSTER_ISSUER: &str =
    "https://oidc.eks.us-west-2.amazonaws.com/id/E2E0000000000000000000000000000";

/// The cluster's issuer, one per test process.
pub fn cluster_issuer() -> &'static Issuer {
    static ISSUER: std::sync::OnceLock<Issuer> = std::sync::OnceLock::new();
    ISSUER.get_or_init(|| Issuer::new(CLUSTER_ISSUER, "e2e-cluster"))
}

/// A fresh token for `spec`, signed by the cluster's issuer; two calls give different tokens
/// (as kubelet rotation does).
pub fn mint(spec: &TokenSpec) -> String {
    cluster_issuer().mint(spec, Alg::Rs256)
}

/// A token for `spec` that no issuer signed: its signature is random bytes (what an attacker
/// without the cluster's keys can make).
pub fn forge(spec: &TokenSpec) -> String {
    let claims = claims_for(spec, CLUSTER_ISSUER);
    let header = serde_json::json!({"alg": "RS256", "kid": cluster_issuer().rsa_kid});
    let mut signature = vec![0u8; 256];
    let _ = aws_lc_rs::rand::fill(&mut signature);
    let token = format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(signature)
    );
    // Never logged either: a forged token is still a credential-shaped string.
    crate::secrets::remember(&token);
    token
}

/// `n` and `e` of a DER RSAPublicKey (`SEQUENCE { INTEGER n, INTEGER e }`), without the sign
/// byte DER puts before a high bit.
fn rsa_components(der: &[u8]) -> (Vec<u8>, Vec<u8>) {
    // One TLV at `at`: (value start, value end).
    fn tlv(der: &[u8], at: usize) -> (usize, usize) {
        let first = der[at + 1] as usize;
        let (len, start) = if first < 0x80 {
            (first, at + 2)
        } else {
            let n = first & 0x7f;
            (
                der[at + 2..at + 2 + n]
                    .iter()
                    .fold(0usize, |l, b| l << 8 | *b as usize),
                at + 2 + n,
            )
        };
        (start, start + len)
    }
    let (body, _) = tlv(der, 0);
    let (n_start, n_end) = tlv(der, body);
    let (e_start, e_end) = tlv(der, n_end);
    let strip = |v: &[u8]| {
        v.iter()
            .skip_while(|b| **b == 0)
            .copied()
            .collect::<Vec<u8>>()
    };
    (strip(&der[n_start..n_end]), strip(&der[e_start..e_end]))
}

/// How an [`Issuer`] signs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alg {
    Rs256,
    Es256,
}

/// A cluster's service-account issuer with real keys (an RSA and a P-256 one), for
/// `--credential-source sts`: its tokens verify against its JWKS.
pub struct Issuer {
    pub url: String,
    rsa: aws_lc_rs::rsa::KeyPair,
    ec: aws_lc_rs::signature::EcdsaKeyPair,
    pub rsa_kid: String,
    pub ec_kid: String,
}

impl Issuer {
    /// New keys; `name` goes into the key ids so that two issuers' keys differ.
    pub fn new(url: &str, name: &str) -> Issuer {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
        Issuer {
            url: url.to_owned(),
            rsa: aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
                .expect("RSA key"),
            ec: EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("P-256 key"),
            rsa_kid: format!("{name}-rsa"),
            ec_kid: format!("{name}-ec"),
        }
    }

    /// The public keys as the API server's /openid/v1/jwks serves them.
    pub fn jwks(&self) -> serde_json::Value {
        use aws_lc_rs::signature::KeyPair as _;
        let (n, e) = rsa_components(self.rsa.public_key().as_ref());
        let point = self.ec.public_key().as_ref();
        serde_json::json!({"keys": [
            {"kty": "RSA", "kid": self.rsa_kid, "use": "sig", "alg": "RS256", "n": URL_SAFE_NO_PAD.encode(&n), "e": URL_SAFE_NO_PAD.encode(&e)},
            {"kty": "EC", "kid": self.ec_kid, "use": "sig", "alg": "ES256", "crv": "P-256", "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65])},
        ]})
    }

    /// A token for `spec` from this issuer, signed with `alg`'s key.
    pub fn mint(&self, spec: &TokenSpec, alg: Alg) -> String {
        self.mint_with(spec, alg, |_| {})
    }

    /// Whether one of this issuer's keys signed `token`.
    pub fn signed(&self, token: &str) -> bool {
        use aws_lc_rs::signature::{self, KeyPair as _, UnparsedPublicKey};
        let Some((signed, signature)) = token.rsplit_once('.') else {
            return false;
        };
        let Ok(signature) = URL_SAFE_NO_PAD.decode(signature) else {
            return false;
        };
        let rsa = UnparsedPublicKey::new(
            &signature::RSA_PKCS1_2048_8192_SHA256,
            self.rsa.public_key().as_ref(),
        );
        let ec = UnparsedPublicKey::new(
            &signature::ECDSA_P256_SHA256_FIXED,
            self.ec.public_key().as_ref(),
        );
        rsa.verify(signed.as_bytes(), &signature).is_ok()
            || ec.verify(signed.as_bytes(), &signature).is_ok()
    }

    /// [`Issuer::mint`], with the claims edited before signing (a wrong audience, issuer, ...).
    pub fn mint_with(
        &self,
        spec: &TokenSpec,
        alg: Alg,
        edit: impl FnOnce(&mut serde_json::Value),
    ) -> String {
        let mut claims = claims_for(spec, &self.url);
        edit(&mut claims);
        let (name, kid) = match alg {
            Alg::Rs256 => ("RS256", &self.rsa_kid),
            Alg::Es256 => ("ES256", &self.ec_kid),
        };
        let header = serde_json::json!({"alg": name, "kid": kid});
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let signature = match alg {
            Alg::Rs256 => {
                let mut sig = vec![0u8; self.rsa.public_modulus_len()];
                self.rsa
                    .sign(
                        &aws_lc_rs::signature::RSA_PKCS1_SHA256,
                        &rng,
                        signed.as_bytes(),
                        &mut sig,
                    )
                    .expect("RS256");
                sig
            }
            Alg::Es256 => self
                .ec
                .sign(&rng, signed.as_bytes())
                .expect("ES256")
                .as_ref()
                .to_vec(),
        };
        let token = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature));
        crate::secrets::remember(&token);
        token
    }
}

/// The `kubernetes.io` claims and `exp`, `aud` of a token, or why it cannot be read.
pub fn claims(token: &str) -> Result<serde_json::Value, String> {
    let payload = token.split('.').nth(1).ok_or("not a JWT")?;
    let bytes = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|e| format!("payload not base64url: {e}"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("payload not JSON: {e}"))
}
