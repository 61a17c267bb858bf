//! Per-pod statistics: what each pod asked for, what it got, and how fast. Served as JSON at
//! `GET /v1/pods` on the probe address and shown by `pod-identity-agent pods`.
//!
//! Keyed by the pod UID the kernel attributed the caller to; the pod's name, namespace and
//! service account come from its token once the token is bound to it. A pod whose cgroup is gone
//! is dropped with the rest of its state.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{credentials::expiration_string, token::PodUid, upstream::SessionScope};

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
    /// Session tags on, and a session policy, as the source assumed the role (sts mode; EKS
    /// Auth does not say, and `associations --pods` reads them from the association).
    pub session: Option<SessionScope>,
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
    /// Connects to IMDS from the pod (the IMDS guard, eBPF mode), refused ones included.
    pub imds_connects: u64,
    /// Of those, refused (`--imds deny`).
    pub imds_denied: u64,
    pub imds_last_age_seconds: Option<f64>,
    /// The pod's cgroup, as the IMDS guard found it (it names a pod that never asked for
    /// credentials, whose name is unknown).
    pub cgroup: String,
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

/// What the server learned from one request.
pub struct RequestRecord<'a> {
    pub class: RequestClass,
    pub latency: Duration,
    /// Set when the token was bound to this pod and its identity is news to the caller (a new
    /// token on the connection): the identity of a pod rarely changes, so it is not written per
    /// request.
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
    /// The role and association, when they are news to the caller (new credentials on the
    /// connection).
    pub role: Option<(&'a str, &'a str, Option<SessionScope>)>,
    pub expiration: SystemTime,
    pub cache_hit: bool,
    pub upstream_call: bool,
}

/// One pod's figures. The counters are atomics, written by every request without a lock; the
/// strings, which change rarely, sit behind a lock of this pod's own.
#[derive(Default)]
pub struct PodEntry {
    requests: AtomicU64,
    cache_hits: AtomicU64,
    upstream_calls: AtomicU64,
    kernel_redirects: AtomicU64,
    /// bad token, refused, rate limited, upstream client, upstream server.
    errors: [AtomicU64; 5],
    /// Microseconds since the Unix epoch; 0: never.
    last_request_us: AtomicU64,
    /// Seconds since the Unix epoch; 0: none served.
    credential_expiry: AtomicU64,
    latency: LatencyHistogram,
    imds_connects: AtomicU64,
    imds_denied: AtomicU64,
    /// Microseconds since the Unix epoch; 0: never.
    imds_last_us: AtomicU64,
    strings: Mutex<PodStrings>,
}

#[derive(Default)]
struct PodStrings {
    namespace: String,
    pod: String,
    service_account: String,
    role_arn: String,
    association_id: String,
    session: Option<SessionScope>,
    last_error: Option<(u16, String, SystemTime)>,
    cgroup: String,
}

/// Seconds from `us` (microseconds since the Unix epoch; 0: never) to `now`.
fn age_seconds(us: u64, now: SystemTime) -> Option<f64> {
    (us > 0).then(|| unix_micros(now).saturating_sub(us) as f64 / 1e6)
}

fn unix_micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

impl PodEntry {
    /// A redirected connection from this pod was accepted.
    pub fn connection(&self) {
        self.kernel_redirects.fetch_add(1, Ordering::Relaxed);
    }

