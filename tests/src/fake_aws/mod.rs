//! Fake AWS APIs the agent and its operator commands talk to, on one listener inside the node's
//! network namespace, with one shared state (no public emulator implements these APIs):
//!
//! * EKS Auth (`eks_auth`): `POST /clusters/{cluster}/assume-role-for-pod-identity`.
//! * The EKS control plane (`eks`): the cluster, its add-ons, and pod identity associations
//!   (list with pagination, describe, create, delete).
//! * STS (`sts`): `AssumeRole`, for the agent's `--credential-source sts`.
//!
//! Every request must carry a valid SigV4 signature (`sigv4`) for its service (`eks-auth`, `eks`
//! or `sts`) and the fake's region, made with a key the fake knows. An association created through
//! the control plane is what EKS Auth then serves, as in EKS. Faults can be injected into EKS
//! Auth: error statuses, latency and connection resets.

mod eks;
mod eks_auth;
pub mod sigv4;
mod sts;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, body::Incoming};
use hyper_util::rt::TokioIo;
pub use sts::{Session, StsCall};

use crate::{
    ACCOUNT, CLUSTER, NODE_ACCESS_KEY, NODE_SECRET, OPERATOR_ACCESS_KEY, OPERATOR_SECRET, REGION,
    jwt,
};

/// One EKS Auth call the fake answered.
#[derive(Clone, Debug)]
pub struct Call {
    pub cluster: String,
    pub namespace: String,
    pub service_account: String,
    pub pod_uid: String,
    pub status: u16,
    /// The access key that signed the call.
    pub signed_by: String,
    /// The Host header: which endpoint name the caller resolved.
    pub host: String,
}

/// One EKS control-plane call: its operation and who signed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiCall {
    pub operation: &'static str,
    pub signed_by: String,
    pub status: u16,
}

/// What the fake EKS Auth answers instead of credentials while set.
#[derive(Clone, Debug)]
pub struct Fault {
    pub status: u16,
    pub code: String,
}

/// A pod identity association as EKS keeps it.
#[derive(Clone, Debug, Default)]
pub struct Association {
    pub id: String,
    pub arn: String,
    pub namespace: String,
    pub service_account: String,
    pub role_arn: String,
    pub target_role_arn: Option<String>,
    /// What EKS generated for a target role: the chained hop's `sts:ExternalId`.
    pub external_id: Option<String>,
    /// No session tags on the pods' sessions.
    pub disable_session_tags: bool,
    /// The session policy that scopes the pods' sessions.
    pub policy: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub created_at: i64,
    pub modified_at: i64,
}

struct State {
    associations: Vec<Association>,
    serial: u64,
    /// Status of the fake's cluster (`CLUSTER`); `None`: it does not exist.
    cluster_status: Option<String>,
    /// Installed add-ons and their status.
    addons: HashMap<String, String>,
    keys: HashMap<String, sigv4::Key>,
    /// Access keys EKS Auth answers AccessDeniedException (a node role without the permission).
    denied: HashSet<String>,
    calls: Vec<Call>,
    api_calls: Vec<ApiCall>,
    fault: Option<Fault>,
    /// Reset every connection (RST) before answering.
    reset: bool,
    /// Connections accepted (and reset) while `reset` was on.
    resets: u64,
    latency: Duration,
    lifetime: Duration,
    issued: u64,
    sts_calls: Vec<StsCall>,
    sts_fault: Option<Fault>,
    /// Sessions STS issued, by access key.
    sts_sessions: HashMap<String, sts::Session>,
    /// Roles whose trust policy refuses every caller.
    denied_roles: HashSet<String>,
    /// Roles whose trust policy requires this `sts:ExternalId`.
    required_external_ids: HashMap<String, String>,
    /// A service-account issuer's keys at `/openid/v1/jwks`, and the bearer token it demands.
    jwks: Option<(serde_json::Value, String)>,
    jwks_fetches: u64,
}

