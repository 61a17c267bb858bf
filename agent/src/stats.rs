//! Per-pod statistics: what each pod asked for, what it got, and how fast. Served as JSON at
//! `GET /v1/pods` on the probe address and shown by `pod-identity-agent pods`.
//!
//! Keyed by the pod UID the kernel attributed the caller to; the pod's name, namespace and
//! service account come from its token once the token is bound to it. A pod whose cgroup is gone
//! is dropped with the rest of its state.

use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use crate::{credentials::expiration_string, token::PodUid};

/// Latency samples kept per pod for p50/p99 (the most recent ones).
const LATENCY_SAMPLES: usize = 256;

/// How a request ended, for the per-pod error classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestClass {
    Ok,
    /// 400: bad or expired token.
    BadToken,
    /// 403: attribution or token binding refused it.
    Refused,
    /// 429 from the per-pod limit.
    RateLimited,
    /// An EKS Auth error passed on (4xx from upstream).
    UpstreamClient,
    /// EKS Auth failed or was unreachable (5xx, 502, 504, budget).
    UpstreamServer,
}

/// One pod's row: the JSON of `/v1/pods` and the `pods` table. Fields added later default when
/// an older agent's JSON lacks them (`associations --pods` reads what any agent printed).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct PodStats {
    pub pod_uid: String,
    pub namespace: String,
    pub pod: String,
    pub service_account: String,
    pub role_arn: String,
    pub association_id: String,
    pub requests: u64,
    pub cache_hits: u64,
    pub upstream_calls: u64,
    pub errors: ErrorCounts,
    /// Connections the kernel redirected for this pod that reached the agent.
    pub kernel_redirects: u64,
    pub last_request_age_seconds: Option<f64>,
    /// RFC 3339, of the credentials last handed to the pod.
    pub credential_expiry: Option<String>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    /// The pod's latest refused request: why it got no credentials.
    pub last_error: Option<LastError>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LastError {
    pub status: u16,
    /// EKS Auth's error code (`ResourceNotFoundException`, ...) when EKS Auth refused, else the
    /// agent's refusal reason (`token_pod_mismatch`, `pod_rate_limited`, ...).
    pub code: String,
    pub age_seconds: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ErrorCounts {
    pub bad_token: u64,
    pub refused: u64,
    pub rate_limited: u64,
    pub upstream_client: u64,
    pub upstream_server: u64,
}

#[derive(Default)]
struct PodRecord {
    namespace: String,
    pod: String,
    service_account: String,
    role_arn: String,
    association_id: String,
    requests: u64,
    cache_hits: u64,
    upstream_calls: u64,
    errors: ErrorCounts,
    kernel_redirects: u64,
    last_request: Option<SystemTime>,
    credential_expiry: Option<SystemTime>,
    latencies: Vec<f32>,
    next_sample: usize,
    last_error: Option<(u16, String, SystemTime)>,
}

/// What the server learned from one request.
pub struct RequestRecord<'a> {
    pub class: RequestClass,
    pub latency: Duration,
    /// Set when the token was bound to this pod.
    pub identity: Option<Identity<'a>>,
    /// Set when credentials were served.
    pub served: Option<Served<'a>>,
    /// Set when the request was refused: its status, and EKS Auth's error code or the agent's
    /// refusal reason.
    pub error: Option<(u16, &'a str)>,
}

pub struct Identity<'a> {
    pub namespace: &'a str,
    pub pod: &'a str,
    pub service_account: &'a str,
}

pub struct Served<'a> {
    pub role_arn: &'a str,
    pub association_id: &'a str,
    pub expiration: SystemTime,
    pub cache_hit: bool,
    pub upstream_call: bool,
}

#[derive(Default)]
pub struct PodStatsRegistry {
    pods: Mutex<HashMap<PodUid, PodRecord>>,
}