    pub fn request(&self, r: RequestRecord<'_>) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.last_request_us
            .store(unix_micros(SystemTime::now()), Ordering::Relaxed);
        let error_index = match r.class {
            RequestClass::Ok => None,
            RequestClass::BadToken => Some(0),
            RequestClass::Refused => Some(1),
            RequestClass::RateLimited => Some(2),
            RequestClass::UpstreamClient => Some(3),
            RequestClass::UpstreamServer => Some(4),
        };
        if let Some(i) = error_index {
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        }
        if let Some(s) = &r.served {
            let expiry = s
                .expiration
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.credential_expiry.store(expiry, Ordering::Relaxed);
            self.cache_hits
                .fetch_add(u64::from(s.cache_hit), Ordering::Relaxed);
            self.upstream_calls
                .fetch_add(u64::from(s.upstream_call), Ordering::Relaxed);
        }
        self.latency.observe(r.latency);
        let role = r.served.as_ref().and_then(|s| s.role);
        if r.identity.is_some() || role.is_some() || r.error.is_some() {
            let mut strings = self.strings.lock().unwrap_or_else(|e| e.into_inner());
            // Assign only on change: the same strings arrive with every token of a pod.
            let set = |field: &mut String, value: &str| {
                if field != value {
                    value.clone_into(field);
                }
            };
            if let Some(id) = r.identity {
                set(&mut strings.namespace, id.namespace);
                set(&mut strings.pod, id.pod);
                set(&mut strings.service_account, id.service_account);
            }
            if let Some((role_arn, association_id, scope)) = role {
                set(&mut strings.role_arn, role_arn);
                set(&mut strings.association_id, association_id);
                strings.session = scope;
            }
            if let Some((status, code)) = r.error {
                strings.last_error = Some((status, code.to_owned(), SystemTime::now()));
            }
        }
    }

    /// Connects to IMDS from the pod's cgroup `cgroup` (the kernel's count since the last pass).
    pub fn imds(&self, connects: u64, denied: u64, at: SystemTime, cgroup: &str) {
        self.imds_connects.fetch_add(connects, Ordering::Relaxed);
        self.imds_denied.fetch_add(denied, Ordering::Relaxed);
        self.imds_last_us.store(unix_micros(at), Ordering::Relaxed);
        let mut strings = self.strings.lock().unwrap_or_else(|e| e.into_inner());
        if strings.cgroup != cgroup {
            cgroup.clone_into(&mut strings.cgroup);
        }
    }

    /// The pod's namespace and name, once a token of it was bound to it.
    pub fn names(&self) -> Option<(String, String)> {
        let strings = self.strings.lock().unwrap_or_else(|e| e.into_inner());
        (!strings.pod.is_empty()).then(|| (strings.namespace.clone(), strings.pod.clone()))
    }

    fn row(&self, uid: &PodUid, now: SystemTime) -> PodStats {
        let strings = self.strings.lock().unwrap_or_else(|e| e.into_inner());
        let last_us = self.last_request_us.load(Ordering::Relaxed);
        let expiry = self.credential_expiry.load(Ordering::Relaxed);
        PodStats {
            pod_uid: uid.to_string(),
            namespace: strings.namespace.clone(),
            pod: strings.pod.clone(),
            service_account: strings.service_account.clone(),
            role_arn: strings.role_arn.clone(),
            association_id: strings.association_id.clone(),
            session: strings.session,
            requests: self.requests.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            upstream_calls: self.upstream_calls.load(Ordering::Relaxed),
            errors: ErrorCounts {
                bad_token: self.errors[0].load(Ordering::Relaxed),
                refused: self.errors[1].load(Ordering::Relaxed),
                rate_limited: self.errors[2].load(Ordering::Relaxed),
                upstream_client: self.errors[3].load(Ordering::Relaxed),
                upstream_server: self.errors[4].load(Ordering::Relaxed),
            },
            kernel_redirects: self.kernel_redirects.load(Ordering::Relaxed),
            last_request_age_seconds: age_seconds(last_us, now),
            credential_expiry: (expiry > 0)
                .then(|| expiration_string(UNIX_EPOCH + Duration::from_secs(expiry))),
            latency_p50_ms: self.latency.quantile_ms(0.50),
            latency_p99_ms: self.latency.quantile_ms(0.99),
            last_error: strings
                .last_error
                .as_ref()
                .map(|(status, code, at)| LastError {
                    status: *status,
                    code: code.clone(),
                    age_seconds: now.duration_since(*at).unwrap_or_default().as_secs_f64(),
                }),
            imds_connects: self.imds_connects.load(Ordering::Relaxed),
            imds_denied: self.imds_denied.load(Ordering::Relaxed),
            imds_last_age_seconds: age_seconds(self.imds_last_us.load(Ordering::Relaxed), now),
            cgroup: strings.cgroup.clone(),
        }
    }
}

