//! The IMDS guard's user-space half. The connect programs count each cgroup's connects to the
//! instance metadata service (`--imds audit|deny`) and, in deny mode, refuse those from pods
//! with their own network namespace. Each upkeep pass takes the counts, gives them to the pods
//! the cgroups belong to (their statistics, the metrics), and names in the log, at most every
//! five minutes per pod, each pod that still reaches for the node role's credentials.
//!
//! Connects from node processes (no pod: the VPC CNI, kube-proxy, the kubelet's credential
//! helpers) are expected and not reported.

use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use tracing::warn;

use crate::{
    attribution::{Caller, CgroupIndex, Resolved},
    config::ImdsMode,
    kernel::Redirector,
    metrics::{Counter, EncodeLabelSet, Family, Registry},
    stats::PodStatsRegistry,
    token::PodUid,
};

/// A pod is named in the log at most this often.
const LOG_EVERY: Duration = Duration::from_secs(300);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodLabels {
    pod_uid: String,
    verdict: &'static str,
}

pub struct ImdsGuard {
    mode: ImdsMode,
    allowed: Counter,
    denied: Counter,
    per_pod: Option<Family<PodLabels, Counter>>,
    /// Per pod: when it was last named in the log, and its connects since (or since the first
    /// one, before the first line).
    logged: Mutex<HashMap<PodUid, Reported>>,
}

struct Reported {
    since: SystemTime,
    last_line: Option<Instant>,
    connects: u64,
    denied: u64,
}

impl ImdsGuard {
    /// The guard's series: pods' IMDS connects by verdict, and per pod with `per_pod`
    /// (`--metrics-per-pod`, labelled by pod UID: a pod that never asked for credentials has no
    /// known name).
    pub fn register(registry: &mut Registry, mode: ImdsMode, per_pod: bool) -> ImdsGuard {
        let family = Family::<VerdictLabels, Counter>::default();
        registry.register(
            "imds_connects",
            "Pods' connects to the instance metadata service (--imds audit or deny), by verdict: allowed (audit mode; hostNetwork pods in deny mode), denied (refused with EPERM in deny mode). Node processes are not counted",
            family.clone(),
        );
        let per_pod = per_pod.then(|| {
            let family = Family::<PodLabels, Counter>::default();
            registry.register(
                "pod_imds_connects",
                "Connects to the instance metadata service per pod UID and verdict (--metrics-per-pod)",
                family.clone(),
            );
            family
        });
        ImdsGuard {
            mode,
            allowed: family.get_or_create_owned(&VerdictLabels { verdict: "allowed" }),
            denied: family.get_or_create_owned(&VerdictLabels { verdict: "denied" }),
            per_pod,
            logged: Mutex::default(),
        }
    }

    /// One upkeep pass: the kernel's counts since the last one, attributed to pods. Blocking (a
    /// cgroup it has not seen yet costs a walk of the tree): run it off the async runtime.
    pub fn pass(&self, redirector: &Redirector, index: &CgroupIndex, stats: &PodStatsRegistry) {
        let now = Instant::now();
        for (cgroup_id, count) in redirector.take_imds_callers() {
            let resolved = match index.lookup(cgroup_id, now) {
                Resolved::Unknown => index.rewalk(cgroup_id, now).unwrap_or(Resolved::Gone),
                known => known,
            };
            let Resolved::Caller(caller) = resolved else {
                continue;
            };
            let Caller::Pod { uid, cgroup } = &*caller else {
                continue;
            };
            let allowed = count.connects.saturating_sub(count.denied);
            self.allowed.inc_by(allowed);
            self.denied.inc_by(count.denied);
            if let Some(family) = &self.per_pod {
                for (verdict, n) in [("allowed", allowed), ("denied", count.denied)] {
                    if n > 0 {
                        let labels = PodLabels {
                            pod_uid: uid.to_string(),
                            verdict,
                        };
                        family.get_or_create(&labels).inc_by(n);
                    }
                }
            }
            let entry = stats.entry(uid);
            entry.imds(count.connects, count.denied, SystemTime::now(), cgroup);
            self.report(
                uid,
                cgroup,
                &entry.names(),
                count.connects,
                count.denied,
                now,
            );
        }
    }

    /// The log line for a pod, once per [`LOG_EVERY`] at most, counting what came between.
    fn report(
        &self,
        uid: &PodUid,
        cgroup: &str,
        names: &Option<(String, String)>,
        connects: u64,
        denied: u64,
        now: Instant,
    ) {
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        let r = logged.entry(*uid).or_insert_with(|| Reported {
            since: SystemTime::now(),
            last_line: None,
            connects: 0,
            denied: 0,
        });
        r.connects += connects;
        r.denied += denied;
        if r.last_line
            .is_some_and(|at| now.duration_since(at) < LOG_EVERY)
        {
            return;
        }
        let who = match names {
            Some((namespace, pod)) => format!("pod {namespace}/{pod} (uid {uid})"),
            None => format!(
                "pod uid {uid} (cgroup {cgroup}; its name is known once it asks for credentials)"
            ),
        };
        let since = crate::credentials::expiration_string(r.since);
        match self.mode {
            ImdsMode::Deny => warn!(
                pod_uid = %uid,
                connects = r.connects,
                denied = r.denied,
                "{who} connected to IMDS {} times since {since}, {} refused (--imds deny); it is looking for the node role's credentials",
                r.connects, r.denied
            ),
            _ => warn!(
                pod_uid = %uid,
                connects = r.connects,
                "{who} connected to IMDS {} times since {since}; it gets the node role's credentials",
                r.connects
            ),
        }
        r.last_line = Some(now);
        r.since = SystemTime::now();
        r.connects = 0;
        r.denied = 0;
    }

    /// Drops what is kept for pods that are gone (their log state and per-pod series).
    pub fn forget(&self, gone: &HashSet<PodUid>) {
        if gone.is_empty() {
            return;
        }
        self.logged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|uid, _| !gone.contains(uid));
        if let Some(family) = &self.per_pod {
            for uid in gone {
                for verdict in ["allowed", "denied"] {
                    family.remove(&PodLabels {
                        pod_uid: uid.to_string(),
                        verdict,
                    });
                }
            }
        }
    }
}
