//! The cache's behaviour on a paused clock against a scripted upstream.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::SystemTime,
};

use super::*;
use crate::{credentials::Credentials, metrics::Registry};

const POD_A: &str = "00000000-0000-0000-0000-00000000000a";
const POD_B: &str = "00000000-0000-0000-0000-00000000000b";

fn pod(s: &str) -> PodUid {
    PodUid::parse(s).unwrap()
}

/// Answers from a script; counts calls; can be slow.
#[derive(Clone, Default)]
struct Scripted(Arc<ScriptState>);

#[derive(Default)]
struct ScriptState {
    calls: AtomicUsize,
    latency: Mutex<Duration>,
    errors: Mutex<Vec<UpstreamError>>,
    lifetime: Mutex<Option<Duration>>,
}

impl Scripted {
    fn calls(&self) -> usize {
        self.0.calls.load(Ordering::SeqCst)
    }
    fn fail_next(&self, errors: Vec<UpstreamError>) {
        *self.0.errors.lock().unwrap() = errors;
    }
    fn latency(&self, d: Duration) {
        *self.0.latency.lock().unwrap() = d;
    }
    fn lifetime(&self, d: Duration) {
        *self.0.lifetime.lock().unwrap() = Some(d);
    }
}

impl Upstream for Scripted {
    fn name(&self) -> &'static str {
        "the scripted upstream"
    }

    async fn assume_role(&self, token: &str) -> Result<AssumedRole, UpstreamError> {
        let n = self.0.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let latency = *self.0.latency.lock().unwrap();
        tokio::time::sleep(latency).await;
        let error = {
            let mut errors = self.0.errors.lock().unwrap();
            (!errors.is_empty()).then(|| errors.remove(0))
        };
        if let Some(e) = error {
            return Err(e);
        }
        let lifetime = self
            .0
            .lifetime
            .lock()
            .unwrap()
            .unwrap_or(Duration::from_secs(6 * 3600));
        Ok(AssumedRole::new(
            Credentials {
                access_key_id: format!("ASIA-{token}-{n}"),
                secret_access_key: "s".into(),
                session_token: "t".into(),
                account_id: "123456789012".into(),
                expiration: SystemTime::now() + lifetime,
            },
            "arn:aws:iam::123456789012:role/r".into(),
            "a-1".into(),
            None,
        ))
    }
}

fn err(status: u16, code: &str) -> UpstreamError {
    UpstreamError::answered(status, code, "m", None)
}

fn cache(up: &Scripted, settings: CacheSettings) -> Arc<CredentialCache<Scripted>> {
    Arc::new(CredentialCache::new(
        up.clone(),
        settings,
        UpstreamLimiter::new(1000.0, 1000),
        CacheMetrics::register(&mut Registry::default(), 4096),
    ))
}

/// A request as the server makes it for an attributed pod's token.
async fn get(
    c: &CredentialCache<Scripted>,
    token: &str,
    pod: &PodUid,
) -> Result<(Arc<AssumedRole>, Outcome), UpstreamError> {
    let token: Arc<str> = Arc::from(token);
    let owner = Owner::Pod(*pod);
    let req = Request {
        token: &token,
        digest: TokenDigest::of(&token),
        pod,
        account: "ns/sa",
        owner: &owner,
        attributed: true,
        label: "ns/p",
    };
    c.get(&req).await
}

fn uids(pods: &[&str]) -> HashSet<PodUid> {
    pods.iter().map(|p| pod(p)).collect()
}

