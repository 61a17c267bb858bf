//! Bounds on open connections: one caller cannot hold more than its share (10,000 idle sockets
//! from a misbehaving pod are refused at accept, not kept), and the agent as a whole stays under
//! a total. A caller is the pod the kernel attributed the connection to (eBPF mode), or its peer
//! address where nothing attributes it (link mode). A refused connection is closed at once,
//! before any byte is read.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use crate::{
    metrics::{self, Counter, EncodeLabelSet, Family, Registry},
    ratelimit::Owner,
};

pub struct ConnectionLimits {
    max_total: usize,
    max_per_owner: usize,
    total: AtomicUsize,
    per_owner: Mutex<HashMap<Owner, usize>>,
    /// Connections closed at accept, by [`Rejected`] (its discriminant).
    rejected: [Counter; Rejected::ALL.len()],
}

/// Why a connection was closed at accept (a metrics label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejected {
    /// Its caller holds its share already.
    PodLimit,
    /// The agent holds `--max-connections` already.
    TotalLimit,
    /// The kernel has no record of it (eBPF mode): it did not come through the redirect.
    NotRedirected,
    /// Its record is older than any connection being accepted can be.
    StaleRecord,
}

impl Rejected {
    const ALL: [Rejected; 4] = [
        Rejected::PodLimit,
        Rejected::TotalLimit,
        Rejected::NotRedirected,
        Rejected::StaleRecord,
    ];

    pub fn reason(self) -> &'static str {
        match self {
            Rejected::PodLimit => "pod_limit",
            Rejected::TotalLimit => "total_limit",
            Rejected::NotRedirected => "not_redirected",
            Rejected::StaleRecord => "stale_record",
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
    caller: Option<Owner>,
}

impl ConnectionLimits {
    /// Limits whose figures (`open_connections`, `rejected_connections`) go to `registry`.
    pub fn new(
        max_total: usize,
        max_per_owner: usize,
        registry: &mut Registry,
    ) -> Arc<ConnectionLimits> {
        let rejected = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "rejected_connections",
            "Connections closed at accept, by reason: pod_limit (--max-connections-per-pod: per pod, or per peer address in link mode), total_limit (--max-connections), not_redirected (no kernel record: it did not come through the redirect), stale_record (its record is too old to be its own)",
            rejected.clone(),
        );
        let limits = Arc::new(ConnectionLimits {
            max_total,
            max_per_owner,
            total: AtomicUsize::new(0),
            per_owner: Mutex::new(HashMap::new()),
            rejected: Rejected::ALL
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

    /// Admits a connection from `caller` (None: counted in the total only); a refusal is
    /// counted.
    pub fn admit(self: &Arc<Self>, caller: Option<Owner>) -> Result<Permit, Rejected> {
        let admitted = self.try_admit(caller.as_ref());
        if let Err(rejected) = admitted {
            self.rejected[rejected as usize].inc();
        }
        admitted.map(|()| Permit {
            limits: self.clone(),
            caller,
        })
    }

    fn try_admit(&self, caller: Option<&Owner>) -> Result<(), Rejected> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Rejected::TotalLimit);
        }
        if let Some(caller) = caller {
            let mut per_owner = self.per_owner.lock().unwrap_or_else(|e| e.into_inner());
            let n = per_owner.entry(caller.clone()).or_default();
            if *n >= self.max_per_owner {
                drop(per_owner);
                self.total.fetch_sub(1, Ordering::AcqRel);
                return Err(Rejected::PodLimit);
            }
            *n += 1;
        }
        Ok(())
    }

    /// Counts a connection closed at accept for a reason of its own (not a limit).
    pub fn reject(&self, why: Rejected) {
        self.rejected[why as usize].inc();
    }

    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limits.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(caller) = &self.caller {
            let mut per_owner = self
                .limits
                .per_owner
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(n) = per_owner.get_mut(caller) {
                *n -= 1;
                if *n == 0 {
                    per_owner.remove(caller);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(n: u8) -> Option<Owner> {
        let uid =
            crate::token::PodUid::parse(&format!("00000000-0000-0000-0000-0000000000{n:02x}"));
        Some(Owner::Pod(uid.unwrap()))
    }

    #[test]
    fn per_pod_and_total_limits_release_on_drop() {
        let limits = ConnectionLimits::new(5, 2, &mut Registry::default());
        let (a, b) = (uid(1), uid(2));
        let a1 = limits.admit(a.clone()).unwrap();
        let _a2 = limits.admit(a.clone()).unwrap();
        assert_eq!(limits.admit(a.clone()).err(), Some(Rejected::PodLimit));
        let _b1 = limits.admit(b.clone()).unwrap();
        let _n1 = limits.admit(None).unwrap();
        let _n2 = limits
            .admit(Some(Owner::Peer([198, 18, 0, 9].into())))
            .unwrap();
        assert_eq!(limits.admit(b).err(), Some(Rejected::TotalLimit));
        assert_eq!(limits.open(), 5);
        assert_eq!((limits.rejected[0].get(), limits.rejected[1].get()), (1, 1));
        drop(a1);
        assert_eq!(limits.open(), 4);
        assert!(limits.admit(a).is_ok());
    }
}
