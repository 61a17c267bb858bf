//! The credential endpoint pods reach through the redirect: `GET /v1/credentials`.
//!
//! Each accepted connection is attributed once, right after `accept()`, from the record the
//! kernel programs left for its 4-tuple; every request on it is then checked against that record.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use pod_identity_common::Attribution;
use tokio::{net::TcpListener, sync::watch};
use tracing::{debug, info, warn};

use crate::{
    attribution::{Caller, CgroupIndex},
    cache::{CredentialCache, Outcome},
    connlimit::{ConnectionLimits, Permit},
    kernel::Redirector,
    metrics::Metrics,
    ratelimit::PodRateLimits,
    request::{self, Refusal, Route},
    stats::{Identity, PodStatsRegistry, RequestClass, RequestRecord, Served},
    token::{PodUid, TokenClaims},
    upstream::{AssumedRole, EksAuth},
};

/// Requests whose headers take longer than this are dropped (slow clients hold no resources).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

pub struct CredentialServer {
    /// The kernel programs; `None` in link mode, where callers cannot be attributed and requests
    /// are checked by their token alone.
    pub redirector: Option<Arc<Redirector>>,
    pub cgroups: CgroupIndex,
    pub cache: CredentialCache<EksAuth>,
    pub pod_limits: PodRateLimits,
    pub connection_limits: Arc<ConnectionLimits>,
    pub stats: Arc<PodStatsRegistry>,
    pub metrics: Arc<Metrics>,
    /// Host header values a client may send: the intercepted addresses, with and without port.
    pub allowed_hosts: Vec<String>,
}

/// Who is on the other end of one accepted connection, found once at accept.
struct Connection {
    peer: SocketAddr,
    attribution: Option<Attribution>,
    /// The attributed pod, or why there is none (eBPF mode); None in link mode.
    caller: Option<Result<PodUid, Refusal>>,
    /// Whether this connection was counted in its pod's kernel-redirect statistics.
    counted: AtomicBool,
    /// Its place under the connection limits, released when the connection ends.
    _permit: Permit,
}

/// What one request revealed, for statistics and metrics.
#[derive(Default)]
struct RequestFacts {
    /// The pod the kernel attributed the caller to.
    pod: Option<PodUid>,
    /// The token's claims, once bound to that pod.
    claims: Option<TokenClaims>,
    served: Option<(Arc<AssumedRole>, Outcome)>,
    /// EKS Auth's error code, when it refused.
    upstream_code: Option<String>,
}

/// The per-pod error class a refusal counts as.
fn class_of(refusal: &Refusal) -> RequestClass {
    match refusal.reason {
        "token_invalid" => RequestClass::BadToken,
        "pod_rate_limited" => RequestClass::RateLimited,
        "upstream_error" if refusal.status.is_client_error() && refusal.status != StatusCode::TOO_MANY_REQUESTS => {
            RequestClass::UpstreamClient
        }
        "upstream_error" => RequestClass::UpstreamServer,
        _ => RequestClass::Refused,
    }
}

