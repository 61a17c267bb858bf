//! The checks every credential request passes before anything about its caller is consulted:
//! the route, the Host header and the token. They are pure functions of the request head, so the
//! fuzz target (`agent/fuzz`) runs exactly what the server runs.

use std::net::SocketAddr;

use http::{HeaderMap, Method, StatusCode, header};

use crate::token::{self, TokenClaims};

pub const CREDENTIALS_PATH: &str = "/v1/credentials";

/// Where a request goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Credentials,
    MethodNotAllowed,
    NotFound,
}

pub fn route(method: &Method, path: &str) -> Route {
    match (method, path) {
        (&Method::GET, CREDENTIALS_PATH) => Route::Credentials,
        (_, CREDENTIALS_PATH) => Route::MethodNotAllowed,
        _ => Route::NotFound,
    }
}

/// An answer other than credentials: status, why (a metrics label) and a text body for the
/// client and the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: Reason,
    pub message: String,
}

/// Why a credential request was refused: the `reason` label of
/// `pod_identity_agent_refused_requests`, and what the pod's statistics count it as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The caller's cgroup was gone before it could be resolved.
    CgroupUnknown,
    /// The caller runs in a cgroup of no pod (a node process).
    NotAPod,
    /// The Host header names no credential address.
    HostNotAllowed,
    /// The token is missing, unreadable or expired.
    TokenInvalid,
    /// The token names another pod than the caller.
    TokenPodMismatch,
    /// The pod is over its request rate (`--pod-rps`, `--pod-burst`).
    PodRateLimited,
    /// The credential source failed or refused.
    UpstreamError,
}

impl Reason {
    pub const ALL: [Reason; 7] = [
        Reason::CgroupUnknown,
        Reason::NotAPod,
        Reason::HostNotAllowed,
        Reason::TokenInvalid,
        Reason::TokenPodMismatch,
        Reason::PodRateLimited,
        Reason::UpstreamError,
    ];

    pub fn as_label(self) -> &'static str {
        match self {
            Reason::CgroupUnknown => "cgroup_unknown",
            Reason::NotAPod => "not_a_pod",
            Reason::HostNotAllowed => "host_not_allowed",
            Reason::TokenInvalid => "token_invalid",
            Reason::TokenPodMismatch => "token_pod_mismatch",
            Reason::PodRateLimited => "pod_rate_limited",
            Reason::UpstreamError => "upstream_error",
        }
    }
}

impl Refusal {
    pub fn new(status: StatusCode, reason: Reason, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            reason,
            message: message.into(),
        }
    }
}

/// The Host header values that name an intercepted address: `a.b.c.d`, `[v6]`, and both with
/// the port (bare form only when the port is 80, the HTTP default).
pub fn allowed_hosts(intercept: &[SocketAddr]) -> Vec<String> {
    let mut hosts = Vec::new();
    for addr in intercept {
        let forms: Vec<String> = match addr {
            SocketAddr::V4(a) => vec![a.ip().to_string(), format!("[{}]", a.ip().to_ipv6_mapped())],
            SocketAddr::V6(a) => vec![format!("[{}]", a.ip())],
        };
        for host in forms {
            if addr.port() == 80 {
                hosts.push(host.clone());
            }
            hosts.push(format!("{host}:{}", addr.port()));
        }
    }
    hosts
}

/// The Host header must name a credential address (no DNS rebinding, no proxying).
pub fn check_host(headers: &HeaderMap, allowed: &[String]) -> Result<(), Refusal> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if allowed.iter().any(|a| a.eq_ignore_ascii_case(host)) {
        Ok(())
    } else {
        Err(Refusal::new(
            StatusCode::FORBIDDEN,
            Reason::HostNotAllowed,
            format!("Host header {host:?} is not a credential address served by this agent"),
        ))
    }
}

