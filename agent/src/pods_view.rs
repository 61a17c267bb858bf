//! `pod-identity-agent pods`: the per-pod statistics of a running agent as a table (or JSON),
//! for an operator who ran `kubectl exec` into the agent's pod.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{
    config::{PodsArgs, SortField},
    stats::PodStats,
};

pub fn run(args: &PodsArgs) -> anyhow::Result<()> {
    loop {
        let (raw, mut pods) = fetch(args.addr)?;
        if args.json {
            println!("{raw}");
        } else {
            sort(&mut pods, args.sort);
            if args.watch.is_some() {
                // Clear the screen and home the cursor, like watch(1).
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", table(&pods));
        }
        match args.watch {
            Some(seconds) => std::thread::sleep(Duration::from_secs_f64(seconds.max(0.1))),
            None => return Ok(()),
        }
    }
}

fn fetch(addr: SocketAddr) -> anyhow::Result<(String, Vec<PodStats>)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("cannot reach the agent's probe address {addr} (is the agent running? pass --addr)"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET /v1/pods HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("malformed HTTP response from the agent")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("agent answered {}", head.lines().next().unwrap_or(""));
    }
    let body = dechunk(body);
    let pods = serde_json::from_str(&body).context("unexpected /v1/pods body")?;
    Ok((body, pods))
}

/// Undoes chunked transfer encoding if the body uses it.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else { return body.to_owned() };
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { return body.to_owned() };
        if n == 0 {
            return out;
        }
        let Some(chunk) = after.get(..n) else { return body.to_owned() };
        out.push_str(chunk);
        rest = after[n..].trim_start_matches("\r\n");
    }
}

fn errors(p: &PodStats) -> u64 {
    let e = &p.errors;
    e.bad_token + e.refused + e.rate_limited + e.upstream_client + e.upstream_server
}

fn sort(pods: &mut [PodStats], by: SortField) {
    let f = |x: Option<f64>| x.unwrap_or(f64::INFINITY);
    match by {
        SortField::Namespace => pods.sort_by(|a, b| (&a.namespace, &a.pod).cmp(&(&b.namespace, &b.pod))),
        SortField::Pod => pods.sort_by(|a, b| a.pod.cmp(&b.pod)),
        SortField::Requests => pods.sort_by(|a, b| b.requests.cmp(&a.requests)),
        SortField::Errors => pods.sort_by_key(|p| std::cmp::Reverse(errors(p))),
        SortField::Upstream => pods.sort_by(|a, b| b.upstream_calls.cmp(&a.upstream_calls)),
        SortField::Last => pods.sort_by(|a, b| f(a.last_request_age_seconds).total_cmp(&f(b.last_request_age_seconds))),
        SortField::P99 => pods.sort_by(|a, b| b.latency_p99_ms.unwrap_or(0.0).total_cmp(&a.latency_p99_ms.unwrap_or(0.0))),
    }
}

/// Errors as `bad-token/refused/429/upstream-4xx/upstream-5xx`.
fn error_cell(p: &PodStats) -> String {
    let e = &p.errors;
    format!("{}/{}/{}/{}/{}", e.bad_token, e.refused, e.rate_limited, e.upstream_client, e.upstream_server)
}

fn age(seconds: Option<f64>) -> String {
    match seconds {
        None => "-".into(),
        Some(s) if s < 120.0 => format!("{s:.0}s"),
        Some(s) if s < 7200.0 => format!("{:.0}m", s / 60.0),
        Some(s) => format!("{:.0}h", s / 3600.0),
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}ms"))
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

pub fn table(pods: &[PodStats]) -> String {
    let header = [
        "NAMESPACE",
        "POD",
        "SERVICE-ACCOUNT",
        "REQUESTS",
        "HITS",
        "UPSTREAM",
        "ERRORS(tok/ref/429/up4/up5)",
        "REDIRECTS",
        "LAST",
        "EXPIRES",
        "P50",
        "P99",
        "ASSOCIATION",
        "ROLE-ARN",
    ];
    let rows: Vec<[String; 14]> = pods
        .iter()
        .map(|p| {
            [
                or_dash(&p.namespace).to_owned(),
                if p.pod.is_empty() { format!("uid:{}", p.pod_uid) } else { p.pod.clone() },
                or_dash(&p.service_account).to_owned(),
                p.requests.to_string(),
                p.cache_hits.to_string(),
                p.upstream_calls.to_string(),
                error_cell(p),
                p.kernel_redirects.to_string(),
                age(p.last_request_age_seconds),
                p.credential_expiry.clone().unwrap_or_else(|| "-".into()),
                ms(p.latency_p50_ms),
                ms(p.latency_p99_ms),
                or_dash(&p.association_id).to_owned(),
                or_dash(&p.role_arn).to_owned(),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    if rows.is_empty() {
        out.push_str("(no pod has asked for credentials yet)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunk_handles_chunked_and_plain_bodies() {
        assert_eq!(dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"), "hello world");
        assert_eq!(dechunk("[{\"a\":1}]"), "[{\"a\":1}]");
    }

    #[test]
    fn table_has_a_row_per_pod() {
        let p = PodStats {
            pod_uid: "u".into(),
            namespace: "payments".into(),
            pod: "api-0".into(),
            requests: 3,
            ..Default::default()
        };
        let t = table(&[p]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("NAMESPACE"));
        assert!(lines[1].starts_with("payments") && lines[1].contains("api-0"));
        assert_eq!(lines.len(), 2);
        assert!(table(&[]).contains("no pod has asked"));
    }
}
