//! The kernel programs' own counts, read from their per-CPU map at each scrape.

use std::sync::{Arc, OnceLock, Weak};

use super::Redirector;
use crate::metrics::{self, Registry};

/// Registers `kernel_redirected_connects`; it has series once [`KernelMetrics::attached`] has
/// named the programs (there is nothing to count in link mode).
#[derive(Clone, Default)]
pub struct KernelMetrics(Arc<OnceLock<Weak<Redirector>>>);

impl KernelMetrics {
    pub fn register(registry: &mut Registry) -> KernelMetrics {
        let slot = KernelMetrics::default();
        let read = slot.0.clone();
        metrics::register_sampled_counters(
            registry,
            "kernel_redirected_connects",
            "Connects to the credential address redirected by the kernel programs, by address family",
            "family",
            move || {
                // A weak handle: the metrics never keep the programs attached.
                let Some(redirector) = read.get().and_then(Weak::upgrade) else {
                    return Vec::new();
                };
                let counts = redirector.counts();
                vec![("ipv4", counts.v4), ("ipv6", counts.v6)]
            },
        );
        slot
    }

    /// The programs whose counts to report from now on.
    pub fn attached(&self, redirector: &Arc<Redirector>) {
        let _ = self.0.set(Arc::downgrade(redirector));
    }
}