impl Default for State {
    fn default() -> Self {
        let key = |secret: &str| sigv4::Key {
            secret: secret.to_owned(),
            session_token: None,
        };
        State {
            associations: Vec::new(),
            serial: 0,
            cluster_status: Some("ACTIVE".into()),
            addons: HashMap::new(),
            keys: HashMap::from([
                (NODE_ACCESS_KEY.to_owned(), key(NODE_SECRET)),
                (OPERATOR_ACCESS_KEY.to_owned(), key(OPERATOR_SECRET)),
            ]),
            denied: HashSet::new(),
            calls: Vec::new(),
            api_calls: Vec::new(),
            fault: None,
            reset: false,
            resets: 0,
            latency: Duration::ZERO,
            // What EKS Auth issues.
            lifetime: Duration::from_secs(6 * 3600),
            issued: 0,
            sts_calls: Vec::new(),
            sts_fault: None,
            sts_sessions: HashMap::new(),
            denied_roles: HashSet::new(),
            required_external_ids: HashMap::new(),
            jwks: None,
            jwks_fetches: 0,
        }
    }
}

impl State {
    /// A new id-like string: `prefix` and 17 lowercase letters and digits, as EKS's IDs look.
    fn next_id(&mut self, prefix: &str) -> String {
        self.serial += 1;
        let mut n = self.serial.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(rand_u32());
        let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let mut id = String::from(prefix);
        for _ in 0..17 {
            id.push(alphabet[(n % 36) as usize] as char);
            n /= 36;
            if n == 0 {
                n = self.serial.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
            }
        }
        id
    }

    /// Stores `new` (its namespace, service account, roles, scope and tags) as a new
    /// association: an ID, an ARN, times, and an external ID when it has a target role.
    fn add_association(&mut self, new: Association) -> Association {
        let id = self.next_id("a-");
        let association = Association {
            arn: format!("arn:aws:eks:{REGION}:{ACCOUNT}:podidentityassociation/{CLUSTER}/{id}"),
            external_id: new
                .target_role_arn
                .as_ref()
                .map(|_| format!("{id}-{:08x}", rand_u32())),
            id,
            created_at: jwt::now(),
            modified_at: jwt::now(),
            ..new
        };
        self.associations.push(association.clone());
        association
    }

    fn lookup_key(&self, akid: &str) -> Option<sigv4::Key> {
        self.keys.get(akid).cloned()
    }
}

pub struct FakeAws {
    pub addr: SocketAddr,
    scheme: &'static str,
    state: Arc<Mutex<State>>,
    _runtime: tokio::runtime::Runtime,
}

/// The credentials the fake issues for an association: stable per (namespace, service account)
/// for the access key, unique per call for the secret and session token.
pub fn access_key_for(namespace: &str, service_account: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in format!("{namespace}/{service_account}").bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
    }
    format!("ASIA{:016X}", h)
}

/// The IAM role ARN of role `name` in the fake's account.
pub fn role_arn(name: &str) -> String {
    format!("arn:aws:iam::{ACCOUNT}:role/{name}")
}

impl FakeAws {
    /// Starts the fake on 127.0.0.1 inside network namespace `netns` (the node's), plain HTTP.
    pub fn start_in(netns: &str) -> FakeAws {
        FakeAws::start(Some(netns), "127.0.0.1:0".parse().unwrap(), None)
    }

    /// Starts the fake on `addr` in this process's own network namespace, plain HTTP (the arm64
    /// smoke test, inside a VM with no namespaces of its own).
    pub fn start_here(addr: SocketAddr) -> FakeAws {
        FakeAws::start(None, addr, None)
    }

