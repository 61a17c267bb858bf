//! HTTP request handling: arbitrary bytes from a client go through hyper's HTTP/1 server with the
//! agent's settings, into the agent's own request checks (route, Host, token). No input panics,
//! and every response is a status the agent can send.
#![no_main]

use std::{convert::Infallible, sync::OnceLock, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use pod_identity_agent_fuzz::request::{self, Route};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    })
}

fn allowed() -> &'static [String] {
    static HOSTS: OnceLock<Vec<String>> = OnceLock::new();
    HOSTS.get_or_init(|| {
        request::allowed_hosts(&[
            "169.254.170.23:80".parse().unwrap(),
            "[fd00:ec2::23]:80".parse().unwrap(),
        ])
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        let (mut client, server) = tokio::io::duplex(256 * 1024);
        let service =
            hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                let status = match request::route(req.method(), req.uri().path()) {
                    Route::NotFound => 404,
                    Route::MethodNotAllowed => 405,
                    Route::Credentials => match request::check_host(req.headers(), allowed())
                        .and_then(|()| request::token(req.headers(), 1_700_000_000))
                    {
                        Ok(_) => 200,
                        Err(refusal) => {
                            assert!(matches!(refusal.status.as_u16(), 400 | 403), "{refusal:?}");
                            refusal.status.as_u16()
                        }
                    },
                };
                Ok::<_, Infallible>(
                    hyper::Response::builder()
                        .status(status)
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
            });
        let conn = hyper::server::conn::http1::Builder::new()
            .max_buf_size(64 * 1024)
            .serve_connection(TokioIo::new(server), service);
        let feed = async {
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            let mut out = Vec::new();
            let _ = client.read_to_end(&mut out).await;
        };
        let _ =
            tokio::time::timeout(Duration::from_secs(1), async { tokio::join!(conn, feed) }).await;
    });
});
