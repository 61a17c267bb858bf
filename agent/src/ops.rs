//! The operator endpoints: probes (`/healthz`, `/readyz`) and `/metrics`, each a small HTTP
//! server on its own address.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch};
use tracing::warn;

use crate::stats::PodStatsRegistry;

/// Why the agent cannot do its job yet; `None` once it can.
pub struct Readiness(Mutex<Option<String>>);

impl Readiness {
    pub fn new(reason: &str) -> Arc<Readiness> {
        Arc::new(Readiness(Mutex::new(Some(reason.to_owned()))))
    }

    pub fn set(&self, not_ready: Option<String>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = not_ready;
    }

    pub fn reason(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

pub type Handler = Arc<dyn Fn(&str) -> (StatusCode, &'static str, String) + Send + Sync>;

/// Serves `handler` (path -> status, content type, body) on `addr` until `shutdown` flips.
pub async fn serve(addr: SocketAddr, handler: Handler, mut shutdown: watch::Receiver<bool>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => { warn!(error = %e, %addr, "accept failed"); continue; }
                },
                _ = shutdown.changed() => return,
            };
            let handler = handler.clone();
            let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let (status, content_type, body) = handler(req.uri().path());
                let response = Response::builder()
                    .status(status)
                    .header(header::CONTENT_TYPE, content_type)
                    .body(Full::new(Bytes::from(body)))
                    .expect("static response parts are valid");
                async move { Ok::<_, Infallible>(response) }
            });
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        }
    });
    Ok(())
}

/// `/healthz`: the process serves. `/readyz`: it can do its job, else 503 with the reason.
/// `/v1/pods`: per-pod statistics as JSON (the probe address is loopback by default).
pub fn probes(readiness: Arc<Readiness>, stats: Arc<PodStatsRegistry>) -> Handler {
    Arc::new(move |path| match path {
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => match readiness.reason() {
            None => (StatusCode::OK, "text/plain", "ready\n".into()),
            Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("not ready: {reason}\n")),
        },
        "/v1/pods" => {
            let body = serde_json::to_string(&stats.snapshot()).expect("stats serialise");
            (StatusCode::OK, "application/json", body)
        }
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    })
}