/// Every pod's entry. The map is locked only to find or add a pod (once per connection) and to
/// drop or list pods; requests count on the entry itself.
#[derive(Default)]
pub struct PodStatsRegistry {
    pods: RwLock<HashMap<PodUid, Arc<PodEntry>>>,
}

impl PodStatsRegistry {
    /// The pod's entry, created on its first connection.
    pub fn entry(&self, pod: &PodUid) -> Arc<PodEntry> {
        if let Some(entry) = self.pods.read().unwrap_or_else(|e| e.into_inner()).get(pod) {
            return entry.clone();
        }
        self.pods
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(*pod)
            .or_default()
            .clone()
    }

    /// Every pod with an entry.
    pub fn uids(&self) -> HashSet<PodUid> {
        self.pods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Forgets pods that no longer exist; returns the (namespace, name) of those it forgot.
    pub fn forget(&self, gone: &HashSet<PodUid>) -> Vec<(String, String)> {
        let mut forgotten = Vec::new();
        if gone.is_empty() {
            return forgotten;
        }
        self.pods
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|uid, entry| {
                let keep = !gone.contains(uid);
                if !keep {
                    let strings = entry.strings.lock().unwrap_or_else(|e| e.into_inner());
                    forgotten.push((strings.namespace.clone(), strings.pod.clone()));
                }
                keep
            });
        forgotten
    }

    /// The pods whose last request is older than `idle` (or that never made one that long
    /// after their entry was made). Without cgroups nothing says a pod is gone; a pod silent
    /// this long has no credentials left worth keeping its state for.
    pub fn idle(&self, idle: Duration) -> HashSet<PodUid> {
        let cutoff = unix_micros(SystemTime::now()).saturating_sub(idle.as_micros() as u64);
        self.pods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, e)| e.last_request_us.load(Ordering::Relaxed) < cutoff)
            .map(|(uid, _)| *uid)
            .collect()
    }

    pub fn snapshot(&self) -> Vec<PodStats> {
        let now = SystemTime::now();
        let pods: Vec<(PodUid, Arc<PodEntry>)> = self
            .pods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(u, e)| (*u, e.clone()))
            .collect();
        pods.iter()
            .map(|(uid, entry)| entry.row(uid, now))
            .collect()
    }
}

/// Request latencies of one pod since its first request, in buckets a quarter-octave wide
/// (each 2^(1/4), about 19%, wider than the last) from 10 µs to about 35 s: 88 counters, and
/// quantiles within a bucket's width.
struct LatencyHistogram {
    counts: [AtomicU32; LATENCY_BUCKETS],
}

const LATENCY_BUCKETS: usize = 88;
const LATENCY_FIRST_BOUND_US: f64 = 10.0;
const LATENCY_STEPS_PER_OCTAVE: f64 = 4.0;

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }
}

impl LatencyHistogram {
    /// Upper bound of bucket `i`, in microseconds.
    fn bound_us(i: usize) -> f64 {
        LATENCY_FIRST_BOUND_US * (i as f64 / LATENCY_STEPS_PER_OCTAVE).exp2()
    }