    /// Starts the fake on `addr` inside `netns`, serving HTTPS with `pki`'s server certificate.
    pub fn start_tls_in(netns: &str, addr: SocketAddr, pki: &crate::pki::Pki) -> FakeAws {
        use tokio_rustls::rustls::{
            self,
            pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pki.cert)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(&pki.key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        FakeAws::start(
            Some(netns),
            addr,
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
        )
    }

    fn start(
        netns: Option<&str>,
        addr: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> FakeAws {
        let bind = move || std::net::TcpListener::bind(addr).expect("bind fake AWS");
        let listener = match netns {
            Some(netns) => crate::node::in_netns(netns, bind),
            None => bind(),
        };
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let served = state.clone();
        let scheme = if tls.is_some() { "https" } else { "http" };
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                {
                    let mut st = served.lock().unwrap();
                    if st.reset {
                        st.resets += 1;
                        // Linger 0: dropping the socket sends RST, as a crashed endpoint does.
                        let _ = stream.set_zero_linger();
                        continue;
                    }
                }
                let state = served.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move {
                            // Connections opened before the reset mode began (the agent's pooled
                            // keep-alive ones) are dropped at their next request, with no answer.
                            {
                                let mut st = state.lock().unwrap();
                                if st.reset {
                                    st.resets += 1;
                                    return Err(std::io::Error::other("injected connection reset"));
                                }
                            }
                            Ok(route(&state, req).await)
                        }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                        Some(acceptor) => {
                            // A failed handshake (a client that does not trust the certificate)
                            // ends here: nothing is answered.
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                    }
                });
            }
        });
        FakeAws {
            addr,
            scheme,
            state,
            _runtime: runtime,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Lets pods of `namespace` running as `service_account` assume role `role` (a role name in
    /// the fake's account), as an association created through EKS would. Returns its ID.
    pub fn associate(&self, namespace: &str, service_account: &str, role: &str) -> String {
        self.state
            .lock()
            .unwrap()
            .add_association(Association {
                namespace: namespace.to_owned(),
                service_account: service_account.to_owned(),
                role_arn: role_arn(role),
                ..Association::default()
            })
            .id
    }

    pub fn associations(&self) -> Vec<Association> {
        self.state.lock().unwrap().associations.clone()
    }

    /// The cluster's status (`ACTIVE`, `CREATING`, ...), or `None` to make it not exist.
    pub fn set_cluster_status(&self, status: Option<&str>) {
        self.state.lock().unwrap().cluster_status = status.map(str::to_owned);
    }

    /// Installs (`Some(status)`) or removes an add-on of the cluster.
    pub fn set_addon(&self, name: &str, status: Option<&str>) {
        let mut st = self.state.lock().unwrap();
        match status {
            Some(s) => st.addons.insert(name.to_owned(), s.to_owned()),
            None => st.addons.remove(name),
        };
    }

    /// Accepts signatures made with this key from now on.
    pub fn allow_key(&self, access_key_id: &str, secret: &str, session_token: Option<&str>) {
        let key = sigv4::Key {
            secret: secret.to_owned(),
            session_token: session_token.map(str::to_owned),
        };
        self.state
            .lock()
            .unwrap()
            .keys
            .insert(access_key_id.to_owned(), key);
    }

    /// Refuses signatures made with this key from now on.
    pub fn revoke_key(&self, access_key_id: &str) {
        self.state.lock().unwrap().keys.remove(access_key_id);
    }

    /// EKS Auth answers AccessDeniedException to calls signed with this key (a node role
    /// without `eks-auth:AssumeRoleForPodIdentity`).
    pub fn deny_eks_auth(&self, access_key_id: &str) {
        self.state
            .lock()
            .unwrap()
            .denied
            .insert(access_key_id.to_owned());
    }

    pub fn set_fault(&self, fault: Option<Fault>) {
        self.state.lock().unwrap().fault = fault;
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    /// Calls made for the pod with this UID.
    pub fn calls_for(&self, pod_uid: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .calls
            .iter()
            .filter(|c| c.pod_uid == pod_uid)
            .count()
    }

    /// EKS control-plane calls so far.
    pub fn api_calls(&self) -> Vec<ApiCall> {
        self.state.lock().unwrap().api_calls.clone()
    }

    /// Resets every new connection while on.
    pub fn set_reset(&self, on: bool) {
        self.state.lock().unwrap().reset = on;
    }

    pub fn resets(&self) -> u64 {
        self.state.lock().unwrap().resets
    }

    /// Delay before each EKS Auth answer.
    pub fn set_latency(&self, latency: Duration) {
        self.state.lock().unwrap().latency = latency;
    }

    /// Validity of the credentials issued from now on.
    pub fn set_lifetime(&self, lifetime: Duration) {
        self.state.lock().unwrap().lifetime = lifetime;
    }

    /// STS AssumeRole calls so far.
    pub fn sts_calls(&self) -> Vec<StsCall> {
        self.state.lock().unwrap().sts_calls.clone()
    }

    /// What STS answers instead of credentials while set.
    pub fn set_sts_fault(&self, fault: Option<Fault>) {
        self.state.lock().unwrap().sts_fault = fault;
    }

    /// Serves `jwks` at `/openid/v1/jwks` to requests with `Authorization: Bearer {bearer}`, as
    /// an API server serves its service-account issuer's keys.
    pub fn serve_jwks(&self, jwks: serde_json::Value, bearer: &str) {
        self.state.lock().unwrap().jwks = Some((jwks, bearer.to_owned()));
    }

    /// Answered requests for the JWKS.
    pub fn jwks_fetches(&self) -> u64 {
        self.state.lock().unwrap().jwks_fetches
    }

    /// STS refuses to let anyone assume this role (its trust policy does not name the caller).
    pub fn deny_role(&self, role_arn: &str) {
        self.state
            .lock()
            .unwrap()
            .denied_roles
            .insert(role_arn.to_owned());
    }

    /// The role's trust policy requires `sts:ExternalId` to be `external_id` (the confused-deputy
    /// guard of a target role): an AssumeRole without it, or with another, is AccessDenied.
    pub fn require_external_id(&self, role_arn: &str, external_id: &str) {
        self.state
            .lock()
            .unwrap()
            .required_external_ids
            .insert(role_arn.to_owned(), external_id.to_owned());
    }

    /// The session an access key belongs to (issued by the fake STS or EKS Auth): its tags and
    /// its session policy.
    pub fn session(&self, access_key: &str) -> Option<Session> {
        self.state
            .lock()
            .unwrap()
            .sts_sessions
            .get(access_key)
            .cloned()
    }

    /// Whether the session of `access_key` may perform `action` (see [`Session::allows`]).
    pub fn session_allows(&self, access_key: &str, action: &str) -> bool {
        self.session(access_key)
            .unwrap_or_else(|| panic!("no session for {access_key}"))
            .allows(action)
    }
}

fn json(status: u16, body: serde_json::Value, extra: &[(&str, &str)]) -> Response<Full<Bytes>> {
    let mut b = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-amzn-requestid", format!("fake-{:08x}", rand_u32()));
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

fn error(status: u16, code: &str, message: &str) -> Response<Full<Bytes>> {
    json(
        status,
        serde_json::json!({ "message": message }),
        &[("x-amzn-errortype", code)],
    )
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    t.subsec_nanos() ^ (t.as_secs() as u32).rotate_left(13)
}

async fn route(state: &Mutex<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(400, "InvalidRequestException", "unreadable body"),
    };
    let path = parts.uri.path().to_owned();
    if let Some(cluster) = path
        .strip_prefix("/clusters/")
        .and_then(|rest| rest.strip_suffix("/assume-role-for-pod-identity"))
    {
        return eks_auth::handle(state, cluster, &parts, &body).await;
    }
    if path.starts_with("/clusters/") {
        return eks::handle(state, &parts, &body);
    }
    if path == "/openid/v1/jwks" {
        let mut st = state.lock().unwrap();
        let Some((jwks, bearer)) = st.jwks.clone() else {
            return error(404, "NotFound", "no issuer keys served");
        };
        let presented = parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if presented != format!("Bearer {bearer}") {
            return error(
                401,
                "Unauthorized",
                "a service-account bearer token is needed",
            );
        }
        st.jwks_fetches += 1;
        return json(200, jwks, &[]);
    }
    if path == "/" && parts.method == http::Method::POST {
        return sts::handle(state, &parts, &body).await;
    }
    error(
        404,
        "UnknownOperationException",
        &format!("no operation at {path}"),
    )
}

/// [`authenticate`] for a query-protocol service: the rejection in its XML shape.
#[expect(
    clippy::result_large_err,
    reason = "the rejection is the response the fake sends, built once per refused request"
)]
fn authenticate_xml(
    state: &Mutex<State>,
    parts: &http::request::Parts,
    body: &[u8],
    service: &str,
) -> Result<String, Response<Full<Bytes>>> {
    let st = state.lock().unwrap();
    sigv4::verify(parts, body, service, REGION, |akid| st.lookup_key(akid))
        .map(|signed| signed.access_key_id)
        .map_err(|(status, code, message)| sts::xml_error(status, code, &message))
}

/// Verifies the request's signature for `service`, answering the rejection if it is not valid.
#[expect(
    clippy::result_large_err,
    reason = "the rejection is the response the fake sends, built once per refused request"
)]
fn authenticate(
    state: &Mutex<State>,
    parts: &http::request::Parts,
    body: &[u8],
    service: &str,
) -> Result<String, Response<Full<Bytes>>> {
    let st = state.lock().unwrap();
    sigv4::verify(parts, body, service, REGION, |akid| st.lookup_key(akid))
        .map(|signed| signed.access_key_id)
        .map_err(|(status, code, message)| error(status, code, &message))
}
