//! The credential endpoint's own series: responses by status and refusal reason, their latency,
//! the time attribution takes at accept, and (with `--metrics-per-pod`) responses per pod.

use std::time::Duration;

use crate::{
    metrics::{AtomicHistogram, Counter, EncodeLabelSet, Family, Registry, Unit},
    request::Reason,
};

/// Statuses the endpoint answers; their counters are resolved once, so counting a response
/// touches no lock.
const STATUSES: [u16; 10] = [200, 400, 403, 404, 405, 429, 500, 502, 503, 504];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodLabels {
    namespace: String,
    pod: String,
    code: u16,
}

#[derive(Clone)]
pub struct ServerMetrics {
    requests: Family<CodeLabels, Counter>,
    by_status: [(u16, Counter); STATUSES.len()],
    duration: AtomicHistogram,
    refused: [Counter; Reason::ALL.len()],
    attribution: AtomicHistogram,
    per_pod: Option<Family<PodLabels, Counter>>,
}

impl ServerMetrics {
    /// `per_pod` adds a request counter with `namespace` and `pod` labels (small clusters only:
    /// one series per pod and status code).
    pub fn register(registry: &mut Registry, per_pod: bool) -> ServerMetrics {
        let requests = Family::<CodeLabels, Counter>::default();
        registry.register(
            "requests",
            "Credential endpoint responses by HTTP status code",
            requests.clone(),
        );
        let duration = AtomicHistogram::exponential(0.0001, 2.5, 14);
        registry.register_with_unit(
            "request_duration",
            "Time from request to response on the credential endpoint",
            Unit::Seconds,
            duration.clone(),
        );
        let refused_family = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "refused_requests",
            "Requests answered with an error, by reason: cgroup_unknown, not_a_pod (attribution); host_not_allowed; token_invalid, token_pod_mismatch (token binding); pod_rate_limited; upstream_error",
            refused_family.clone(),
        );
        let attribution = AtomicHistogram::exponential(0.000_000_5, 2.0, 16);
        registry.register_with_unit(
            "attribution_duration",
            "Time to take an accepted connection's record from the kernel map: one lookup-and-delete (two map commands before Linux 5.14)",
            Unit::Seconds,
            attribution.clone(),
        );
        let per_pod = per_pod.then(|| {
            let family = Family::<PodLabels, Counter>::default();
            registry.register(
                "pod_requests",
                "Credential endpoint responses per pod and status code (--metrics-per-pod)",
                family.clone(),
            );
            family
        });
        ServerMetrics {
            by_status: STATUSES
                .map(|code| (code, requests.get_or_create_owned(&CodeLabels { code }))),
            refused: Reason::ALL.map(|reason| {
                refused_family.get_or_create_owned(&ReasonLabels {
                    reason: reason.as_label(),
                })
            }),
            requests,
            duration,
            attribution,
            per_pod,
        }
    }

    /// One response of the credential endpoint; `pod` is (namespace, name) when known.
    pub fn observe_request(
        &self,
        code: u16,
        elapsed: Duration,
        refused: Option<Reason>,
        pod: Option<(&str, &str)>,
    ) {
        match self.by_status.iter().find(|(c, _)| *c == code) {
            Some((_, counter)) => counter.inc(),
            None => self.requests.get_or_create(&CodeLabels { code }).inc(),
        };
        self.duration.observe(elapsed);
        if let Some(reason) = refused {
            self.refused[reason as usize].inc();
        }
        if let (Some(family), Some((namespace, pod))) = (&self.per_pod, pod) {
            let labels = PodLabels {
                namespace: namespace.to_owned(),
                pod: pod.to_owned(),
                code,
            };
            family.get_or_create(&labels).inc();
        }
    }

    /// Drops the per-pod series of a pod that is gone.
    pub fn forget_pod(&self, namespace: &str, pod: &str) {
        if let Some(family) = &self.per_pod {
            for code in STATUSES {
                family.remove(&PodLabels {
                    namespace: namespace.to_owned(),
                    pod: pod.to_owned(),
                    code,
                });
            }
        }
    }

    /// Taking an accepted connection's kernel record took `elapsed`.
    pub fn observe_attribution(&self, elapsed: Duration) {
        self.attribution.observe(elapsed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_counters_are_indexed_by_reason() {
        for (i, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i, "{reason:?}");
        }
    }
}
