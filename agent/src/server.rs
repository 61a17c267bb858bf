//! The credential endpoint pods reach through the redirect: `GET /v1/credentials`.
//!
//! Each accepted connection is attributed once, right after `accept()`, from the record the
//! kernel programs left for its 4-tuple; every request on it is then checked against that record.
//! The pod's state is found at accept too: its statistics, its rate bucket, and the last token it
//! presented with its claims, digest and binding, so decoding and hashing are paid once per
//! token, not per request or per connection. A cached request touches no lock shared with other
//! pods' requests but the cache's own.

use std::{
    collections::{HashMap, HashSet},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
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
    credentials::TokenDigest,
    kernel::Redirector,
    metrics::Metrics,
    ratelimit::{PodBucket, PodRateLimits},
    request::{self, Refusal, Route},
    source::CredentialSource,
    stats::{Identity, PodEntry, PodStatsRegistry, RequestClass, RequestRecord, Served},
    token::{PodUid, TokenClaims},
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
    pub metrics: Arc<Metrics>,
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

/// One pod's serving state.
pub struct PodState {
    uid: PodUid,
    stats: Arc<PodEntry>,
    bucket: Arc<PodBucket>,
    /// What the pod's last request left to reuse. Only the pod's own requests take the lock.
    memo: Mutex<Memo>,
}

#[derive(Default)]
struct Memo {
    /// The last token the pod presented and bound to it.
    token: Option<Arc<BoundToken>>,
    /// The credentials last served to it: their role goes to the pod's statistics once.
    served: Option<Arc<AssumedRole>>,
}

/// A token whose claims, digest and binding are known.
struct BoundToken {
    /// The Authorization header's value as sent (trimmed): the memo's key.
    raw: Box<str>,
    claims: TokenClaims,
    digest: TokenDigest,
    /// `namespace/pod`, for logs.
    label: Box<str>,
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
        "token_invalid" => RequestClass::BadToken,
        "pod_rate_limited" => RequestClass::RateLimited,
        "upstream_error"
            if refusal.status.is_client_error()
                && refusal.status != StatusCode::TOO_MANY_REQUESTS =>
        {
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
                    self.metrics.observe_attribution(accepted_at.elapsed());
                    (attribution, Some(self.caller(attribution, accepted_at)))
                }
                (Some(_), Err(_)) => (None, Some(self.caller(None, accepted_at))),
                (None, _) => (None, None),
            };
            let uid = caller.as_ref().and_then(|c| c.as_ref().ok());
            let permit = match self.connection_limits.admit(uid) {
                Ok(permit) => permit,
                Err(rejected) => {
                    // Closed before a byte is read: the cheapest answer to a connection flood.
                    self.metrics.observe_rejected_connection(rejected.reason());
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let caller = caller.map(|c| c.map(|uid| self.pod(uid)));
            if let Some(Ok(pod)) = &caller {
                pod.stats.connection();
            }
            let conn = Arc::new(Connection {
                peer,
                attribution,
                caller,
                _permit: permit,
            });
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
            Route::MethodNotAllowed => {
                return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported");
            }
            Route::NotFound => return text(StatusCode::NOT_FOUND, "not found"),
        }
        let mut facts = RequestFacts::default();
        let result = self.credentials(conn, &req, &mut facts).await;
        let latency = started.elapsed();
        let claims = facts.token.as_ref().map(|t| &t.claims);
        let error = result.as_ref().err().map(|r| {
            (
                r.status.as_u16(),
                facts.upstream_code.as_deref().unwrap_or(r.reason),
            )
        });
        let (response, refusal) = match result {
            Ok(response) => (response, None),
            Err(refusal) => {
                info!(
                    peer = %conn.peer,
                    cgroup_id = conn.attribution.map(|a| a.cgroup_id),
                    namespace = claims.map(|c| c.namespace.as_str()),
                    pod = claims.map(|c| c.pod_name.as_str()),
                    status = refusal.status.as_u16(),
                    reason = refusal.reason,
                    latency_ms = latency.as_millis() as u64,
                    detail = %refusal.message,
                    "refused credential request"
                );
                let class = class_of(&refusal);
                (
                    text(refusal.status, refusal.message),
                    Some((refusal.reason, class)),
                )
            }
        };
        let status = response.status().as_u16();
        let named = claims.map(|c| (c.namespace.as_str(), c.pod_name.as_str()));
        self.metrics
            .observe_request(status, latency, refusal.map(|(reason, _)| reason), named);
        if let Some(pod) = &facts.pod {
            pod.stats.request(RequestRecord {
                class: refusal.map_or(RequestClass::Ok, |(_, class)| class),
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
        response
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
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let remembered = attributed.as_ref().and_then(|pod| {
            pod.memo
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .token
                .clone()
        });
        let token = match remembered
            .filter(|t| t.claims.expires_at > now && request::same_token(req.headers(), &t.raw))
        {
            Some(token) => token,
            None => {
                let (raw, claims) = request::token(req.headers(), now)?;
                // The token must name the pod the kernel says is calling.
                if let Some(pod) = &attributed
                    && claims.pod_uid != pod.uid
                {
                    return Err(Refusal::new(
                        StatusCode::FORBIDDEN,
                        "token_pod_mismatch",
                        format!(
                            "token belongs to pod {}/{} (uid {}), but the caller is pod uid {}",
                            claims.namespace, claims.pod_name, claims.pod_uid, pod.uid
                        ),
                    ));
                }
                let token = Arc::new(BoundToken {
                    digest: TokenDigest::of(raw),
                    label: format!("{}/{}", claims.namespace, claims.pod_name).into_boxed_str(),
                    raw: Box::from(raw),
                    claims,
                });
                if let Some(pod) = &attributed {
                    pod.memo.lock().unwrap_or_else(|e| e.into_inner()).token = Some(token.clone());
                }
                facts.new_token = true;
                token
            }
        };
        facts.token = Some(token.clone());
        let pod = match attributed {
            Some(pod) => pod,
            None => {
                let pod = self.pod(token.claims.pod_uid.clone());
                facts.pod = Some(pod.clone());
                pod
            }
        };
        if !pod.bucket.allow() {
            return Err(Refusal::new(
                StatusCode::TOO_MANY_REQUESTS,
                "pod_rate_limited",
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
                let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_GATEWAY);
                let refusal = Refusal::new(status, "upstream_error", e.to_string());
                facts.upstream_code = Some(e.code);
                return Err(refusal);
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
        {
            let mut memo = pod.memo.lock().unwrap_or_else(|e| e.into_inner());
            facts.new_role = !memo
                .served
                .as_ref()
                .is_some_and(|last| Arc::ptr_eq(last, &role));
            if facts.new_role {
                memo.served = Some(role.clone());
            }
        }
        facts.served = Some((role, outcome));
        let mut response = Response::new(Full::new(body));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Ok(response)
    }

    /// A pod's serving state, created on first sight.
    fn pod(&self, uid: PodUid) -> Arc<PodState> {
        if let Some(pod) = self
            .pods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&uid)
        {
            return pod.clone();
        }
        let state = PodState {
            stats: self.stats.entry(&uid),
            bucket: self.pod_limits.bucket(&uid),
            memo: Mutex::default(),
            uid: uid.clone(),
        };
        self.pods
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(uid)
            .or_insert_with(|| Arc::new(state))
            .clone()
    }

    /// The pods with serving state: those the agent knows.
    pub fn pod_uids(&self) -> HashSet<PodUid> {
        self.pods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Drops the state of pods whose cgroups are gone: serving state, statistics, rate buckets
    /// and per-pod metrics.
    pub fn forget_gone_pods(&self, gone: &HashSet<PodUid>) {
        // Nothing is gone on almost every pass: take no write lock the request path would wait on.
        if gone.is_empty() {
            return;
        }
        self.pods
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|uid, _| !gone.contains(uid));
        self.pod_limits.forget(gone);
        for (namespace, pod) in self.stats.forget(gone) {
            self.metrics.forget_pod(&namespace, &pod);
        }
    }

    /// The pod the kernel attributed a connection to, or why there is none.
    fn caller(
        &self,
        attribution: Option<Attribution>,
        accepted_at: Instant,
    ) -> Result<PodUid, Refusal> {
        let Some(attribution) = attribution else {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "not_redirected",
                "connection did not come through the agent's redirect, so its caller cannot be attributed; connect to the credential address instead",
            ));
        };
        match self
            .cgroups
            .as_ref()
            .and_then(|index| index.resolve(attribution.cgroup_id, accepted_at))
            .as_deref()
        {
            None => Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "cgroup_unknown",
                format!(
                    "cannot attribute caller: cgroup id {} no longer exists",
                    attribution.cgroup_id
                ),
            )),
            Some(Caller::Host { cgroup }) => Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "not_a_pod",
                format!(
                    "caller runs in cgroup {cgroup}, which belongs to no pod; only pods get pod credentials"
                ),
            )),
            Some(Caller::Pod { uid, .. }) => Ok(uid.clone()),
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
