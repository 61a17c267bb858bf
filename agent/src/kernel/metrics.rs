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
        let counts = |slot: &KernelMetrics| {
            let read = slot.0.clone();
            // A weak handle: the metrics never keep the programs attached.
            move || read.get().and_then(Weak::upgrade).map(|r| r.counts())
        };
        let read = counts(&slot);
        metrics::register_sampled_counters(
            registry,
            "kernel_redirected_connects",
            "Connects to the credential address redirected by the kernel programs, by address family",
            "family",
            move || read().map_or_else(Vec::new, |c| vec![("ipv4", c.v4), ("ipv6", c.v6)]),
        );
        let read = counts(&slot);
        metrics::register_sampled_counters(
            registry,
            "kernel_steered_connections",
            "Redirected connections by what the kernel did with them on arrival: steered (handed to the agent's own socket), no_agent (refused: no agent socket was there, the agent being down or restarting; never handed to whatever else listens)",
            "result",
            move || {
                read().map_or_else(Vec::new, |c| {
                    vec![("steered", c.steered), ("no_agent", c.no_agent)]
                })
            },
        );
        slot
    }

    /// The programs whose counts to report from now on.
    pub fn attached(&self, redirector: &Arc<Redirector>) {
        let _ = self.0.set(Arc::downgrade(redirector));
    }
}
