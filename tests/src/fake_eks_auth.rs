//! A fake EKS Auth API: `POST /clusters/{cluster}/assume-role-for-pod-identity` in the wire
//! format the AWS SDK speaks. No public emulator implements this API.
//!
//! It refuses requests whose SigV4 `Authorization` scope does not name service `eks-auth` and the
//! expected region, checks the token's audience, expiry and `kubernetes.io` claims, issues
//! credentials per (namespace, service account) association, and can inject faults.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, body::Incoming};
use hyper_util::rt::TokioIo;

use crate::{ACCOUNT, REGION, jwt};

/// One call the fake answered.
#[derive(Clone, Debug)]
pub struct Call {
    pub cluster: String,
    pub namespace: String,
    pub service_account: String,
    pub pod_uid: String,
    pub status: u16,
}

/// What the fake answers instead of credentials while set.
#[derive(Clone, Debug)]
pub struct Fault {
    pub status: u16,
    pub code: String,
}

struct State {
    /// (namespace, service account) -> role name.
    associations: HashMap<(String, String), String>,
    calls: Vec<Call>,
    fault: Option<Fault>,
    /// Reset every connection (RST) before answering.
    reset: bool,
    /// Connections accepted (and reset) while `reset` was on.
    resets: u64,
    latency: Duration,
    lifetime: Duration,
    issued: u64,
}

impl Default for State {
    fn default() -> Self {
        State {
            associations: HashMap::new(),
            calls: Vec::new(),
            fault: None,
            reset: false,
            resets: 0,
            latency: Duration::ZERO,
            // What EKS Auth issues.
            lifetime: Duration::from_secs(6 * 3600),
            issued: 0,
        }
    }
}

