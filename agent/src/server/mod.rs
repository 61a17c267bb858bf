//! The credential endpoint pods reach through the redirect: `GET /v1/credentials`.
//!
//! Each accepted connection is attributed once, right after `accept()`, from the record the
//! kernel programs left for its 4-tuple; every request on it is then checked against that record.
//! The pod's state is found at accept too: its statistics, its rate bucket, and the last token it
//! presented with its claims, digest and binding, so decoding and hashing are paid once per
//! token, not per request or per connection. A cached request touches no lock shared with other
//! pods' requests but the cache's own.

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
    server::graceful::GracefulShutdown,
};
use pod_identity_common::Attribution;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{debug, info, warn};

use self::{
    metrics::ServerMetrics,
    pod::{BoundToken, PodState},
};
use crate::{
    attribution::CgroupIndex,
    cache::{CredentialCache, Outcome},
    connlimit::{ConnectionLimits, Permit},
    kernel::Redirector,
    ratelimit::PodRateLimits,
    request::{self, Reason, Refusal, Route},
    source::CredentialSource,
    stats::{Identity, PodStatsRegistry, RequestClass, RequestRecord, Served},
    token::PodUid,
    upstream::AssumedRole,
};

/// Requests whose headers take longer than this are dropped (slow clients hold no resources).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

pub struct CredentialServer {
    /// The kernel programs; `None` in link mode, where callers cannot be attributed and requests
    /// are checked by their token alone.
    pub redirector: Option<Arc<Redirector>>,
    /// `None` where the node has no cgroup2 hierarchy (link mode only).
    pub cgroups: Option<CgroupIndex>,
    pub cache: CredentialCache<CredentialSource>,
    pub pod_limits: PodRateLimits,
    pub connection_limits: Arc<ConnectionLimits>,
    pub stats: Arc<PodStatsRegistry>,
    pub metrics: ServerMetrics,
    /// Host header values a client may send: the intercepted addresses, with and without port.
    pub allowed_hosts: Vec<String>,
    /// Each pod's serving state, created on its first connection.
    pub pods: RwLock<HashMap<PodUid, Arc<PodState>>>,
}

/// Who is on the other end of one accepted connection, found once at accept.
struct Connection {
    peer: SocketAddr,
    attribution: Option<Attribution>,
    /// The attributed pod, or why there is none (eBPF mode); `None` in link mode.
    caller: Option<Result<Arc<PodState>, Refusal>>,
    /// Its place under the connection limits, released when the connection ends.
    _permit: Permit,
}

/// What one request revealed, for statistics and metrics.
#[derive(Default)]
struct RequestFacts {
    /// The pod the caller was attributed to (or, in link mode, its token names).
    pod: Option<Arc<PodState>>,
    /// The token, once bound to that pod.
    token: Option<Arc<BoundToken>>,
    /// Whether the token is new for the pod (its identity goes to the statistics).
    new_token: bool,
    served: Option<(Arc<AssumedRole>, Outcome)>,
    /// Whether the served credentials are new for the pod.
    new_role: bool,
    /// EKS Auth's error code, when it refused.
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
        Reason::NotRedirected
        | Reason::CgroupUnknown
        | Reason::NotAPod
        | Reason::HostNotAllowed
        | Reason::TokenPodMismatch => RequestClass::Refused,
    }
}

