//! Load generator for `cargo xtask bench`, run once per simulated pod (its cgroup and network
//! namespace are what the agent attributes). HTTP/1.1 over plain TCP with as little client-side
//! work as possible, so the server is what gets measured.
//!
//! ```text
//! loadgen --addr IP:PORT [--token T] [--seconds S] [--concurrency C] [--keepalive]
//!         [--rate R] [--start-at UNIX_SECONDS] [--once] [--unique-tokens] [--connect-only]
//!         [--expect-key ACCESS_KEY_ID]
//! ```
//! Prints one JSON line: `{"ok":N,"failed":N,"statuses":{"200":N},"latencies_us":[...],"seconds":S,
//! "wrong":N,"refused_after_ok":N}`. `wrong` counts 200s whose body lacks `--expect-key`;
//! `refused_after_ok` counts answers other than 200 after the first 200 (the pod then holds
//! credentials). SIGTERM ends the run early: in-flight requests finish and are counted.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    time::Instant,
};

#[derive(Clone)]
struct Options {
    addr: SocketAddr,
    host: String,
    token: String,
    seconds: f64,
    concurrency: usize,
    keepalive: bool,
    /// Requests per second for the whole process (open loop); 0 = as fast as possible.
    rate: f64,
    start_at: Option<f64>,
    once: bool,
    unique_tokens: bool,
    connect_only: bool,
    expect_key: Option<String>,
}

#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    wrong: u64,
    refused_after_ok: u64,
    statuses: BTreeMap<u16, u64>,
    latencies_us: Vec<u32>,
}

fn parse() -> Options {
    let mut o = Options {
        addr: "169.254.170.23:80".parse().unwrap(),
        host: "169.254.170.23".into(),
        token: String::new(),
        seconds: 5.0,
        concurrency: 1,
        keepalive: false,
        rate: 0.0,
        start_at: None,
        once: false,
        unique_tokens: false,
        connect_only: false,
        expect_key: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--addr" => o.addr = value().parse().expect("--addr IP:PORT"),
            "--host" => o.host = value(),
            "--token" => o.token = value(),
            "--token-file" => o.token = std::fs::read_to_string(value()).expect("token file"),
            "--seconds" => o.seconds = value().parse().unwrap(),
            "--concurrency" => o.concurrency = value().parse().unwrap(),
            "--rate" => o.rate = value().parse().unwrap(),
            "--start-at" => o.start_at = Some(value().parse().unwrap()),
            "--keepalive" => o.keepalive = true,
            "--once" => o.once = true,
            "--unique-tokens" => o.unique_tokens = true,
            "--connect-only" => o.connect_only = true,
            "--expect-key" => o.expect_key = Some(value()),
            other => panic!("unknown argument {other}"),
        }
    }
    o
}

async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<u16> {
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).map_err(std::io::Error::other)?;
            let status: u16 = head
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| std::io::Error::other("bad status line"))?;
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + length {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Ok(status);
        }
    }
}

async fn worker(
    o: Arc<Options>,
    id: usize,
    deadline: Instant,
    stop: tokio::sync::watch::Receiver<bool>,
    tally: Arc<Mutex<Tally>>,
) {
    let mut conn: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(2048);
    let mut local = Tally::default();
    let interval = (o.rate > 0.0).then(|| Duration::from_secs_f64(o.concurrency as f64 / o.rate));
    let mut next = Instant::now()
        + interval
            .map(|i| i.mul_f64(id as f64 / o.concurrency as f64))
            .unwrap_or_default();
    let mut serial = 0u64;
    loop {
        if let Some(i) = interval {
            tokio::time::sleep_until(next).await;
            next += i;
        }
        if Instant::now() >= deadline || *stop.borrow() {
            break;
        }
        // Latency from the scheduled send time (open loop) or from now (closed loop).
        let started = match interval {
            Some(interval) => next - interval,
            None => Instant::now(),
        };
        let result: std::io::Result<u16> = async {
            if conn.is_none() {
                let s = TcpStream::connect(o.addr).await?;
                s.set_nodelay(true)?;
                conn = Some(s);
            }
            if o.connect_only {
                // Close with RST (linger 0): no TIME_WAIT pile-up to skew later rounds.
                if let Some(s) = conn.take() {
                    let _ = s.set_zero_linger();
                }
                return Ok(0);
            }
            let stream = conn.as_mut().expect("connected");
            serial += 1;
            let token = if o.unique_tokens {
                format!("{}x{id}x{serial}", o.token)
            } else {
                o.token.clone()
            };
            let close = if o.keepalive {
                ""
            } else {
                "Connection: close\r\n"
            };
            let request = format!(
                "GET /v1/credentials HTTP/1.1\r\nHost: {}\r\nAuthorization: {token}\r\n{close}\r\n",
                o.host
            );
            stream.write_all(request.as_bytes()).await?;
            let status = read_response(stream, &mut buf).await?;
            if !o.keepalive {
                conn = None;
            }
            Ok(status)
        }
        .await;
        let elapsed = started.elapsed();
        match result {
            Ok(status) => {
                *local.statuses.entry(status).or_default() += 1;
                if status == 200 || o.connect_only {
                    local.ok += 1;
                    local
                        .latencies_us
                        .push(elapsed.as_micros().min(u32::MAX as u128) as u32);
                    if let Some(key) = &o.expect_key
                        && !buf.windows(key.len()).any(|w| w == key.as_bytes())
                    {
                        local.wrong += 1;
                    }
                } else {
                    local.failed += 1;
                    if local.ok > 0 {
                        local.refused_after_ok += 1;
                    }
                }
            }
            Err(_) => {
                conn = None;
                local.failed += 1;
                if local.ok > 0 {
                    local.refused_after_ok += 1;
                }
            }
        }
        if o.once {
            break;
        }
    }
    let mut t = tally.lock().unwrap();
    t.ok += local.ok;
    t.failed += local.failed;
    t.wrong += local.wrong;
    t.refused_after_ok += local.refused_after_ok;
    for (k, v) in local.statuses {
        *t.statuses.entry(k).or_default() += v;
    }
    t.latencies_us.extend(local.latencies_us);
}

fn main() {
    let o = Arc::new(parse());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        if let Some(at) = o.start_at {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs_f64();
            if at > now {
                tokio::time::sleep(Duration::from_secs_f64(at - now)).await;
            }
        }
        let started = Instant::now();
        let deadline = started + Duration::from_secs_f64(if o.once { 60.0 } else { o.seconds });
        let tally = Arc::new(Mutex::new(Tally::default()));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            if let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            {
                term.recv().await;
                let _ = stop_tx.send(true);
            }
        });
        let workers: Vec<_> = (0..o.concurrency)
            .map(|id| {
                tokio::spawn(worker(
                    o.clone(),
                    id,
                    deadline,
                    stop_rx.clone(),
                    tally.clone(),
                ))
            })
            .collect();
        for w in workers {
            let _ = w.await;
        }
        let t = tally.lock().unwrap();
        let statuses: BTreeMap<String, u64> = t
            .statuses
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "ok": t.ok,
                "failed": t.failed,
                "statuses": statuses,
                "latencies_us": t.latencies_us,
                "seconds": started.elapsed().as_secs_f64(),
                "wrong": t.wrong,
                "refused_after_ok": t.refused_after_ok,
            })
        );
    });
}