#[tokio::test(start_paused = true)]
async fn concurrent_misses_make_one_call() {
    let up = Scripted::default();
    up.latency(Duration::from_millis(300));
    let c = cache(&up, CacheSettings::default());
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { get(&c, "tok", &pod(POD_A)).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        let (role, outcome) = t.await.unwrap().unwrap();
        assert_eq!(role.access_key_id(), "ASIA-tok-1");
        outcomes.push(outcome);
    }
    assert_eq!(up.calls(), 1);
    assert_eq!(
        outcomes.iter().filter(|o| **o == Outcome::Fetched).count(),
        1
    );
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == Outcome::Coalesced)
            .count(),
        199
    );
    assert_eq!(get(&c, "tok", &pod(POD_A)).await.unwrap().1, Outcome::Hit);
    assert_eq!(up.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn waiters_share_an_error_too() {
    let up = Scripted::default();
    up.latency(Duration::from_millis(100));
    up.fail_next(vec![err(404, "ResourceNotFoundException")]);
    let c = cache(&up, CacheSettings::default());
    let a_pod = pod(POD_A);
    let (a, b) = tokio::join!(get(&c, "tok", &a_pod), get(&c, "tok", &a_pod));
    assert_eq!(a.unwrap_err().status(), 404);
    assert_eq!(b.unwrap_err().status(), 404);
    assert_eq!(up.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_gives_up_does_not_cancel_the_call() {
    let up = Scripted::default();
    up.latency(Duration::from_millis(1500));
    let c = cache(&up, CacheSettings::default());
    let gave_up =
        tokio::time::timeout(Duration::from_millis(100), get(&c, "tok", &pod(POD_A))).await;
    assert!(gave_up.is_err());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(get(&c, "tok", &pod(POD_A)).await.unwrap().1, Outcome::Hit);
    assert_eq!(up.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn transient_failures_are_retried_within_the_deadline() {
    let up = Scripted::default();
    up.fail_next(vec![
        err(503, "ServiceUnavailableException"),
        err(429, "ThrottlingException"),
    ]);
    let c = cache(&up, CacheSettings::default());
    let (role, _) = get(&c, "tok", &pod(POD_A)).await.unwrap();
    assert_eq!(role.access_key_id(), "ASIA-tok-3");
    assert_eq!(up.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_bounds_a_hanging_upstream() {
    let up = Scripted::default();
    up.latency(Duration::from_secs(30));
    let settings = CacheSettings {
        upstream_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let c = cache(&up, settings);
    let started = Instant::now();
    let e = get(&c, "tok", &pod(POD_A)).await.unwrap_err();
    assert_eq!(e.status(), 504);
    assert!(
        started.elapsed() >= Duration::from_secs(5) && started.elapsed() < Duration::from_secs(6)
    );
}

#[tokio::test(start_paused = true)]
async fn terminal_errors_are_remembered_for_the_negative_ttl() {
    let up = Scripted::default();
    up.fail_next(vec![err(404, "ResourceNotFoundException")]);
    let c = cache(&up, CacheSettings::default());
    assert_eq!(get(&c, "tok", &pod(POD_A)).await.unwrap_err().status(), 404);
    assert_eq!(
        get(&c, "tok", &pod(POD_A)).await.unwrap_err().code(),
        "ResourceNotFoundException"
    );
    assert_eq!(up.calls(), 1, "negative hit");
    tokio::time::advance(Duration::from_secs(6)).await;
    assert!(get(&c, "tok", &pod(POD_A)).await.is_ok());
    assert_eq!(up.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn outage_serves_cached_credentials_until_min_remaining() {
    let up = Scripted::default();
    up.lifetime(Duration::from_secs(20 * 60));
    let c = cache(&up, CacheSettings::default());
    let (first, _) = get(&c, "tok", &pod(POD_A)).await.unwrap();
    // 6 minutes on, 14 left: no longer fresh, so a refresh is tried; it fails; cached served.
    tokio::time::advance(Duration::from_secs(6 * 60)).await;
    up.fail_next(vec![err(500, "InternalServerException"); 100]);
    let (served, outcome) = get(&c, "tok", &pod(POD_A)).await.unwrap();
    assert_eq!(outcome, Outcome::Stale);
    assert_eq!(served.access_key_id(), first.access_key_id());
    // Inside the last minute nothing stale is handed out.
    tokio::time::advance(Duration::from_secs(13 * 60 + 10)).await;
    let e = get(&c, "tok", &pod(POD_A)).await.unwrap_err();
    assert_eq!(e.status(), 500);
}

#[tokio::test(start_paused = true)]
async fn refresh_ahead_keeps_handed_out_credentials_fresh() {
    let up = Scripted::default();
    let c = cache(&up, CacheSettings::default());
    get(&c, "tok", &pod(POD_A)).await.unwrap();
    assert_eq!(c.maintain(&HashSet::new()), 0, "not due yet");
    tokio::time::advance(Duration::from_secs(3 * 3600)).await;
    assert_eq!(c.maintain(&HashSet::new()), 1, "half-life passed");
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(up.calls(), 2);
    let (role, outcome) = get(&c, "tok", &pod(POD_A)).await.unwrap();
    assert_eq!(
        (role.access_key_id().as_str(), outcome),
        ("ASIA-tok-2", Outcome::Hit)
    );
    tokio::time::advance(Duration::from_secs(3 * 3600)).await;
    get(&c, "other", &pod(POD_B)).await.unwrap();
    assert_eq!(
        c.maintain(&HashSet::new()),
        1,
        "tok was used after its refresh began"
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    tokio::time::advance(Duration::from_secs(3 * 3600)).await;
    assert_eq!(
        c.maintain(&HashSet::new()),
        1,
        "other (fetched for a request) is due; tok was not used since its refresh"
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    tokio::time::advance(Duration::from_secs(3 * 3600)).await;
    assert_eq!(
        c.maintain(&HashSet::new()),
        0,
        "neither token was used since its last fetch began"
    );
}

#[tokio::test(start_paused = true)]
async fn short_lived_credentials_refresh_before_they_stop_being_fresh() {
    let up = Scripted::default();
    up.lifetime(Duration::from_secs(16 * 60));
    let c = cache(&up, CacheSettings::default());
    get(&c, "tok", &pod(POD_A)).await.unwrap();
    tokio::time::advance(Duration::from_secs(59)).await;
    assert_eq!(
        c.maintain(&HashSet::new()),
        1,
        "half-life (8 min) would be too late"
    );
}

#[tokio::test(start_paused = true)]
async fn gone_pods_lose_their_entries_and_get_no_refresh() {
    let up = Scripted::default();
    let c = cache(&up, CacheSettings::default());
    get(&c, "tok-a", &pod(POD_A)).await.unwrap();
    get(&c, "tok-b", &pod(POD_B)).await.unwrap();
    assert_eq!(c.maintain(&uids(&[POD_A])), 0);
    assert_eq!(c.len(), 1);
    tokio::time::advance(Duration::from_secs(4 * 3600)).await;
    get(&c, "tok-b", &pod(POD_B)).await.unwrap();
    assert_eq!(
        c.maintain(&HashSet::new()),
        1,
        "only pod B's token refreshes"
    );
    assert_eq!(c.metrics().evictions(Eviction::PodGone), 1);
}

#[tokio::test(start_paused = true)]
async fn a_rotated_token_supersedes_the_old_one() {
    let up = Scripted::default();
    let c = cache(&up, CacheSettings::default());
    get(&c, "old", &pod(POD_A)).await.unwrap();
    get(&c, "new", &pod(POD_A)).await.unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c.metrics().evictions(Eviction::Superseded), 1);
    tokio::time::advance(Duration::from_secs(4 * 3600)).await;
    get(&c, "new", &pod(POD_A)).await.unwrap();
    assert_eq!(
        c.maintain(&HashSet::new()),
        1,
        "only the new token is refreshed"
    );
}

#[tokio::test(start_paused = true)]
async fn size_is_bounded_by_lru_eviction() {
    let up = Scripted::default();
    let settings = CacheSettings {
        max_entries: 3,
        ..Default::default()
    };
    let c = cache(&up, settings);
    let pods = [
        "00000000-0000-0000-0000-000000000001",
        "00000000-0000-0000-0000-000000000002",
        "00000000-0000-0000-0000-000000000003",
        "00000000-0000-0000-0000-000000000004",
    ];
    for (i, p) in pods.iter().enumerate().take(3) {
        let token = format!("t{i}");
        get(&c, &token, &pod(p)).await.unwrap();
    }
    // Uses within LRU_GRAIN of an entry's last move do not reorder it.
    tokio::time::advance(LRU_GRAIN + Duration::from_millis(1)).await;
    get(&c, "t0", &pod(pods[0])).await.unwrap(); // t1 is now the least recently used
    get(&c, "t3", &pod(pods[3])).await.unwrap();
    assert_eq!(c.len(), 3);
    let calls = up.calls();
    assert_eq!(get(&c, "t0", &pod(pods[0])).await.unwrap().1, Outcome::Hit);
    assert_eq!(
        get(&c, "t1", &pod(pods[1])).await.unwrap().1,
        Outcome::Fetched
    );
    assert_eq!(up.calls(), calls + 1);
    for i in 0..1000 {
        let token = format!("flood-{i}");
        let _ = get(&c, &token, &pod(pods[3])).await;
    }
    assert!(c.len() <= 3);
}

#[tokio::test(start_paused = true)]
async fn a_pod_with_endless_new_tokens_cannot_drain_the_upstream_budget() {
    let up = Scripted::default();
    let c = cache(
        &up,
        CacheSettings {
            pod_upstream_qps: 0.2,
            pod_upstream_burst: 5,
            ..Default::default()
        },
    );
    let mut refused = 0;
    for i in 0..100 {
        let token = format!("flood-{i}");
        if let Err(e) = get(&c, &token, &pod(POD_A)).await {
            assert_eq!((e.status(), e.code()), (429, "PodUpstreamBudgetExhausted"));
            refused += 1;
        }
    }
    assert_eq!((up.calls(), refused), (5, 95), "the burst, then nothing");
    // Another pod is unaffected; the flooding pod gets one more call after 5 s.
    assert!(get(&c, "other", &pod(POD_B)).await.is_ok());
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(get(&c, "flood-again", &pod(POD_A)).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn expired_entries_are_dropped() {
    let up = Scripted::default();
    up.lifetime(Duration::from_secs(20 * 60));
    let c = cache(&up, CacheSettings::default());
    get(&c, "tok", &pod(POD_A)).await.unwrap();
    tokio::time::advance(Duration::from_secs(21 * 60)).await;
    c.maintain(&HashSet::new());
    assert_eq!(c.len(), 0);
}
