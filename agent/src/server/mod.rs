//! The credential endpoint pods reach through the redirect: `GET /v1/credentials`.
//!
//! Each accepted connection is attributed once, right after `accept()`, from the record the
//! kernel programs left for its 4-tuple; every request on it is then checked against that record.
//! The pod's state is found at accept too: its statistics, its rate bucket, and the last token it
//! presented with its claims, digest and binding, so decoding and hashing are paid once per
//! token, not per request or per connection. A cached request touches no lock shared with other
//! pods' requests but the cache's own.

mod log_once;
pub mod metrics;
mod pod;

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::{GracefulShutdown, Watcher},
};
use pod_identity_common::Attribution;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{debug, info, warn};

pub use self::log_once::LogOnce;
use self::{
    metrics::ServerMetrics,
    pod::{BoundToken, PodState},
};
use crate::{
    attribution::CgroupIndex,
    cache::{self, CredentialCache, Outcome},
    connlimit::{ConnectionLimits, Permit, Rejected},
    kernel::{self, Redirector},
    ratelimit::{Owner, OwnerBucket, OwnerRateLimits},
    request::{self, Reason, Refusal, Route},
    source::CredentialSource,
    stats::{Identity, PodStatsRegistry, RequestClass, RequestRecord, Served},
    token::PodUid,
    upstream::{AssumedRole, UpstreamError},
};

/// Requests whose headers take longer than this are dropped (slow clients hold no resources).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The most a connection buffers: a request head with a service-account token fits many times
/// over (hyper's smallest allowed).
const MAX_BUF_SIZE: usize = 16 * 1024;

pub struct CredentialServer {
    /// The kernel programs; `None` in link mode, where callers cannot be attributed and requests
    /// are checked by their token alone.
    pub redirector: Option<Arc<Redirector>>,
    /// `None` where the node has no cgroup2 hierarchy (link mode only).
    pub cgroups: Option<Arc<CgroupIndex>>,
    /// Held while the cgroup tree is walked: one walk at a time, shared by the connections
    /// that need it.
    pub walking: tokio::sync::Mutex<()>,
    pub cache: CredentialCache<CredentialSource>,
    /// Each owner's request bucket (`--pod-rps`, `--pod-burst`): the pod's, or in link mode the
    /// peer address's.
    pub rate_limits: OwnerRateLimits,
    pub connection_limits: Arc<ConnectionLimits>,
    pub stats: Arc<PodStatsRegistry>,
    pub metrics: ServerMetrics,
    /// Host header values a client may send: the intercepted addresses, with and without port.
    pub allowed_hosts: Vec<String>,
    /// Each pod's serving state.
    pub pods: RwLock<HashMap<PodUid, Arc<PodState>>>,
    /// Sources of connections closed at accept, logged once each.
    pub refused_sources: LogOnce,
    /// hyper's HTTP/1 settings, made once: each connection shares its timer instead of
    /// allocating one.
    pub http1: hyper::server::conn::http1::Builder,
}

/// hyper's settings for the credential endpoint: a request head must arrive within
/// [`HEADER_READ_TIMEOUT`] and fit in [`MAX_BUF_SIZE`].
pub fn http1() -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUF_SIZE);
    builder
}

/// Who is on the other end of one accepted connection, found once at accept. Each request gets
/// a copy (shared state behind `Arc`s, the rest plain values: no allocation).
#[derive(Clone)]
struct Connection {
    peer: SocketAddr,
    attribution: Option<Attribution>,
    /// The attributed pod, or why there is none (eBPF mode); `None` in link mode.
    caller: Option<Result<Arc<PodState>, Refusal>>,
    /// Whose request budget this connection's requests spend.
    owner: Owner,
    bucket: Arc<OwnerBucket>,
}

/// What one request revealed, for statistics and metrics.
#[derive(Default)]
struct RequestFacts {
    /// The pod the caller was attributed to (or, in link mode, the pod the source accepted).
    pod: Option<Arc<PodState>>,
    /// The token, once bound to the caller.
    token: Option<Arc<BoundToken>>,
    /// Whether the token is new for the pod (its identity goes to the statistics).
    new_token: bool,
    /// Whether the credential source accepted the token (served, or found it has no
    /// association): only then are the token's names recorded anywhere.
    accepted: bool,
    served: Option<(Arc<AssumedRole>, Outcome)>,
    /// Whether the served credentials are new for the pod.
    new_role: bool,
    /// The source's error code, when it refused.
    upstream_code: Option<String>,
}

