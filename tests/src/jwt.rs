//! Signed-looking projected service-account tokens, shaped like the ones kubelet mounts for EKS Pod
//! Identity. The signature is random bytes: EKS Auth (here, the fake) is what checks tokens.

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
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A fresh token for `spec`; two calls give different tokens (as kubelet rotation does).
pub fn mint(spec: &TokenSpec) -> String {
    static SERIAL: AtomicU64 = AtomicU64::new(1);
    let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
    let now = now();
    let header = serde_json::json!({"alg": "RS256", "kid": "e2e-signing-key"});
    let claims = serde_json::json!({
        "aud": [AUDIENCE],
        "exp": now + spec.expires_in,
        "iat": now - 1,
        "nbf": now - 1,
        "iss": "https://oidc.eks.us-west-2.amazonaws.com/id/E2E0000000000000000000000000000",
        "jti": format!("jti-{serial}-{}", std::process::id()),
        "sub": format!("system:serviceaccount:{}:{}", spec.namespace, spec.service_account),
        "kubernetes.io": {
            "namespace": spec.namespace,
            "node": {"name": "e2e-node", "uid": "00000000-0000-4000-8000-000000000001"},
            "pod": {"name": spec.pod_name, "uid": spec.pod_uid},
            "serviceaccount": {"name": spec.service_account, "uid": "00000000-0000-4000-8000-000000000002"}
        }
    });
    let signature: Vec<u8> = (0..256u32).map(|i| (serial as u32).wrapping_mul(2654435761).wrapping_add(i * 97) as u8).collect();
    let token = format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(signature)
    );
    crate::secrets::remember(&token);
    token
}

/// The `kubernetes.io` claims and `exp`, `aud` of a token, or why it cannot be read.
pub fn claims(token: &str) -> Result<serde_json::Value, String> {
    let payload = token.split('.').nth(1).ok_or("not a JWT")?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).map_err(|e| format!("payload not base64url: {e}"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("payload not JSON: {e}"))
}
