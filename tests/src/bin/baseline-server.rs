//! The floor for `cargo xtask bench`: a minimal hyper server that answers every request with the
//! same credential JSON the agent serves, built with the same hyper and tokio as the agent.
//!
//! `baseline-server --listen IP:PORT --body-file FILE [--delay-ms MS]`
//!
//! With `--delay-ms`, every answer waits that long first: the floor of the bench's burst
//! scenario, where the agent's upstream takes as long.
//!
//! It counts its heap allocations with the agent's own counting allocator, and answers
//! `GET /allocations` with the count, so the bench compares allocations per request with the
//! agent's (two relaxed atomic adds per allocation: a few nanoseconds per request).

/// The allocator the counting wrapper forwards to (the agent's file names it `Backing`).
use std::alloc::System as Backing;
use std::{convert::Infallible, net::SocketAddr};

#[path = "../../../agent/src/allocator/counting.rs"]
mod counting;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (mut listen, mut body): (Option<SocketAddr>, Option<Vec<u8>>) = (None, None);
    let mut delay = std::time::Duration::ZERO;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => {
                listen = Some(
                    args.next()
                        .expect("--listen IP:PORT")
                        .parse()
                        .expect("IP:PORT"),
                )
            }
            "--body-file" => {
                body =
                    Some(std::fs::read(args.next().expect("--body-file FILE")).expect("body file"))
            }
            "--delay-ms" => {
                delay = std::time::Duration::from_millis(
                    args.next()
                        .expect("--delay-ms MS")
                        .parse()
                        .expect("milliseconds"),
                )
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let body = Bytes::from(body.expect("--body-file"));
    // The agent's backlog (1024), not mio's default (libc::SOMAXCONN, 128 in the libc crate): a
    // shorter accept queue overflows in the 250-client burst and its SYNs wait out a 1 s timeout.
    let addr = listen.expect("--listen");
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .expect("socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket.bind(addr).expect("bind");
    let listener = socket.listen(1024).expect("listen");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let body = if req.uri().path() == "/allocations" {
                    Bytes::from(format!(
                        "{} {}",
                        counting::allocations(),
                        counting::live_bytes()
                    ))
                } else {
                    body.clone()
                };
                let mut response = hyper::Response::new(Full::new(body));
                response.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/json"),
                );
                async move {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    Ok::<_, Infallible>(response)
                }
            });
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service),
        );
    }
}