pub struct FakeEksAuth {
    pub addr: SocketAddr,
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

impl FakeEksAuth {
    /// Starts the fake on 127.0.0.1 inside network namespace `netns` (the node's).
    pub fn start_in(netns: &str) -> FakeEksAuth {
        let listener = crate::node::in_netns(netns, || std::net::TcpListener::bind("127.0.0.1:0").expect("bind fake EKS Auth"));
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let served = state.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
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
                        Ok(handle(&state, req).await)
                    }
                });
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        FakeEksAuth { addr, state, _runtime: runtime }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Lets pods of `namespace` running as `service_account` assume `role`.
    pub fn associate(&self, namespace: &str, service_account: &str, role: &str) {
        self.state.lock().unwrap().associations.insert((namespace.into(), service_account.into()), role.into());
    }

    pub fn set_fault(&self, fault: Option<Fault>) {
        self.state.lock().unwrap().fault = fault;
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    /// Calls made for the pod with this UID.
    pub fn calls_for(&self, pod_uid: &str) -> usize {
        self.state.lock().unwrap().calls.iter().filter(|c| c.pod_uid == pod_uid).count()
    }

    /// Resets every new connection while on.
    pub fn set_reset(&self, on: bool) {
        self.state.lock().unwrap().reset = on;
    }

    pub fn resets(&self) -> u64 {
        self.state.lock().unwrap().resets
    }

    /// Delay before each answer.
    pub fn set_latency(&self, latency: Duration) {
        self.state.lock().unwrap().latency = latency;
    }

    /// Validity of the credentials issued from now on.
    pub fn set_lifetime(&self, lifetime: Duration) {
        self.state.lock().unwrap().lifetime = lifetime;
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
    json(status, serde_json::json!({ "message": message }), &[("x-amzn-errortype", code)])
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    t.subsec_nanos() ^ (t.as_secs() as u32).rotate_left(13)
}

async fn handle(state: &Mutex<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let Some(cluster) = path
        .strip_prefix("/clusters/")
        .and_then(|rest| rest.strip_suffix("/assume-role-for-pod-identity"))
        .map(str::to_owned)
    else {
        return error(404, "UnknownOperationException", &format!("no operation at {path}"));
    };
    if req.method() != hyper::Method::POST {
        return error(405, "InvalidRequestException", "POST only");
    }
    // SigV4: `AWS4-HMAC-SHA256 Credential=AKID/DATE/REGION/SERVICE/aws4_request, ...`.
    let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let scope: Vec<&str> = auth
        .strip_prefix("AWS4-HMAC-SHA256 Credential=")
        .and_then(|rest| rest.split(',').next())
        .map(|cred| cred.split('/').collect())
        .unwrap_or_default();
    if scope.len() != 5 || scope[2] != REGION || scope[3] != "eks-auth" || scope[4] != "aws4_request" {
        return error(403, "InvalidSignatureException", "request is not SigV4-signed for eks-auth in the expected region");
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(400, "InvalidRequestException", "unreadable body"),
    };
    let token = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("token").and_then(|t| t.as_str()).map(str::to_owned))
        .unwrap_or_default();
    let claims = match jwt::claims(&token) {
        Ok(c) => c,
        Err(e) => return error(400, "InvalidTokenException", &format!("token is not a JWT: {e}")),
    };
    let k8s = &claims["kubernetes.io"];
    let namespace = k8s["namespace"].as_str().unwrap_or("").to_owned();
    let service_account = k8s["serviceaccount"]["name"].as_str().unwrap_or("").to_owned();
    let pod_uid = k8s["pod"]["uid"].as_str().unwrap_or("").to_owned();

    let latency = state.lock().unwrap().latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let mut st = state.lock().unwrap();
    let record = |st: &mut State, status: u16| {
        st.calls.push(Call {
            cluster: cluster.clone(),
            namespace: namespace.clone(),
            service_account: service_account.clone(),
            pod_uid: pod_uid.clone(),
            status,
        })
    };
    if let Some(fault) = st.fault.clone() {
        record(&mut st, fault.status);
        return error(fault.status, &fault.code, "injected fault");
    }
    let audience_ok = claims["aud"].as_array().is_some_and(|a| a.iter().any(|v| v == jwt::AUDIENCE));
    if !audience_ok || namespace.is_empty() || service_account.is_empty() || pod_uid.is_empty() {
        record(&mut st, 400);
        return error(400, "InvalidTokenException", "token lacks the pods.eks.amazonaws.com audience or kubernetes.io claims");
    }
    if claims["exp"].as_i64().unwrap_or(0) <= jwt::now() {
        record(&mut st, 400);
        return error(400, "ExpiredTokenException", "token has expired");
    }
    let Some(role) = st.associations.get(&(namespace.clone(), service_account.clone())).cloned() else {
        record(&mut st, 404);
        return error(
            404,
            "ResourceNotFoundException",
            &format!("no pod identity association for {namespace}/{service_account} in cluster {cluster}"),
        );
    };
    record(&mut st, 200);
    st.issued += 1;
    let serial = st.issued;
    let expiration = jwt::now() + st.lifetime.as_secs() as i64;
    let secret = format!("fakeSecret{serial:08}{}", rand_u32());
    let session = format!("fakeSession{serial:08}{}", rand_u32());
    crate::secrets::remember(&secret);
    crate::secrets::remember(&session);
    let association_id = format!("a-{:016x}", serial.wrapping_mul(0x9e3779b97f4a7c15) >> 8);
    json(
        200,
        serde_json::json!({
            "subject": {"namespace": namespace, "serviceAccount": service_account},
            "audience": jwt::AUDIENCE,
            "podIdentityAssociation": {
                "associationArn": format!("arn:aws:eks:{REGION}:{ACCOUNT}:podidentityassociation/{cluster}/{association_id}"),
                "associationId": association_id,
            },
            "assumedRoleUser": {
                "arn": format!("arn:aws:sts::{ACCOUNT}:assumed-role/{role}/eks-{cluster}-{}", &pod_uid[..8]),
                "assumeRoleId": format!("AROAFAKE{serial:012}:eks-{cluster}"),
            },
            "credentials": {
                "accessKeyId": access_key_for(&namespace, &service_account),
                "secretAccessKey": secret,
                "sessionToken": session,
                "expiration": expiration,
            }
        }),
        &[],
    )
}