impl CredentialServer {
    /// Accepts on `listener` until `shutdown` flips, handing each connection to hyper; open
    /// connections are told to finish through `graceful`.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
        graceful: Arc<GracefulShutdown>,
    ) {
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => break,
            };
            // A connection over the limits is closed before a byte is read: the cheapest
            // answer to a connection flood.
            if let Some(conn) = self.admit(&stream, peer) {
                self.clone().spawn_http(stream, conn, &graceful);
            }
        }
    }

    /// Attributes an accepted connection and finds its place under the connection limits;
    /// `None` when the limits refuse it.
    fn admit(&self, stream: &TcpStream, peer: SocketAddr) -> Option<Connection> {
        let accepted_at = Instant::now();
        let (attribution, caller) = match (&self.redirector, stream.local_addr()) {
            (Some(redirector), Ok(local)) => {
                let attribution = redirector.take(peer, local);
                self.metrics.observe_attribution(accepted_at.elapsed());
                (attribution, Some(self.caller(attribution, accepted_at)))
            }
            (Some(_), Err(_)) => (None, Some(self.caller(None, accepted_at))),
            (None, _) => (None, None),
        };
        let uid = caller.as_ref().and_then(|c| c.as_ref().ok());
        let permit = self.connection_limits.admit(uid).ok()?;
        let _ = stream.set_nodelay(true);
        let caller = caller.map(|c| c.map(|uid| self.pod(uid)));
        if let Some(Ok(pod)) = &caller {
            pod.stats.connection();
        }
        Some(Connection {
            peer,
            attribution,
            caller,
            _permit: permit,
        })
    }

    fn spawn_http(
        self: Arc<Self>,
        stream: TcpStream,
        conn: Connection,
        graceful: &GracefulShutdown,
    ) {
        let conn = Arc::new(conn);
        let service = hyper::service::service_fn(move |req| {
            let server = self.clone();
            let conn = conn.clone();
            async move { Ok::<_, Infallible>(server.handle(&conn, req).await) }
        });
        let http = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_buf_size(64 * 1024)
            .serve_connection(TokioIo::new(stream), service);
        let watched = graceful.watch(http);
        tokio::spawn(async move {
            let _ = watched.await;
        });
    }

    async fn handle(&self, conn: &Connection, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let started = Instant::now();
        match request::route(req.method(), req.uri().path()) {
            Route::Credentials => {}
            Route::MethodNotAllowed => {
                return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported");
            }
            Route::NotFound => return text(StatusCode::NOT_FOUND, "not found"),
        }
        let mut facts = RequestFacts::default();
        let result = self.credentials(conn, &req, &mut facts).await;
        let latency = started.elapsed();
        let (response, refusal) = match result {
            Ok(response) => (response, None),
            Err(refusal) => {
                self.log_refusal(conn, &facts, &refusal, latency);
                (text(refusal.status, refusal.message.clone()), Some(refusal))
            }
        };
        self.record(&facts, response.status(), refusal.as_ref(), latency);
        response
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

    /// A request's outcome, in the metrics and its pod's statistics.
    fn record(
        &self,
        facts: &RequestFacts,
        status: StatusCode,
        refusal: Option<&Refusal>,
        latency: Duration,
    ) {
        let claims = facts.token.as_ref().map(|t| &t.claims);
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
                role: facts
                    .new_role
                    .then_some((role.role_arn.as_str(), role.association_id.as_str())),
                expiration: role.expiration,
                cache_hit: matches!(outcome, Outcome::Hit | Outcome::Stale),
                upstream_call: *outcome == Outcome::Fetched,
            }),
            error,
        });
    }

    async fn credentials(
        &self,
        conn: &Connection,
        req: &Request<Incoming>,
        facts: &mut RequestFacts,
    ) -> Result<Response<Full<Bytes>>, Refusal> {
        // In link mode nothing attributes the caller: the pod is whatever the token says.
        let attributed = match &conn.caller {
            Some(Ok(pod)) => Some(pod.clone()),
            Some(Err(refusal)) => return Err(refusal.clone()),
            None => None,
        };
        facts.pod = attributed.clone();
        request::check_host(req.headers(), &self.allowed_hosts)?;
        let token = self.bind_token(attributed.as_deref(), req, facts)?;
        let pod = match attributed {
            Some(pod) => pod,
            None => facts
                .pod
                .insert(self.pod(token.claims.pod_uid.clone()))
                .clone(),
        };
        if !pod.bucket.allow() {
            return Err(Refusal::new(
                StatusCode::TOO_MANY_REQUESTS,
                Reason::PodRateLimited,
                format!(
                    "pod {} exceeded its request rate limit (--pod-rps, --pod-burst); retry shortly",
                    token.label
                ),
            ));
        }
        let (role, outcome) = match self
            .cache
            .get(&token.raw, token.digest, &pod.uid, &token.label)
            .await
        {
            Ok(found) => found,
            Err(e) => {
                let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY);
                facts.upstream_code = Some(e.code().to_owned());
                return Err(Refusal::new(status, Reason::UpstreamError, e.to_string()));
            }
        };
        debug!(
            namespace = %token.claims.namespace,
            pod = %token.claims.pod_name,
            pod_uid = %token.claims.pod_uid,
            pid = conn.attribution.map(|a| a.pid_tgid >> 32),
            outcome = ?outcome,
            "served credentials"
        );
        let body = role.body();
        facts.new_role = pod.served_anew(&role);
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