impl PodStatsRegistry {
    fn with<R>(&self, f: impl FnOnce(&mut HashMap<PodUid, PodRecord>) -> R) -> R {
        f(&mut self.pods.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A redirected connection from `pod` was accepted.
    pub fn connection(&self, pod: &PodUid) {
        self.with(|pods| pods.entry(pod.clone()).or_default().kernel_redirects += 1);
    }

    pub fn request(&self, pod: &PodUid, r: RequestRecord<'_>) {
        self.with(|pods| {
            let p = pods.entry(pod.clone()).or_default();
            p.requests += 1;
            p.last_request = Some(SystemTime::now());
            match r.class {
                RequestClass::Ok => {}
                RequestClass::BadToken => p.errors.bad_token += 1,
                RequestClass::Refused => p.errors.refused += 1,
                RequestClass::RateLimited => p.errors.rate_limited += 1,
                RequestClass::UpstreamClient => p.errors.upstream_client += 1,
                RequestClass::UpstreamServer => p.errors.upstream_server += 1,
            }
            // Assign only on change: the same strings arrive with every request of a pod.
            let set = |field: &mut String, value: &str| {
                if field != value {
                    value.clone_into(field);
                }
            };
            if let Some(id) = r.identity {
                set(&mut p.namespace, id.namespace);
                set(&mut p.pod, id.pod);
                set(&mut p.service_account, id.service_account);
            }
            if let Some(s) = r.served {
                set(&mut p.role_arn, s.role_arn);
                set(&mut p.association_id, s.association_id);
                p.credential_expiry = Some(s.expiration);
                p.cache_hits += u64::from(s.cache_hit);
                p.upstream_calls += u64::from(s.upstream_call);
            }
            if let Some((status, code)) = r.error {
                p.last_error = Some((status, code.to_owned(), SystemTime::now()));
            }
            let ms = r.latency.as_secs_f32() * 1000.0;
            if p.latencies.len() < LATENCY_SAMPLES {
                p.latencies.push(ms);
            } else {
                p.latencies[p.next_sample] = ms;
            }
            p.next_sample = (p.next_sample + 1) % LATENCY_SAMPLES;
        })
    }

    /// Forgets pods that no longer exist; returns the (namespace, name) of those it forgot.
    pub fn retain(&self, present: &HashSet<PodUid>) -> Vec<(String, String)> {
        let mut gone = Vec::new();
        self.with(|pods| {
            pods.retain(|uid, p| {
                let keep = present.contains(uid);
                if !keep {
                    gone.push((p.namespace.clone(), p.pod.clone()));
                }
                keep
            })
        });
        gone
    }

    pub fn snapshot(&self) -> Vec<PodStats> {
        let now = SystemTime::now();
        self.with(|pods| {
            pods.iter()
                .map(|(uid, p)| {
                    let mut sorted = p.latencies.clone();
                    sorted.sort_by(f32::total_cmp);
                    PodStats {
                        pod_uid: uid.to_string(),
                        namespace: p.namespace.clone(),
                        pod: p.pod.clone(),
                        service_account: p.service_account.clone(),
                        role_arn: p.role_arn.clone(),
                        association_id: p.association_id.clone(),
                        requests: p.requests,
                        cache_hits: p.cache_hits,
                        upstream_calls: p.upstream_calls,
                        errors: p.errors.clone(),
                        kernel_redirects: p.kernel_redirects,
                        last_request_age_seconds: p
                            .last_request
                            .map(|t| now.duration_since(t).unwrap_or_default().as_secs_f64()),
                        credential_expiry: p.credential_expiry.map(expiration_string),
                        latency_p50_ms: quantile(&sorted, 0.50),
                        latency_p99_ms: quantile(&sorted, 0.99),
                        last_error: p.last_error.as_ref().map(|(status, code, at)| LastError {
                            status: *status,
                            code: code.clone(),
                            age_seconds: now.duration_since(*at).unwrap_or_default().as_secs_f64(),
                        }),
                    }
                })
                .collect()
        })
    }
}

/// Nearest-rank quantile of sorted samples.
fn quantile(sorted: &[f32], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(f64::from(sorted[rank - 1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(n: u8) -> PodUid {
        PodUid::parse(&format!("00000000-0000-0000-0000-0000000000{n:02x}")).unwrap()
    }

    #[test]
    fn counts_requests_errors_and_latency_per_pod() {
        let reg = PodStatsRegistry::default();
        let a = uid(1);
        reg.connection(&a);
        reg.connection(&a);
        for ms in 1..=100u64 {
            reg.request(
                &a,
                RequestRecord {
                    class: RequestClass::Ok,
                    latency: Duration::from_millis(ms),
                    identity: Some(Identity { namespace: "ns", pod: "web-0", service_account: "sa" }),
                    served: Some(Served {
                        role_arn: "arn:aws:sts::123456789012:assumed-role/r/x",
                        association_id: "a-1",
                        expiration: SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_950_000),
                        cache_hit: ms > 1,
                        upstream_call: ms == 1,
                    }),
                    error: None,
                },
            );
        }
        reg.request(
            &a,
            RequestRecord { class: RequestClass::RateLimited, latency: Duration::ZERO, identity: None, served: None, error: Some((429, "pod_rate_limited")) },
        );
        reg.request(&uid(2), RequestRecord { class: RequestClass::Refused, latency: Duration::ZERO, identity: None, served: None, error: Some((403, "token_pod_mismatch")) });
        let mut rows = reg.snapshot();
        rows.sort_by(|x, y| x.pod_uid.cmp(&y.pod_uid));
        let p = &rows[0];
        assert_eq!((p.namespace.as_str(), p.pod.as_str(), p.service_account.as_str()), ("ns", "web-0", "sa"));
        assert_eq!((p.requests, p.cache_hits, p.upstream_calls, p.kernel_redirects), (101, 99, 1, 2));
        assert_eq!(p.errors.rate_limited, 1);
        let last = p.last_error.as_ref().unwrap();
        assert_eq!((last.status, last.code.as_str()), (429, "pod_rate_limited"));
        assert_eq!(p.credential_expiry.as_deref(), Some("2026-11-29T11:00:00Z"));
        assert_eq!(p.latency_p50_ms, Some(50.0));
        assert_eq!(p.latency_p99_ms, Some(99.0));
        assert_eq!(rows[1].errors.refused, 1);
        assert_eq!(reg.retain(&HashSet::from([uid(2)])), vec![("ns".to_owned(), "web-0".to_owned())]);
        assert_eq!(reg.snapshot().len(), 1);
    }

    #[test]
    fn quantiles_use_nearest_rank() {
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[3.0], 0.99), Some(3.0));
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.5), Some(2.0));
    }
}
