//! The projected service-account token a pod presents: its claims, read without verifying the
//! signature (EKS Auth verifies it), so the agent can bind the token to the calling pod.

use std::fmt;

use base64::Engine as _;
use serde::Deserialize;

/// Tokens larger than this are refused before any decoding (real ones are about 1 KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// A Kubernetes pod UID in canonical form: lowercase, dash separated, 36 characters. Held inline
/// (no heap): it is copied into every connection's owner, bucket and state.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodUid([u8; 36]);

impl PodUid {
    /// Accepts `8-4-4-4-12` hex groups separated by `-` or `_` (systemd cgroup names use `_`).
    pub fn parse(s: &str) -> Option<PodUid> {
        let b: &[u8; 36] = s.as_bytes().try_into().ok()?;
        let mut out = [0u8; 36];
        for (i, (&c, o)) in b.iter().zip(out.iter_mut()).enumerate() {
            *o = if matches!(i, 8 | 13 | 18 | 23) {
                if c != b'-' && c != b'_' {
                    return None;
                }
                b'-'
            } else if c.is_ascii_hexdigit() {
                c.to_ascii_lowercase()
            } else {
                return None;
            };
        }
        Some(PodUid(out))
    }

    pub fn as_str(&self) -> &str {
        // Lowercase hex digits and dashes only, by construction.
        std::str::from_utf8(&self.0).expect("a pod UID is ASCII")
    }
}

impl fmt::Display for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PodUid({})", self.as_str())
    }
}

/// What the agent needs from a token's claims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenClaims {
    pub namespace: String,
    pub pod_name: String,
    pub pod_uid: PodUid,
    pub service_account: String,
    /// Unix seconds.
    pub expires_at: u64,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("Service account token cannot be empty")]
    Empty,
    #[error("Service account token is too large ({0} bytes, limit {MAX_TOKEN_BYTES})")]
    TooLarge(usize),
    #[error("Service account token is not a valid JWT: {0}")]
    Malformed(&'static str),
    #[error("Service account token has expired")]
    Expired,
}

#[derive(Deserialize)]
struct Payload {
    exp: Option<u64>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Deserialize)]
struct KubernetesClaims {
    namespace: Option<String>,
    pod: Option<ObjectRef>,
    serviceaccount: Option<ObjectRef>,
}

#[derive(Deserialize)]
struct ObjectRef {
    name: Option<String>,
    uid: Option<String>,
}

/// Decodes the claims of `token` and checks that it has not expired at `now` (Unix seconds).
pub fn parse(token: &str, now: u64) -> Result<TokenClaims, TokenError> {
    let token = token.trim();
    if token.is_empty() {
        return Err(TokenError::Empty);
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::TooLarge(token.len()));
    }
    let mut parts = token.split('.');
    let (Some(_header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed("expected three dot-separated parts"));
    };
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| TokenError::Malformed("payload is not base64url"))?;
    let payload: Payload = serde_json::from_slice(&json)
        .map_err(|_| TokenError::Malformed("payload is not a JSON claims object"))?;
    let exp = payload.exp.ok_or(TokenError::Malformed("no exp claim"))?;
    let k8s = payload
        .kubernetes
        .ok_or(TokenError::Malformed("no kubernetes.io claim"))?;
    let pod = k8s
        .pod
        .ok_or(TokenError::Malformed("no kubernetes.io.pod claim"))?;
    let pod_uid = pod
        .uid
        .as_deref()
        .and_then(PodUid::parse)
        .ok_or(TokenError::Malformed(
            "kubernetes.io.pod.uid is missing or not a UID",
        ))?;
    let namespace = k8s
        .namespace
        .ok_or(TokenError::Malformed("no kubernetes.io.namespace claim"))?;
    let pod_name = pod
        .name
        .ok_or(TokenError::Malformed("no kubernetes.io.pod.name claim"))?;
    let service_account =
        k8s.serviceaccount
            .and_then(|sa| sa.name)
            .ok_or(TokenError::Malformed(
                "no kubernetes.io.serviceaccount.name claim",
            ))?;
    // Names as Kubernetes allows them, and nothing else: they reach logs, metrics labels and
    // the operator's tables, so a token cannot carry kilobytes or escape sequences there.
    if !is_dns_label(&namespace) {
        return Err(TokenError::Malformed(
            "kubernetes.io.namespace is not a Kubernetes name",
        ));
    }
    if !is_dns_subdomain(&pod_name) {
        return Err(TokenError::Malformed(
            "kubernetes.io.pod.name is not a Kubernetes name",
        ));
    }
    if !is_dns_subdomain(&service_account) {
        return Err(TokenError::Malformed(
            "kubernetes.io.serviceaccount.name is not a Kubernetes name",
        ));
    }
    let claims = TokenClaims {
        namespace,
        pod_name,
        pod_uid,
        service_account,
        expires_at: exp,
    };
    if exp <= now {
        return Err(TokenError::Expired);
    }
    Ok(claims)
}

