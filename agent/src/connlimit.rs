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

use crate::token::PodUid;

pub struct ConnectionLimits {
    max_total: usize,
    max_per_pod: usize,
    total: AtomicUsize,
    per_pod: Mutex<HashMap<PodUid, usize>>,
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

/// Held for the life of an admitted connection; releases its place on drop.
pub struct Permit {
    limits: Arc<ConnectionLimits>,
    pod: Option<PodUid>,
}

impl ConnectionLimits {
    pub fn new(max_total: usize, max_per_pod: usize) -> Arc<ConnectionLimits> {
        Arc::new(ConnectionLimits {
            max_total,
            max_per_pod,
            total: AtomicUsize::new(0),
            per_pod: Mutex::new(HashMap::new()),
        })
    }

    /// Admits a connection from `pod` (None when the caller is not a known pod).
    pub fn admit(self: &Arc<Self>, pod: Option<&PodUid>) -> Result<Permit, Rejected> {
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
        Ok(Permit {
            limits: self.clone(),
            pod: pod.cloned(),
        })
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
        let limits = ConnectionLimits::new(5, 2);
        let (a, b) = (uid(1), uid(2));
        let a1 = limits.admit(Some(&a)).unwrap();
        let _a2 = limits.admit(Some(&a)).unwrap();
        assert_eq!(limits.admit(Some(&a)).err(), Some(Rejected::PodLimit));
        let _b1 = limits.admit(Some(&b)).unwrap();
        let _n1 = limits.admit(None).unwrap();
        let _n2 = limits.admit(None).unwrap();
        assert_eq!(limits.admit(Some(&b)).err(), Some(Rejected::TotalLimit));
        assert_eq!(limits.open(), 5);
        drop(a1);
        assert_eq!(limits.open(), 4);
        assert!(limits.admit(Some(&a)).is_ok());
    }
}
