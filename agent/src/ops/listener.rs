//! The operator endpoints' HTTP server. Any pod on the cluster network can reach the metrics
//! port (it listens on the host network, which NetworkPolicy does not cover), and any process on
//! the node the probe port, so each listener is bounded: a request head must arrive within
//! [`HEADER_READ_TIMEOUT`], a connection buffers at most [`MAX_BUF_SIZE`] and lives at most
//! [`MAX_LIFETIME`], at most [`MAX_CONNECTIONS`] are open at once (a new one evicts the oldest,
//! so a flood cannot lock out a scrape or a kubelet probe), and a failing `accept()` backs off.

use std::{
    collections::VecDeque,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{Response, header};
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Notify, watch},
};
use tracing::warn;

use super::Handler;

pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// hyper's smallest: an operator request is a line and a few headers.
pub const MAX_BUF_SIZE: usize = 8 * 1024;
pub const MAX_LIFETIME: Duration = Duration::from_secs(60);
pub const MAX_CONNECTIONS: usize = 256;
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// The open connections of one listener, oldest first, each with its eviction signal.
#[derive(Default)]
struct Slots {
    open: Mutex<VecDeque<(u64, Arc<Notify>)>>,
    next: std::sync::atomic::AtomicU64,
}

impl Slots {
    /// A place for a new connection, evicting the oldest when all are taken.
    fn take(&self) -> (u64, Arc<Notify>) {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let evict = Arc::new(Notify::new());
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.len() >= MAX_CONNECTIONS
            && let Some((_, oldest)) = open.pop_front()
        {
            oldest.notify_one();
        }
        open.push_back((id, evict.clone()));
        (id, evict)
    }

    fn release(&self, id: u64) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = open.iter().position(|(i, _)| *i == id) {
            open.remove(at);
        }
    }
}

/// Accepts on `listener` until `shutdown` flips, serving `handler` on each connection.
pub async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    handler: Handler,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Slots::default());
    let mut backoff = ACCEPT_BACKOFF;
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!(error = %e, %addr, ?backoff, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        backoff = ACCEPT_BACKOFF;
        let (id, evicted) = slots.take();
        let (slots, handler) = (slots.clone(), handler.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = serve_connection(stream, handler) => {}
                _ = evicted.notified() => {}
                _ = tokio::time::sleep(MAX_LIFETIME) => {}
            }
            slots.release(id);
        });
    }
}

async fn serve_connection(stream: TcpStream, handler: Handler) {
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let (status, content_type, body) = handler(req.uri().path());
        let response = Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid");
        async move { Ok::<_, Infallible>(response) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUF_SIZE)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_listener_evicts_its_oldest_connection() {
        let slots = Slots::default();
        let first = slots.take();
        for _ in 1..MAX_CONNECTIONS {
            slots.take();
        }
        let evicted = || tokio::time::timeout(Duration::from_millis(10), first.1.notified());
        assert!(evicted().await.is_err(), "room for all until now");
        let newest = slots.take();
        assert!(
            evicted().await.is_ok(),
            "the oldest makes room for the newest"
        );
        assert_eq!(slots.open.lock().unwrap().len(), MAX_CONNECTIONS);
        slots.release(newest.0);
        slots.release(first.0);
        assert_eq!(
            slots.open.lock().unwrap().len(),
            MAX_CONNECTIONS - 1,
            "already evicted"
        );
    }
}
