//! Bounds on open connections: one pod cannot hold more than its share (10,000 idle sockets from
//! a misbehaving pod are refused at accept, not kept), and the agent as a whole stays under a
//! total. A refused connection is closed at once, before any byte is read.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use crate::{
    metrics::{self, Counter, EncodeLabelSet, Family, Registry},
    token::PodUid,
};

pub struct ConnectionLimits {
    max_total: usize,
    max_per_pod: usize,
    total: AtomicUsize,
    per_pod: Mutex<HashMap<PodUid, usize>>,
    /// Connections closed at accept, by [`Rejected`] (its discriminant).
    rejected: [Counter; 2],
}

/// Why a connection was not admitted (a metrics label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejected {
    PodLimit,
    TotalLimit,
}

impl Rejected {
    pub fn reason(self) -> &'static str {
        match self {
            Rejected::PodLimit => "pod_limit",
            Rejected::TotalLimit => "total_limit",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Held for the life of an admitted connection; releases its place on drop.
pub struct Permit {
    limits: Arc<ConnectionLimits>,
    pod: Option<PodUid>,
}

impl ConnectionLimits {
    /// Limits whose figures (`open_connections`, `rejected_connections`) go to `registry`.
    pub fn new(
        max_total: usize,
        max_per_pod: usize,
        registry: &mut Registry,
    ) -> Arc<ConnectionLimits> {
        let rejected = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "rejected_connections",
            "Connections closed at accept, by reason: pod_limit (--max-connections-per-pod), total_limit (--max-connections)",
            rejected.clone(),
        );
        let limits = Arc::new(ConnectionLimits {
            max_total,
            max_per_pod,
            total: AtomicUsize::new(0),
            per_pod: Mutex::new(HashMap::new()),
            rejected: [Rejected::PodLimit, Rejected::TotalLimit]
                .map(|r| rejected.get_or_create_owned(&ReasonLabels { reason: r.reason() })),
        });
        let open = Arc::downgrade(&limits);
        metrics::register_sampled_gauge(
            registry,
            "open_connections",
            "Open connections on the credential listeners",
            move || open.upgrade().map_or(0, |l| l.open() as i64),
        );
        limits
    }

    /// Admits a connection from `pod` (None when the caller is not a known pod); a refusal is
    /// counted.
    pub fn admit(self: &Arc<Self>, pod: Option<&PodUid>) -> Result<Permit, Rejected> {
        let admitted = self.try_admit(pod);
        if let Err(rejected) = admitted {
            self.rejected[rejected as usize].inc();
        }
        admitted.map(|()| Permit {
            limits: self.clone(),
            pod: pod.cloned(),
        })
    }

    fn try_admit(&self, pod: Option<&PodUid>) -> Result<(), Rejected> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Rejected::TotalLimit);
        }
        if let Some(pod) = pod {
            let mut per_pod = self.per_pod.lock().unwrap_or_else(|e| e.into_inner());
            let n = per_pod.entry(pod.clone()).or_default();
            if *n >= self.max_per_pod {
                drop(per_pod);
                self.total.fetch_sub(1, Ordering::AcqRel);
                return Err(Rejected::PodLimit);
            }
            *n += 1;
        }
        Ok(())
    }

    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limits.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(pod) = &self.pod {
            let mut per_pod = self
                .limits
                .per_pod
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(n) = per_pod.get_mut(pod) {
                *n -= 1;
                if *n == 0 {
                    per_pod.remove(pod);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(n: u8) -> PodUid {
        PodUid::parse(&format!("00000000-0000-0000-0000-0000000000{n:02x}")).unwrap()
    }

    #[test]
    fn per_pod_and_total_limits_release_on_drop() {
        let limits = ConnectionLimits::new(5, 2, &mut Registry::default());
        let (a, b) = (uid(1), uid(2));
        let a1 = limits.admit(Some(&a)).unwrap();
        let _a2 = limits.admit(Some(&a)).unwrap();
        assert_eq!(limits.admit(Some(&a)).err(), Some(Rejected::PodLimit));
        let _b1 = limits.admit(Some(&b)).unwrap();
        let _n1 = limits.admit(None).unwrap();
        let _n2 = limits.admit(None).unwrap();
        assert_eq!(limits.admit(Some(&b)).err(), Some(Rejected::TotalLimit));
        assert_eq!(limits.open(), 5);
        assert_eq!((limits.rejected[0].get(), limits.rejected[1].get()), (1, 1));
        drop(a1);
        assert_eq!(limits.open(), 4);
        assert!(limits.admit(Some(&a)).is_ok());
    }
}