/// The per-pod error class a refusal counts as.
fn class_of(refusal: &Refusal) -> RequestClass {
    match refusal.reason {
        Reason::TokenInvalid => RequestClass::BadToken,
        Reason::PodRateLimited => RequestClass::RateLimited,
        Reason::UpstreamError
            if refusal.status.is_client_error()
                && refusal.status != StatusCode::TOO_MANY_REQUESTS =>
        {
            RequestClass::UpstreamClient
        }
        Reason::UpstreamError => RequestClass::UpstreamServer,
        Reason::CgroupUnknown
        | Reason::NotAPod
        | Reason::HostNotAllowed
        | Reason::TokenPodMismatch => RequestClass::Refused,
    }
}

/// How long accepting pauses after a failed `accept()` (EMFILE and the like), doubling to
/// [`MAX_ACCEPT_BACKOFF`] while failures go on.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

impl CredentialServer {
    /// Accepts on `listener` until `shutdown` flips, handing each connection to hyper; open
    /// connections are told to finish through `graceful`.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
        graceful: Arc<GracefulShutdown>,
    ) {
        let mut backoff = ACCEPT_BACKOFF;
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, ?backoff, "accept failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                        continue;
                    }
                },
                _ = shutdown.changed() => break,
            };
            backoff = ACCEPT_BACKOFF;
            let accepted_at = Instant::now();
            let Some(attribution) = self.attribute(&stream, peer) else {
                continue;
            };
            let watcher = graceful.watcher();
            let server = self.clone();
            tokio::spawn(async move {
                if let Some((conn, permit)) = server.admit(peer, attribution, accepted_at).await {
                    server.serve_connection(stream, conn, watcher).await;
                    // Its place under the connection limits goes when the connection ends.
                    drop(permit);
                }
            });
        }
    }

    /// The kernel's record of an accepted connection (eBPF mode), taken at once. A connection
    /// without one did not come through the redirect, and one with a record too old to be its
    /// own is suspect: both are closed before a byte is read. `Some(None)` in link mode.
    fn attribute(&self, stream: &TcpStream, peer: SocketAddr) -> Option<Option<Attribution>> {
        let Some(redirector) = &self.redirector else {
            return Some(None);
        };
        let started = Instant::now();
        let record = stream
            .local_addr()
            .ok()
            .and_then(|local| redirector.take(peer, local));
        self.metrics.observe_attribution(started.elapsed());
        let refused = match record {
            Some(a) if kernel::record_age(&a) <= kernel::MAX_RECORD_AGE => return Some(Some(a)),
            Some(_) => Rejected::StaleRecord,
            None => Rejected::NotRedirected,
        };
        self.connection_limits.reject(refused);
        if self.refused_sources.first(peer.ip()) {
            info!(
                %peer,
                reason = refused.reason(),
                "closed a connection at accept: the agent serves only connections the kernel redirected from pods (logged once per source)"
            );
        }
        None
    }

    /// Finds the caller (eBPF mode: the pod of the connection's cgroup) and its place under the
    /// connection limits; `None` when the limits refuse it.
    async fn admit(
        &self,
        peer: SocketAddr,
        attribution: Option<Attribution>,
        accepted_at: Instant,
    ) -> Option<(Connection, Permit)> {
        let caller = match &attribution {
            Some(a) => Some(self.caller(a, accepted_at).await),
            None => None,
        };
        let owner = match &caller {
            Some(Ok(uid)) => Owner::Pod(*uid),
            _ => Owner::Peer(peer.ip()),
        };
        // A refused caller (a node process, a vanished cgroup) counts in the total only: its
        // answer is a 403 on its first request.
        let counted = matches!(caller, None | Some(Ok(_))).then(|| owner.clone());
        let permit = self.connection_limits.admit(counted).ok()?;
        let caller = caller.map(|c| c.map(|uid| self.pod(&uid)));
        if let Some(Ok(pod)) = &caller {
            pod.stats.connection();
        }
        let bucket = self.rate_limits.bucket(&owner);
        let conn = Connection {
            peer,
            attribution,
            caller,
            owner,
            bucket,
        };
        Some((conn, permit))
    }

    async fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        conn: Connection,
        watcher: Watcher,
    ) {
        let _ = stream.set_nodelay(true);
        let server = self.clone();
        let service = hyper::service::service_fn(move |req| {
            let answer = server.handle(&conn, req);
            async move { Ok::<_, Infallible>(answer.await) }
        });
        let http = self.http1.serve_connection(TokioIo::new(stream), service);
        let _ = watcher.watch(http).await;
    }

    /// Answers one request. All the request carries is read before the first await and the
    /// request dropped: on a keep-alive connection hyper reads ahead while the answer is pending,
    /// and a request still alive pins the read buffer, which hyper must then allocate anew.
    fn handle(
        self: &Arc<Self>,
        conn: &Connection,
        req: Request<Incoming>,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send + use<> {
        let started = Instant::now();
        let mut facts = RequestFacts::default();
        let admitted = match request::route(req.method(), req.uri().path()) {
            Route::Credentials => Ok(self.admit_request(conn, &req, &mut facts)),
            Route::MethodNotAllowed => Err(text(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET is supported",
            )),
            Route::NotFound => Err(text(StatusCode::NOT_FOUND, "not found")),
        };
        drop(req);
        let (server, conn) = (self.clone(), conn.clone());
        async move {
            let admitted = match admitted {
                Ok(admitted) => admitted,
                Err(response) => return response,
            };
            let result = match admitted {
                Ok(token) => server.credentials(&conn, &token, &mut facts).await,
                Err(refusal) => Err(refusal),
            };
            let latency = started.elapsed();
            let (response, refusal) = match result {
                Ok(response) => (response, None),
                Err(refusal) => {
                    server.log_refusal(&conn, &facts, &refusal, latency);
                    (text(refusal.status, refusal.message.clone()), Some(refusal))
                }
            };
            server.record(&facts, response.status(), refusal.as_ref(), latency);
            response
        }
    }

    fn log_refusal(
        &self,
        conn: &Connection,
        facts: &RequestFacts,
        refusal: &Refusal,
        latency: Duration,
    ) {
        let claims = facts.token.as_ref().map(|t| &t.claims);
        info!(
            peer = %conn.peer,
            cgroup_id = conn.attribution.map(|a| a.cgroup_id),
            namespace = claims.map(|c| c.namespace.as_str()),
            pod = claims.map(|c| c.pod_name.as_str()),
            status = refusal.status.as_u16(),
            reason = refusal.reason.as_label(),
            latency_ms = latency.as_millis() as u64,
            detail = %refusal.message,
            "refused credential request"
        );
    }

    /// A request's outcome, in the metrics and its pod's statistics. The token's names (its
    /// namespace, pod and service account) are recorded only once the source accepted it: a
    /// forged token's names reach no label, row or table.
    fn record(
        &self,
        facts: &RequestFacts,
        status: StatusCode,
        refusal: Option<&Refusal>,
        latency: Duration,
    ) {
        let claims = facts
            .token
            .as_ref()
            .map(|t| &t.claims)
            .filter(|_| facts.accepted);
        let named = claims.map(|c| (c.namespace.as_str(), c.pod_name.as_str()));
        self.metrics
            .observe_request(status.as_u16(), latency, refusal.map(|r| r.reason), named);
        let Some(pod) = &facts.pod else {
            return;
        };
        let error = refusal.map(|r| {
            let code = facts
                .upstream_code
                .as_deref()
                .unwrap_or(r.reason.as_label());
            (r.status.as_u16(), code)
        });
        pod.stats.request(RequestRecord {
            class: refusal.map_or(RequestClass::Ok, class_of),
            latency,
            identity: claims.filter(|_| facts.new_token).map(|c| Identity {
                namespace: &c.namespace,
                pod: &c.pod_name,
                service_account: &c.service_account,
            }),
            served: facts.served.as_ref().map(|(role, outcome)| Served {
                role: facts.new_role.then_some((
                    role.role_arn.as_str(),
                    role.association_id.as_str(),
                    role.scope,
                )),
                expiration: role.expiration,
                cache_hit: matches!(outcome, Outcome::Hit | Outcome::Stale),
                upstream_call: *outcome == Outcome::Fetched,
            }),
            error,
        });
    }

    /// What a credential request presents, checked before anything is fetched: the caller's
    /// attribution (eBPF mode), the Host header, the token bound to the caller, and the caller's
    /// request budget.
    fn admit_request(
        &self,
        conn: &Connection,
        req: &Request<Incoming>,
        facts: &mut RequestFacts,
    ) -> Result<Arc<BoundToken>, Refusal> {
        // In link mode nothing attributes the caller: the pod is whatever the token says, once
        // the source has accepted the token.
        let attributed = match &conn.caller {
            Some(Ok(pod)) => Some(pod.clone()),
            Some(Err(refusal)) => return Err(refusal.clone()),
            None => None,
        };
        facts.pod = attributed.clone();
        request::check_host(req.headers(), &self.allowed_hosts)?;
        let token = self.bind_token(attributed.as_deref(), req, facts)?;
        if !conn.bucket.allow() {
            return Err(Refusal::new(
                StatusCode::TOO_MANY_REQUESTS,
                Reason::PodRateLimited,
                match &conn.owner {
                    Owner::Pod(uid) => format!(
                        "pod {} (uid {uid}) exceeded its request rate limit (--pod-rps, --pod-burst); retry shortly",
                        token.label
                    ),
                    Owner::Peer(ip) => format!(
                        "{ip} exceeded its request rate limit (--pod-rps, --pod-burst, per peer address in link mode); retry shortly"
                    ),
                },
            ));
        }
        Ok(token)
    }

    /// The credentials for an admitted request's token: cached, or fetched from the source.
    async fn credentials(
        &self,
        conn: &Connection,
        token: &BoundToken,
        facts: &mut RequestFacts,
    ) -> Result<Response<Full<Bytes>>, Refusal> {
        let attributed = facts.pod.is_some();
        let lookup = cache::Request {
            token: &token.raw,
            digest: token.digest,
            pod: &token.claims.pod_uid,
            account: &token.account,
            owner: &conn.owner,
            attributed,
            label: &token.label,
        };
        let found = self.cache.get(&lookup).await;
        facts.accepted = found
            .as_ref()
            .map_or_else(UpstreamError::token_accepted, |_| true);
        if facts.accepted && facts.pod.is_none() {
            facts.pod = Some(self.pod(&token.claims.pod_uid));
        }
        let (role, outcome) = found.map_err(|e| {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY);
            facts.upstream_code = Some(e.code().to_owned());
            Refusal::new(status, Reason::UpstreamError, e.to_string())
        })?;
        debug!(
            namespace = %token.claims.namespace,
            pod = %token.claims.pod_name,
            pod_uid = %token.claims.pod_uid,
            pid = conn.attribution.map(|a| a.pid_tgid >> 32),
            outcome = ?outcome,
            "served credentials"
        );
        let body = role.body();
        facts.new_role = facts.pod.as_ref().is_some_and(|pod| pod.served_anew(&role));
        facts.served = Some((role, outcome));
        let mut response = Response::new(Full::new(body));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Ok(response)
    }

    /// The request's token with its claims, checked to name the calling pod (`attributed`, in
    /// eBPF mode): the pod's remembered token when it presents the same one again, else parsed,
    /// bound and remembered.
    fn bind_token(
        &self,
        attributed: Option<&PodState>,
        req: &Request<Incoming>,
        facts: &mut RequestFacts,
    ) -> Result<Arc<BoundToken>, Refusal> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let remembered = attributed.and_then(PodState::remembered_token);
        if let Some(token) = remembered
            .filter(|t| t.claims.expires_at > now && request::same_token(req.headers(), &t.raw))
        {
            facts.token = Some(token.clone());
            return Ok(token);
        }
        let (raw, claims) = request::token(req.headers(), now)?;
        // The token must name the pod the kernel says is calling.
        if let Some(pod) = attributed
            && claims.pod_uid != pod.uid
        {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                Reason::TokenPodMismatch,
                format!(
                    "token belongs to pod {}/{} (uid {}), but the caller is pod uid {}",
                    claims.namespace, claims.pod_name, claims.pod_uid, pod.uid
                ),
            ));
        }
        let token = Arc::new(BoundToken::new(raw, claims));
        if let Some(pod) = attributed {
            pod.remember_token(token.clone());
        }
        facts.new_token = true;
        facts.token = Some(token.clone());
        Ok(token)
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body.into())))
        .expect("static response parts are valid")
}
