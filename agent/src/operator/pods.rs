//! `pod-identity-agent pods`: the per-pod statistics of a running agent as a table (or JSON),
//! for an operator who ran `kubectl exec` into the agent's pod.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, bail};
use clap::Args;

use super::{or_dash, table};
use crate::stats::PodStats;

#[derive(Args, Debug)]
pub struct PodsArgs {
    /// The agent's probe address.
    #[arg(long, default_value = "127.0.0.1:2703")]
    pub addr: SocketAddr,
    /// Print the raw JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Redraw every SECONDS until interrupted.
    #[arg(long, value_name = "SECONDS")]
    pub watch: Option<f64>,
    /// Order rows by this column (descending for numbers).
    #[arg(long, value_enum, default_value_t = SortField::Namespace)]
    pub sort: SortField,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortField {
    Namespace,
    Pod,
    Requests,
    Errors,
    Upstream,
    Last,
    P99,
    /// Connects to IMDS (the pods still reaching for the node role's credentials first).
    Imds,
}

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
            print!("{}", render(&pods));
        }
        match args.watch {
            Some(seconds) => std::thread::sleep(Duration::from_secs_f64(seconds.max(0.1))),
            None => return Ok(()),
        }
    }
}

/// `/v1/pods` of the agent whose probe address is `addr`: the raw JSON and its rows.
pub fn fetch(addr: SocketAddr) -> anyhow::Result<(String, Vec<PodStats>)> {
    let (status, body) = super::http_get(addr, "/v1/pods").with_context(|| {
        format!("cannot reach the agent's probe address {addr} (is the agent running? pass --addr)")
    })?;
    if status != 200 {
        bail!("agent answered {status}: {}", body.trim());
    }
    let pods = serde_json::from_str(&body).context("unexpected /v1/pods body")?;
    Ok((body, pods))
}

fn errors(p: &PodStats) -> u64 {
    let e = &p.errors;
    e.bad_token + e.refused + e.rate_limited + e.upstream_client + e.upstream_server
}

fn sort(pods: &mut [PodStats], by: SortField) {
    let f = |x: Option<f64>| x.unwrap_or(f64::INFINITY);
    match by {
        SortField::Namespace => {
            pods.sort_by(|a, b| (&a.namespace, &a.pod).cmp(&(&b.namespace, &b.pod)))
        }
        SortField::Pod => pods.sort_by(|a, b| a.pod.cmp(&b.pod)),
        SortField::Requests => pods.sort_by_key(|p| std::cmp::Reverse(p.requests)),
        SortField::Errors => pods.sort_by_key(|p| std::cmp::Reverse(errors(p))),
        SortField::Upstream => pods.sort_by_key(|p| std::cmp::Reverse(p.upstream_calls)),
        SortField::Imds => pods.sort_by_key(|p| std::cmp::Reverse(p.imds_connects)),
        SortField::Last => pods.sort_by(|a, b| {
            f(a.last_request_age_seconds).total_cmp(&f(b.last_request_age_seconds))
        }),
        SortField::P99 => pods.sort_by(|a, b| {
            b.latency_p99_ms
                .unwrap_or(0.0)
                .total_cmp(&a.latency_p99_ms.unwrap_or(0.0))
        }),
    }
}

/// Errors as `bad-token/refused/429/upstream-4xx/upstream-5xx`.
fn error_cell(p: &PodStats) -> String {
    let e = &p.errors;
    format!(
        "{}/{}/{}/{}/{}",
        e.bad_token, e.refused, e.rate_limited, e.upstream_client, e.upstream_server
    )
}

fn age(seconds: Option<f64>) -> String {
    match seconds {
        None => "-".into(),
        Some(s) if s < 120.0 => format!("{s:.0}s"),
        Some(s) if s < 7200.0 => format!("{:.0}m", s / 60.0),
        Some(s) => format!("{:.0}h", s / 3600.0),
    }
}

/// Connects to IMDS: `-` for none, `N` in audit mode, `N (M denied)` when refused.
fn imds_cell(p: &PodStats) -> String {
    match (p.imds_connects, p.imds_denied) {
        (0, _) => "-".into(),
        (n, 0) => n.to_string(),
        (n, denied) => format!("{n} ({denied} denied)"),
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}ms"))
}

/// The last refusal: `CODE (STATUS, AGE ago)`.
fn last_error_cell(p: &PodStats) -> String {
    match &p.last_error {
        None => "-".into(),
        Some(e) => format!(
            "{} ({}, {} ago)",
            e.code,
            e.status,
            age(Some(e.age_seconds))
        ),
    }
}

pub fn render(pods: &[PodStats]) -> String {
    let rows: Vec<[String; 16]> = pods
        .iter()
        .map(|p| {
            [
                or_dash(&p.namespace),
                if p.pod.is_empty() {
                    format!("uid:{}", p.pod_uid)
                } else {
                    p.pod.clone()
                },
                or_dash(&p.service_account),
                p.requests.to_string(),
                p.cache_hits.to_string(),
                p.upstream_calls.to_string(),
                error_cell(p),
                last_error_cell(p),
                p.kernel_redirects.to_string(),
                imds_cell(p),
                age(p.last_request_age_seconds),
                p.credential_expiry.clone().unwrap_or_else(|| "-".into()),
                ms(p.latency_p50_ms),
                ms(p.latency_p99_ms),
                or_dash(&p.association_id),
                or_dash(&p.role_arn),
            ]
        })
        .collect();
    let mut out = table(
        [
            "NAMESPACE",
            "POD",
            "SERVICE-ACCOUNT",
            "REQUESTS",
            "HITS",
            "UPSTREAM",
            "ERRORS(tok/ref/429/up4/up5)",
            "LAST-ERROR",
            "REDIRECTS",
            "IMDS",
            "LAST",
            "EXPIRES",
            "P50",
            "P99",
            "ASSOCIATION",
            "ROLE-ARN",
        ],
        &rows,
    );
    if rows.is_empty() {
        out.push_str("(no pod has asked for credentials or reached IMDS yet)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_a_row_per_pod() {
        let p = PodStats {
            pod_uid: "u".into(),
            namespace: "payments".into(),
            pod: "api-0".into(),
            requests: 3,
            ..Default::default()
        };
        let t = render(&[p]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("NAMESPACE"));
        assert!(lines[1].starts_with("payments") && lines[1].contains("api-0"));
        assert_eq!(lines.len(), 2);
        assert!(render(&[]).contains("no pod has asked"));
    }
}