    fn observe(&self, latency: Duration) {
        let us = latency.as_secs_f64() * 1e6;
        let i = if us <= LATENCY_FIRST_BOUND_US {
            0
        } else {
            ((us / LATENCY_FIRST_BOUND_US).log2() * LATENCY_STEPS_PER_OCTAVE).ceil() as usize
        };
        self.counts[i.min(LATENCY_BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
    }

    /// The `q` quantile in milliseconds, interpolated within its bucket; `None` before any
    /// request.
    fn quantile_ms(&self, q: f64) -> Option<f64> {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| u64::from(c.load(Ordering::Relaxed)))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0);
        let mut seen = 0u64;
        for (i, &c) in counts.iter().enumerate() {
            if c > 0 && (seen + c) as f64 >= rank {
                let lower = if i == 0 { 0.0 } else { Self::bound_us(i - 1) };
                let upper = Self::bound_us(i);
                let within = (rank - seen as f64) / c as f64;
                return Some((lower + (upper - lower) * within) / 1000.0);
            }
            seen += c;
        }
        None
    }
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
        let a = reg.entry(&uid(1));
        a.connection();
        reg.entry(&uid(1)).connection();
        for ms in 1..=100u64 {
            a.request(RequestRecord {
                class: RequestClass::Ok,
                latency: Duration::from_millis(ms),
                identity: (ms == 1).then_some(Identity {
                    namespace: "ns",
                    pod: "web-0",
                    service_account: "sa",
                }),
                served: Some(Served {
                    role: (ms == 1).then_some((
                        "arn:aws:sts::123456789012:assumed-role/r/x",
                        "a-1",
                        None,
                    )),
                    expiration: SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_950_000),
                    cache_hit: ms > 1,
                    upstream_call: ms == 1,
                }),
                error: None,
            });
        }
        a.request(RequestRecord {
            class: RequestClass::RateLimited,
            latency: Duration::ZERO,
            identity: None,
            served: None,
            error: Some((429, "pod_rate_limited")),
        });
        reg.entry(&uid(2)).request(RequestRecord {
            class: RequestClass::Refused,
            latency: Duration::ZERO,
            identity: None,
            served: None,
            error: Some((403, "token_pod_mismatch")),
        });
        let mut rows = reg.snapshot();
        rows.sort_by(|x, y| x.pod_uid.cmp(&y.pod_uid));
        let p = &rows[0];
        assert_eq!(
            (
                p.namespace.as_str(),
                p.pod.as_str(),
                p.service_account.as_str()
            ),
            ("ns", "web-0", "sa")
        );
        assert_eq!(
            (p.role_arn.as_str(), p.association_id.as_str()),
            ("arn:aws:sts::123456789012:assumed-role/r/x", "a-1")
        );
        assert_eq!(
            (
                p.requests,
                p.cache_hits,
                p.upstream_calls,
                p.kernel_redirects
            ),
            (101, 99, 1, 2)
        );
        assert_eq!(p.errors.rate_limited, 1);
        let last = p.last_error.as_ref().unwrap();
        assert_eq!((last.status, last.code.as_str()), (429, "pod_rate_limited"));
        assert_eq!(p.credential_expiry.as_deref(), Some("2026-11-29T11:00:00Z"));
        // Within a quarter octave of the true 50 ms and 99 ms (101 samples, one of them 0).
        let (p50, p99) = (p.latency_p50_ms.unwrap(), p.latency_p99_ms.unwrap());
        assert!((42.0..=60.0).contains(&p50), "p50 {p50}");
        assert!((84.0..=118.0).contains(&p99), "p99 {p99}");
        assert_eq!(rows[1].errors.refused, 1);
        assert_eq!(
            reg.forget(&HashSet::from([uid(1)])),
            vec![("ns".to_owned(), "web-0".to_owned())]
        );
        assert_eq!(reg.snapshot().len(), 1);
    }

    #[test]
    fn latency_histogram_quantiles() {
        let h = LatencyHistogram::default();
        assert_eq!(h.quantile_ms(0.5), None);
        h.observe(Duration::from_micros(3));
        let only = h.quantile_ms(0.99).unwrap();
        assert!(only <= 0.010, "{only}");
        for _ in 0..98 {
            h.observe(Duration::from_micros(200));
        }
        h.observe(Duration::from_secs(100));
        let p50 = h.quantile_ms(0.5).unwrap();
        // 200 µs lies in the bucket (190 µs, 226 µs]: the answer is within it.
        assert!((0.19..=0.227).contains(&p50), "{p50}");
        // Past the last bound: counted in the last bucket, about 40 s.
        let max = h.quantile_ms(1.0).unwrap();
        assert!((30_000.0..=50_000.0).contains(&max), "{max}");
    }
}
