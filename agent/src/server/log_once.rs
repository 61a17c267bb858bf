//! Log lines about a source at most once per [`QUIET`] each, remembering a bounded number of
//! sources: a flood from many addresses neither floods the log nor grows the agent's memory.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

/// How long a source stays quiet after it was logged.
const QUIET: Duration = Duration::from_secs(600);
/// The most sources remembered; beyond it the oldest are forgotten (and may be logged again).
const KEPT: usize = 1024;

#[derive(Default)]
pub struct LogOnce(Mutex<HashMap<IpAddr, Instant>>);

impl LogOnce {
    /// Whether `source` should be logged now (and, if so, it is remembered).
    pub fn first(&self, source: IpAddr) -> bool {
        let now = Instant::now();
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if seen
            .get(&source)
            .is_some_and(|at| now.duration_since(*at) < QUIET)
        {
            return false;
        }
        if seen.len() >= KEPT {
            seen.retain(|_, at| now.duration_since(*at) < QUIET);
            if seen.len() >= KEPT
                && let Some(oldest) = seen.iter().min_by_key(|(_, at)| **at).map(|(ip, _)| *ip)
            {
                seen.remove(&oldest);
            }
        }
        seen.insert(source, now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_source_once_and_memory_bounded() {
        let log = LogOnce::default();
        let a: IpAddr = [198, 18, 0, 1].into();
        assert!(log.first(a));
        assert!(!log.first(a));
        for i in 0..5000u32 {
            log.first(IpAddr::from(i.to_be_bytes()));
        }
        assert!(log.0.lock().unwrap().len() <= KEPT);
    }
}