/// The raw token (trimmed) from `Authorization`, and its claims checked at `now` (Unix seconds).
pub fn token(headers: &HeaderMap, now: u64) -> Result<(&str, TokenClaims), Refusal> {
    let raw = match headers.get(header::AUTHORIZATION) {
        None => "",
        Some(value) => value.to_str().map_err(|_| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                Reason::TokenInvalid,
                "Authorization header is not valid text",
            )
        })?,
    };
    let claims = token::parse(raw, now)
        .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, Reason::TokenInvalid, e.to_string()))?;
    Ok((raw.trim(), claims))
}

/// Whether the request presents `token` (as [`token`] returned it), the check a pod's
/// remembered token needs before its claims are reused.
pub fn same_token(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .is_some_and(|value| same_bytes(value.as_bytes().trim_ascii(), token.as_bytes()))
}

/// Equal bytes, compared eight at a time and in a time that depends on the length alone: the
/// remembered token is a secret, and `==` would call the C library's `memcmp`, which in the
/// static build (musl's) compares one byte per step: 5,000 instructions for a 1 KiB token, a
/// quarter of a cached request's (docs/performance.md).
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (a_words, a_rest) = a.as_chunks::<8>();
    let (b_words, b_rest) = b.as_chunks::<8>();
    let words = a_words.iter().zip(b_words).fold(0, |diff, (x, y)| {
        diff | (u64::from_ne_bytes(*x) ^ u64::from_ne_bytes(*y))
    });
    let rest = a_rest
        .iter()
        .zip(b_rest)
        .fold(0, |diff, (x, y)| diff | u64::from(x ^ y));
    words | rest == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_bytes_is_equality() {
        let token = "eyJhbGciOiJSUzI1NiJ9.payload-of-some-length.signature-bytes";
        assert!(same_bytes(token.as_bytes(), token.as_bytes()));
        assert!(same_bytes(b"", b""));
        for i in 0..token.len() {
            let mut other = token.as_bytes().to_vec();
            other[i] ^= 1;
            assert!(!same_bytes(token.as_bytes(), &other), "byte {i}");
        }
        assert!(!same_bytes(token.as_bytes(), &token.as_bytes()[1..]));
    }

    #[test]
    fn routes() {
        assert_eq!(route(&Method::GET, CREDENTIALS_PATH), Route::Credentials);
        assert_eq!(
            route(&Method::POST, CREDENTIALS_PATH),
            Route::MethodNotAllowed
        );
        assert_eq!(route(&Method::GET, "/v1/credentials/"), Route::NotFound);
    }

    #[test]
    fn host_and_token_checks() {
        let allowed = allowed_hosts(&["169.254.170.23:80".parse().unwrap()]);
        let mut h = HeaderMap::new();
        assert_eq!(
            check_host(&h, &allowed).unwrap_err().status,
            StatusCode::FORBIDDEN
        );
        h.insert(header::HOST, "169.254.170.23".parse().unwrap());
        assert!(check_host(&h, &allowed).is_ok());
        assert_eq!(token(&h, 0).unwrap_err().reason, Reason::TokenInvalid);
        h.insert(
            header::AUTHORIZATION,
            http::HeaderValue::from_static(" a.b.c "),
        );
        assert!(same_token(&h, "a.b.c") && !same_token(&h, "a.b.d"));
        h.insert(
            header::AUTHORIZATION,
            http::HeaderValue::from_bytes(b"\xff").unwrap(),
        );
        assert!(token(&h, 0).unwrap_err().message.contains("not valid text"));
    }

    #[test]
    fn allowed_hosts_cover_each_form() {
        let hosts = allowed_hosts(&[
            "169.254.170.23:80".parse().unwrap(),
            "[fd00:ec2::23]:80".parse().unwrap(),
        ]);
        for h in [
            "169.254.170.23",
            "169.254.170.23:80",
            "[fd00:ec2::23]",
            "[fd00:ec2::23]:80",
            "[::ffff:169.254.170.23]",
        ] {
            assert!(hosts.iter().any(|x| x == h), "{h} missing from {hosts:?}");
        }
        let hosts = allowed_hosts(&["169.254.170.23:8080".parse().unwrap()]);
        assert_eq!(
            hosts,
            vec!["169.254.170.23:8080", "[::ffff:169.254.170.23]:8080"]
        );
    }
}
