//! Periodic upkeep: the state of pods that are gone is dropped, refreshes that are due start,
//! and freed memory goes back to the system.

use std::{collections::HashSet, sync::Arc, time::Duration};

use tracing::warn;

use crate::{imds::ImdsGuard, server::CredentialServer};

/// How often the cache and per-pod state are checked against the pods that exist (a deleted
/// pod's state is gone within this) and refreshes that are due are started.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(2);
/// Without a cgroup index (a node without cgroup v2) nothing says a pod is gone: its state goes
/// once it has made no request for this long (credentials last hours; an SDK asks again well
/// before they expire).
const IDLE_POD: Duration = Duration::from_secs(12 * 3600);
/// A peer's request bucket (link mode) goes once it is full again and unused this long.
const IDLE_PEER: Duration = Duration::from_secs(60);

/// Drops the state of pods that are gone and starts refreshes that are due, every
/// [`MAINTENANCE_INTERVAL`], until the task is aborted.
pub async fn maintain(server: Arc<CredentialServer>, imds: Option<Arc<ImdsGuard>>) {
    let mut tick = tokio::time::interval(MAINTENANCE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let walker = server.clone();
        let guard = imds.clone();
        // Blocking: both may walk the cgroup tree. Without a cgroup index (link mode on cgroup
        // v1) pods are known only by being idle.
        let walked = tokio::task::spawn_blocking(move || {
            if let (Some(guard), Some(redirector), Some(index)) =
                (&guard, &walker.redirector, &walker.cgroups)
            {
                guard.pass(redirector, index, &walker.stats);
            }
            // Every pod with state: those that asked for credentials, and those only the IMDS
            // guard saw.
            let known = walker.stats.uids();
            walker
                .cgroups
                .as_ref()
                .map(|index| index.gone(&known))
                .transpose()
        })
        .await;
        let gone = match walked {
            Ok(Ok(Some(gone))) => gone,
            Ok(Ok(None)) => server.stats.idle(IDLE_POD),
            Ok(Err(e)) => {
                warn!(error = %e, "cannot walk the cgroup tree; keeping every pod's state until the next try");
                HashSet::new()
            }
            Err(_) => HashSet::new(),
        };
        server.cache.maintain(&gone);
        server.forget_gone_pods(&gone);
        if let Some(guard) = &imds {
            guard.forget(&gone);
        }
        server.rate_limits.forget_idle_peers(IDLE_PEER);
        return_freed_memory();
    }
}

/// glibc gives each thread that allocates its own arena, and keeps freed memory in them: bursts
/// of connections on several runtime and blocking threads then leave the resident set high.
/// Two arenas suffice for a service on a few threads; trimming returns freed pages.
/// (musl, the static builds: one allocator state, which returns freed pages itself.)
pub fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2)
    };
}

fn return_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0)
    };
}
