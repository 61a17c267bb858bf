//! Each pod's serving state: its statistics and what its last request left to reuse (the token
//! with its claims, digest and binding; the credentials last served). In eBPF mode it is found
//! once per connection, for the pod the kernel attributed the connection to; in link mode it is
//! made only once the credential source has accepted a token of the pod. It is dropped when the
//! pod's cgroup is gone (or, without cgroups, once the pod has been idle for long).

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Instant,
};

use http::StatusCode;
use pod_identity_common::Attribution;

use super::CredentialServer;
use crate::{
    attribution::{Caller, Resolved},
    credentials::TokenDigest,
    request::{Reason, Refusal},
    stats::PodEntry,
    token::{PodUid, TokenClaims},
    upstream::AssumedRole,
};

/// One pod's serving state.
pub struct PodState {
    pub(super) uid: PodUid,
    pub(super) stats: Arc<PodEntry>,
    /// What the pod's last request left to reuse. Only the pod's own requests take the lock.
    memo: Mutex<Memo>,
}

#[derive(Default)]
struct Memo {
    /// The last token the pod presented and bound to it.
    token: Option<Arc<BoundToken>>,
    /// The credentials last served to it: their role goes to the pod's statistics once.
    served: Option<Arc<AssumedRole>>,
}

/// A token whose claims, digest and binding are known.
pub(super) struct BoundToken {
    /// The Authorization header's value as sent (trimmed): the memo's key, and the very
    /// allocation the cache keeps to refresh with.
    pub raw: Arc<str>,
    pub claims: TokenClaims,
    pub digest: TokenDigest,
    /// `namespace/service-account`, the cache's check of a rotated token.
    pub account: Box<str>,
    /// `namespace/pod`, for logs.
    pub label: Box<str>,
}

impl BoundToken {
    pub fn new(raw: &str, claims: TokenClaims) -> BoundToken {
        BoundToken {
            digest: TokenDigest::of(raw),
            account: format!("{}/{}", claims.namespace, claims.service_account).into_boxed_str(),
            label: format!("{}/{}", claims.namespace, claims.pod_name).into_boxed_str(),
            raw: Arc::from(raw),
            claims,
        }
    }
}

impl PodState {
    /// The token the pod presented last.
    pub(super) fn remembered_token(&self) -> Option<Arc<BoundToken>> {
        self.memo
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .token
            .clone()
    }

    pub(super) fn remember_token(&self, token: Arc<BoundToken>) {
        self.memo.lock().unwrap_or_else(|e| e.into_inner()).token = Some(token);
    }

    /// Records `role` as served; true when it differs from what the pod was served last.
    pub(super) fn served_anew(&self, role: &Arc<AssumedRole>) -> bool {
        let mut memo = self.memo.lock().unwrap_or_else(|e| e.into_inner());
        let new = !memo
            .served
            .as_ref()
            .is_some_and(|last| Arc::ptr_eq(last, role));
        if new {
            memo.served = Some(role.clone());
        }
        new
    }
}

impl CredentialServer {
    /// A pod's serving state, created on first sight.
    pub(super) fn pod(&self, uid: &PodUid) -> Arc<PodState> {
        if let Some(pod) = self.pods.read().unwrap_or_else(|e| e.into_inner()).get(uid) {
            return pod.clone();
        }
        let state = PodState {
            stats: self.stats.entry(uid),
            memo: Mutex::default(),
            uid: *uid,
        };
        self.pods
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(*uid)
            .or_insert_with(|| Arc::new(state))
            .clone()
    }

    /// Drops the state of pods that are gone: serving state, statistics, rate buckets and
    /// per-pod metrics.
    pub fn forget_gone_pods(&self, gone: &HashSet<PodUid>) {
        // Nothing is gone on almost every pass: take no write lock the request path would wait on.
        if gone.is_empty() {
            return;
        }
        self.pods
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|uid, _| !gone.contains(uid));
        self.rate_limits.forget(gone);
        for (namespace, pod) in self.stats.forget(gone) {
            self.metrics.forget_pod(&namespace, &pod);
        }
    }

    /// The pod the kernel attributed a connection to, or why there is none. A cgroup the index
    /// has not seen is looked for with one walk of the tree, off the async runtime and shared by
    /// every connection that needs it.
    pub(super) async fn caller(
        &self,
        attribution: &Attribution,
        accepted_at: Instant,
    ) -> Result<PodUid, Refusal> {
        let id = attribution.cgroup_id;
        let resolved = match &self.cgroups {
            None => Resolved::Gone,
            Some(index) => match index.lookup(id, accepted_at) {
                Resolved::Unknown => {
                    let _one_walk = self.walking.lock().await;
                    match index.lookup(id, accepted_at) {
                        Resolved::Unknown => {
                            let index = index.clone();
                            tokio::task::spawn_blocking(move || index.rewalk(id, accepted_at))
                                .await
                                .ok()
                                .and_then(Result::ok)
                                .unwrap_or(Resolved::Gone)
                        }
                        known => known,
                    }
                }
                known => known,
            },
        };
        match resolved {
            Resolved::Caller(caller) => match &*caller {
                Caller::Pod { uid, .. } => Ok(*uid),
                Caller::Host { cgroup } => Err(Refusal::new(
                    StatusCode::FORBIDDEN,
                    Reason::NotAPod,
                    format!(
                        "caller runs in cgroup {cgroup}, which belongs to no pod; only pods get pod credentials"
                    ),
                )),
            },
            Resolved::Gone | Resolved::Unknown => Err(Refusal::new(
                StatusCode::FORBIDDEN,
                Reason::CgroupUnknown,
                format!("cannot attribute caller: cgroup id {id} no longer exists"),
            )),
        }
    }
}