/// An RFC 1123 label, as namespaces are: at most 63 of `a-z0-9-`, alphanumeric at both ends.
fn is_dns_label(name: &str) -> bool {
    name.len() <= 63
        && !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// An RFC 1123 subdomain, as pod and service-account names are: at most 253 characters, labels
/// joined by dots.
fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    fn jwt(payload: &serde_json::Value) -> String {
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.{}",
            b64(br#"{"alg":"RS256","kid":"k"}"#),
            b64(payload.to_string().as_bytes()),
            b64(b"signature")
        )
    }

    fn claims(exp: u64) -> serde_json::Value {
        serde_json::json!({
            "aud": ["pods.eks.amazonaws.com"], "exp": exp, "sub": "system:serviceaccount:ns:sa",
            "kubernetes.io": {
                "namespace": "ns",
                "pod": {"name": "web-0", "uid": UID},
                "serviceaccount": {"name": "sa", "uid": "11111111-2222-3333-4444-555555555555"}
            }
        })
    }

    #[test]
    fn parses_kubernetes_claims() {
        let c = parse(&jwt(&claims(2000)), 1000).unwrap();
        assert_eq!(c.namespace, "ns");
        assert_eq!(c.pod_name, "web-0");
        assert_eq!(c.pod_uid.as_str(), UID);
        assert_eq!(c.service_account, "sa");
        assert_eq!(c.expires_at, 2000);
    }

    #[test]
    fn rejects_expired_empty_and_garbage() {
        assert_eq!(parse(&jwt(&claims(1000)), 1000), Err(TokenError::Expired));
        assert_eq!(parse("", 0), Err(TokenError::Empty));
        assert_eq!(parse("  \n", 0), Err(TokenError::Empty));
        assert!(matches!(parse("abc", 0), Err(TokenError::Malformed(_))));
        assert!(matches!(parse("a.b.c.d", 0), Err(TokenError::Malformed(_))));
        assert!(matches!(parse("a.!!!.c", 0), Err(TokenError::Malformed(_))));
        assert!(matches!(
            parse(&jwt(&serde_json::json!([1, 2])), 0),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            parse(&"x".repeat(MAX_TOKEN_BYTES + 1), 0),
            Err(TokenError::TooLarge(_))
        ));
    }

    #[test]
    fn rejects_tokens_without_pod_binding() {
        let mut c = claims(2000);
        c["kubernetes.io"]["pod"]["uid"] = "not-a-uid".into();
        assert!(matches!(parse(&jwt(&c), 0), Err(TokenError::Malformed(_))));
        let mut c = claims(2000);
        c["kubernetes.io"].as_object_mut().unwrap().remove("pod");
        assert!(matches!(parse(&jwt(&c), 0), Err(TokenError::Malformed(_))));
    }

    #[test]
    fn pod_uid_accepts_underscores_and_uppercase() {
        let p = PodUid::parse("0F1E2D3C_4B5A_6978_8796_A5B4C3D2E1F0").unwrap();
        assert_eq!(p.as_str(), UID);
        assert!(PodUid::parse("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f").is_none());
        assert!(PodUid::parse("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1fg").is_none());
        assert!(PodUid::parse("0f1e2d3c.4b5a-6978-8796-a5b4c3d2e1f0").is_none());
    }

    #[test]
    fn names_must_be_kubernetes_names() {
        assert!(is_dns_label("kube-system") && is_dns_subdomain("api-7d9f.x-1"));
        for bad in ["", "-a", "a-", "A", "a_b", "a\u{1b}[31m", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad:?}");
        }
        assert!(!is_dns_subdomain(&format!("{}.b", "a".repeat(253))));
        let mut forged = claims(u64::MAX);
        forged["kubernetes.io"]["namespace"] = serde_json::json!("ns\u{1b}]0;pwned\u{7}");
        assert!(matches!(
            parse(&jwt(&forged), 0),
            Err(TokenError::Malformed(_))
        ));
    }
}
