//! A fake EC2 instance metadata service (IMDSv2) at `169.254.169.254:80`, reachable from the
//! node's network namespace only (the address is on the node's loopback). It issues session
//! tokens (`PUT /latest/api/token` with a TTL header), the node role's credentials, which expire
//! and can be rotated, and the region. It registers every key it issues with the fake AWS APIs,
//! and revokes the old one on rotation, as a real rotation followed by expiry would.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming};
use hyper_util::rt::TokioIo;

use crate::{REGION, fake_aws::FakeAws, jwt};

pub const ADDR: &str = "169.254.169.254:80";
/// The node role's name, as IMDS lists it.
pub const ROLE: &str = "eks-node-role";

/// What the fake answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Up,
    /// Connections are refused: the listener is closed.
    Down,
    /// The token PUT is refused with 403 (IMDSv2 disabled by a hop limit or a policy).
    TokenForbidden,
}

struct State {
    mode: Mode,
    /// The current key: access key id, secret, session token, expiry (Unix seconds).
    key: (String, String, String, i64),
    serial: u32,
    lifetime: Duration,
    /// Credential fetches answered (role path).
    fetches: u32,
}

pub struct FakeImds {
    state: Arc<Mutex<State>>,
    netns: String,
    listener: Mutex<Option<tokio::task::JoinHandle<()>>>,
    runtime: tokio::runtime::Runtime,
}

impl FakeImds {
    /// Starts the fake in `netns` (the node's), issuing keys `aws` accepts.
    pub fn start_in(netns: &str, aws: &FakeAws) -> FakeImds {
        crate::node::sh(
            "ip",
            &[
                "-n",
                netns,
                "addr",
                "add",
                "169.254.169.254/32",
                "dev",
                "lo",
            ],
        );
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let state = Arc::new(Mutex::new(State {
            mode: Mode::Up,
            key: Default::default(),
            serial: 0,
            lifetime: Duration::from_secs(6 * 3600),
            fetches: 0,
        }));
        let imds = FakeImds {
            state,
            netns: netns.to_owned(),
            listener: Mutex::new(None),
            runtime,
        };
        imds.rotate(aws);
        imds.set_mode(Mode::Up);
        imds
    }

    /// Issues a new key, which `aws` accepts from now on, and revokes the previous one.
    pub fn rotate(&self, aws: &FakeAws) {
        let mut st = self.state.lock().unwrap();
        st.serial += 1;
        let old = st.key.0.clone();
        let key = (
            format!("ASIAIMDSNODE{:08}", st.serial),
            format!("imds-secret-{:08}-{}", st.serial, std::process::id()),
            format!("imds-session-{:08}-{}", st.serial, std::process::id()),
            jwt::now() + st.lifetime.as_secs() as i64,
        );
        crate::secrets::remember(&key.1);
        crate::secrets::remember(&key.2);
        aws.allow_key(&key.0, &key.1, Some(&key.2));
        if !old.is_empty() {
            aws.revoke_key(&old);
        }
        st.key = key;
    }

    /// The access key id of the current key.
    pub fn access_key(&self) -> String {
        self.state.lock().unwrap().key.0.clone()
    }

    /// Credential fetches answered so far.
    pub fn fetches(&self) -> u32 {
        self.state.lock().unwrap().fetches
    }

    pub fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
        let mut listener = self.listener.lock().unwrap();
        match (mode, listener.is_some()) {
            (Mode::Down, true) => {
                if let Some(task) = listener.take() {
                    task.abort();
                }
            }
            (Mode::Up | Mode::TokenForbidden, false) => {
                let addr: SocketAddr = ADDR.parse().unwrap();
                // std's listeners set SO_REUSEADDR: closed and opened again at once.
                let std_listener = crate::node::in_netns(&self.netns, move || {
                    std::net::TcpListener::bind(addr).expect("bind the fake IMDS")
                });
                std_listener.set_nonblocking(true).unwrap();
                let state = self.state.clone();
                *listener = Some(self.runtime.spawn(async move {
                    let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            continue;
                        };
                        let state = state.clone();
                        let service = hyper::service::service_fn(move |req| {
                            let state = state.clone();
                            async move { Ok::<_, std::convert::Infallible>(handle(&state, req)) }
                        });
                        tokio::spawn(
                            hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service),
                        );
                    }
                }));
            }
            _ => {}
        }
    }
}

fn text(status: u16, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Full::new(body.into()))
        .unwrap()
}

const TOKEN: &str = "fake-imds-session-token";

fn handle(state: &Mutex<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let mut st = state.lock().unwrap();
    let path = req.uri().path().to_owned();
    if req.method() == hyper::Method::PUT && path == "/latest/api/token" {
        if st.mode == Mode::TokenForbidden {
            return text(403, "Forbidden");
        }
        let ttl = req
            .headers()
            .get("x-aws-ec2-metadata-token-ttl-seconds")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok());
        return match ttl {
            Some(ttl) if (1..=21600).contains(&ttl) => Response::builder()
                .status(200)
                .header("x-aws-ec2-metadata-token-ttl-seconds", ttl.to_string())
                .body(Full::new(Bytes::from_static(TOKEN.as_bytes())))
                .unwrap(),
            _ => text(
                400,
                "Bad Request: missing or invalid x-aws-ec2-metadata-token-ttl-seconds",
            ),
        };
    }
    // IMDSv2 only: every read needs the session token.
    if req
        .headers()
        .get("x-aws-ec2-metadata-token")
        .and_then(|v| v.to_str().ok())
        != Some(TOKEN)
    {
        return text(401, "Unauthorized");
    }
    match path.as_str() {
        "/latest/meta-data/iam/security-credentials/" => text(200, ROLE),
        p if p == format!("/latest/meta-data/iam/security-credentials/{ROLE}") => {
            st.fetches += 1;
            let (akid, secret, token, expiry) = &st.key;
            let expiration = time_string(*expiry);
            let body = serde_json::json!({
                "Code": "Success",
                "LastUpdated": time_string(jwt::now()),
                "Type": "AWS-HMAC",
                "AccessKeyId": akid,
                "SecretAccessKey": secret,
                "Token": token,
                "Expiration": expiration,
            });
            text(200, body.to_string())
        }
        "/latest/meta-data/placement/region" => text(200, REGION),
        "/latest/dynamic/instance-identity/document" => {
            text(200, serde_json::json!({"region": REGION, "instanceId": "i-0fake", "accountId": crate::ACCOUNT}).to_string())
        }
        _ => text(404, "Not Found"),
    }
}

/// RFC 3339 UTC, whole seconds.
fn time_string(unix: i64) -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{unix}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

impl Drop for FakeImds {
    fn drop(&mut self) {
        if let Some(task) = self.listener.lock().unwrap().take() {
            task.abort();
        }
    }
}