impl CredentialServer {
    /// Accepts on `listener` until `shutdown` flips, handing each connection to hyper; open
    /// connections are told to finish through `graceful`.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
        graceful: Arc<hyper_util::server::graceful::GracefulShutdown>,
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
            let accepted_at = Instant::now();
            let (attribution, caller) = match (&self.redirector, stream.local_addr()) {
                (Some(redirector), Ok(local)) => {
                    let attribution = redirector.take(peer, local);
                    (attribution, Some(self.caller(attribution, accepted_at)))
                }
                (Some(_), Err(_)) => (None, Some(self.caller(None, accepted_at))),
                (None, _) => (None, None),
            };
            let pod = caller.as_ref().and_then(|c| c.as_ref().ok());
            let permit = match self.connection_limits.admit(pod) {
                Ok(permit) => permit,
                Err(rejected) => {
                    // Closed before a byte is read: the cheapest answer to a connection flood.
                    self.metrics.observe_rejected_connection(rejected.reason());
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let conn = Arc::new(Connection { peer, attribution, caller, counted: AtomicBool::new(false), _permit: permit });
            let server = self.clone();
            let service = hyper::service::service_fn(move |req| {
                let server = server.clone();
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
    }

    async fn handle(&self, conn: &Connection, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let started = Instant::now();
        match request::route(req.method(), req.uri().path()) {
            Route::Credentials => {}
            Route::MethodNotAllowed => return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported"),
            Route::NotFound => return text(StatusCode::NOT_FOUND, "not found"),
        }
        let mut facts = RequestFacts::default();
        let result = self.credentials(conn, &req, &mut facts).await;
        let latency = started.elapsed();
        let error = result.as_ref().err().map(|r| (r.status.as_u16(), facts.upstream_code.as_deref().unwrap_or(r.reason)));
        let (response, refusal) = match result {
            Ok(response) => (response, None),
            Err(refusal) => {
                info!(
                    peer = %conn.peer,
                    cgroup_id = conn.attribution.map(|a| a.cgroup_id),
                    namespace = facts.claims.as_ref().map(|c| c.namespace.as_str()),
                    pod = facts.claims.as_ref().map(|c| c.pod_name.as_str()),
                    status = refusal.status.as_u16(),
                    reason = refusal.reason,
                    latency_ms = latency.as_millis() as u64,
                    detail = %refusal.message,
                    "refused credential request"
                );
                let class = class_of(&refusal);
                (text(refusal.status, refusal.message), Some((refusal.reason, class)))
            }
        };
        let status = response.status().as_u16();
        let named = facts.claims.as_ref().map(|c| (c.namespace.as_str(), c.pod_name.as_str()));
        self.metrics.observe_request(status, latency, refusal.map(|(reason, _)| reason), named);
        if let Some(pod) = &facts.pod {
            self.stats.request(
                pod,
                RequestRecord {
                    class: refusal.map_or(RequestClass::Ok, |(_, class)| class),
                    latency,
                    identity: facts.claims.as_ref().map(|c| Identity {
                        namespace: &c.namespace,
                        pod: &c.pod_name,
                        service_account: &c.service_account,
                    }),
                    served: facts.served.as_ref().map(|(role, outcome)| Served {
                        role_arn: &role.role_arn,
                        association_id: &role.association_id,
                        expiration: role.credentials.expiration,
                        cache_hit: matches!(outcome, Outcome::Hit | Outcome::Stale),
                        upstream_call: *outcome == Outcome::Fetched,
                    }),
                    error,
                },
            );
        }
        response
    }

    async fn credentials(
        &self,
        conn: &Connection,
        req: &Request<Incoming>,
        facts: &mut RequestFacts,
    ) -> Result<Response<Full<Bytes>>, Refusal> {
        // In link mode nothing attributes the caller: the pod is whatever the token says.
        let pod = match &conn.caller {
            Some(Ok(pod)) => Some(pod.clone()),
            Some(Err(refusal)) => return Err(refusal.clone()),
            None => None,
        };
        if let Some(pod) = &pod {
            if !conn.counted.swap(true, Ordering::Relaxed) {
                self.stats.connection(pod);
            }
            facts.pod = Some(pod.clone());
        }

        request::check_host(req.headers(), &self.allowed_hosts)?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let (raw_token, claims) = request::token(req.headers(), now)?;
        let pod = match pod {
            // The token must name the pod the kernel says is calling.
            Some(pod) if claims.pod_uid != pod => {
                return Err(Refusal::new(
                    StatusCode::FORBIDDEN,
                    "token_pod_mismatch",
                    format!(
                        "token belongs to pod {}/{} (uid {}), but the caller is pod uid {pod}",
                        claims.namespace, claims.pod_name, claims.pod_uid
                    ),
                ));
            }
            Some(pod) => pod,
            None => {
                facts.pod = Some(claims.pod_uid.clone());
                claims.pod_uid.clone()
            }
        };
        let claims = facts.claims.insert(claims);
        if !self.pod_limits.allow(&pod) {
            return Err(Refusal::new(
                StatusCode::TOO_MANY_REQUESTS,
                "pod_rate_limited",
                format!("pod {}/{} exceeded its request rate limit (--pod-rps, --pod-burst); retry shortly", claims.namespace, claims.pod_name),
            ));
        }

        let label = format!("{}/{}", claims.namespace, claims.pod_name);
        let (role, outcome) = match self.cache.get(raw_token, &pod, &label).await {
            Ok(found) => found,
            Err(e) => {
                let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_GATEWAY);
                let refusal = Refusal::new(status, "upstream_error", e.to_string());
                facts.upstream_code = Some(e.code);
                return Err(refusal);
            }
        };
        debug!(
            namespace = %claims.namespace,
            pod = %claims.pod_name,
            pod_uid = %claims.pod_uid,
            pid = conn.attribution.map(|a| a.pid_tgid >> 32),
            outcome = ?outcome,
            "served credentials"
        );
        let body = role.body();
        facts.served = Some((role, outcome));
        Ok(Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .expect("static response parts are valid"))
    }

    /// The pod the kernel attributed a connection to, or why there is none.
    fn caller(&self, attribution: Option<Attribution>, accepted_at: Instant) -> Result<PodUid, Refusal> {
        let Some(attribution) = attribution else {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "not_redirected",
                "connection did not come through the agent's redirect, so its caller cannot be attributed; connect to the credential address instead",
            ));
        };
        match self.cgroups.resolve(attribution.cgroup_id, accepted_at) {
            None => Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "cgroup_unknown",
                format!("cannot attribute caller: cgroup id {} no longer exists", attribution.cgroup_id),
            )),
            Some(Caller::Host { cgroup }) => Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "not_a_pod",
                format!("caller runs in cgroup {cgroup}, which belongs to no pod; only pods get pod credentials"),
            )),
            Some(Caller::Pod { uid, .. }) => Ok(uid),
        }
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body.into())))
        .expect("static response parts are valid")
}
