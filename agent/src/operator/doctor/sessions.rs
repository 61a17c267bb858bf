//! The doctor's account of the sessions pods get: for each served pod, whether EKS's session tags
//! are on and whether a session policy scopes it down. EKS Auth does not say, so on EKS the
//! associations that served the pods are asked for (EKS API); in sts mode the agent says, and the
//! associations file it reads is read here too, for the external IDs target roles must require.

use std::{collections::BTreeMap, net::SocketAddr, path::Path, sync::Arc};

use super::Check;
use crate::{
    operator::{eks::Eks, pods, printable},
    ops::AgentInfo,
    stats::PodStats,
    sts::associations::{self, Association, Session},
    upstream::SessionScope,
};

const NAME: &str = "sessions";
/// Pods named in the check's line; the rest are counted.
const LISTED: usize = 20;
/// Associations described (EKS API) for the served pods, at most.
const DESCRIBED: usize = 50;

/// On EKS: the served pods' associations, described, say how each pod's session is scoped. A
/// describe EKS refuses leaves those pods unknown: said plainly when it is the permission (the
/// node role rarely has `eks:DescribePodIdentityAssociation`), a warning otherwise.
pub async fn check_eks(eks: &Eks, probe: SocketAddr) -> Check {
    let served = match served_pods(probe) {
        Ok(served) => served,
        Err(check) => return check,
    };
    let mut scopes: BTreeMap<String, Option<SessionScope>> = BTreeMap::new();
    let mut refused = None;
    for p in &served {
        if scopes.len() >= DESCRIBED {
            break;
        }
        if !scopes.contains_key(&p.association_id) {
            let scope = match eks.describe(&p.association_id).await {
                Ok(a) => Some(a.session_scope()),
                Err(e) => {
                    refused.get_or_insert(e);
                    None
                }
            };
            scopes.insert(p.association_id.clone(), scope);
        }
    }
    let mut check = report(&served, |p| {
        scopes.get(&p.association_id).copied().flatten()
    });
    match refused {
        // The node role is not meant to read the EKS API: say so, without crying wolf.
        Some(e) if e.code == "AccessDeniedException" => {
            check.detail.push_str(
                "; unknown where EKS refused to describe the association to the node's credentials (`associations --pods` from a workstation shows them)",
            );
            check
        }
        Some(e) => Check::warn(
            NAME,
            format!("{}; EKS did not describe an association: {e}", check.detail),
            "check the EKS endpoint and region, or use `associations --pods` from a workstation",
        ),
        None => check,
    }
}

/// In sts mode: the agent's associations file (as the agent reads it) and the served pods'
/// sessions as the agent assumed them.
pub fn check_sts(agent: &AgentInfo, probe: SocketAddr) -> Check {
    let Some(path) = &agent.associations_file else {
        return Check::warn(
            NAME,
            "the agent does not name its associations file",
            "run a doctor of the same version as the agent",
        );
    };
    let file = match read_associations(path, &agent.cluster_name) {
        Ok(all) => all,
        Err(check) => return check,
    };
    let targets: Vec<String> = file
        .iter()
        .filter_map(|a| {
            let t = a.target.as_ref()?;
            Some(format!(
                "{} -> {} requires sts:ExternalId {}{}",
                a.id,
                t.role_arn,
                t.external_id.value,
                if t.external_id.derived {
                    " (derived)"
                } else {
                    ""
                }
            ))
        })
        .collect();
    let scoped = file
        .iter()
        .filter(|a| matches!(a.session, Session::Untagged { .. }))
        .count();
    let mut check = match served_pods(probe) {
        Ok(served) => report(&served, |p| p.session),
        Err(check) => check,
    };
    let mut head = format!(
        "{}: {} associations, {scoped} with session tags off",
        path.display(),
        file.len()
    );
    if !targets.is_empty() {
        head.push_str(&format!(
            "; target roles' trust policies must require: {}",
            targets.join(", ")
        ));
    }
    check.detail = format!("{head}; {}", check.detail);
    check
}

/// The associations file as the agent would read it. The path comes from whatever answers on
/// the probe address, and the doctor may run as root: only a regular file of a ConfigMap's size
/// is read, and of a file that does not parse only the rule it breaks and where is said, never
/// the parser's quote of its content.
fn read_associations(path: &Path, cluster: &str) -> Result<Vec<Arc<Association>>, Check> {
    const MAX_BYTES: u64 = 1 << 20;
    let unreadable = |why: String| {
        Check::warn(
            NAME,
            format!("{}: {why}", path.display()),
            "run doctor in the agent's pod (kubectl -n kube-system exec ds/pod-identity-agent -- pod-identity-agent doctor), where the file is mounted",
        )
    };
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() && m.len() <= MAX_BYTES => {}
        Ok(_) => return Err(unreadable("not a regular file of at most 1 MiB".into())),
        Err(e) => {
            return Err(unreadable(format!(
                "cannot be read from here ({})",
                e.kind()
            )));
        }
    }
    associations::read_file(path, cluster).map_err(|e| {
        // A rule broken by a file that parsed is worth its whole message; a file that did not
        // parse gets the outermost sentence and where, not the parser's quote of it.
        let why = match e
            .chain()
            .find_map(|c| c.downcast_ref::<serde_yaml_ng::Error>())
        {
            Some(parse) => match parse.location() {
                Some(l) => format!("{e} (line {}, column {})", l.line(), l.column()),
                None => e.to_string(),
            },
            None => format!("{e:#}"),
        };
        Check::warn(
            NAME,
            format!(
                "{}: {why}; the agent keeps the associations it last read",
                path.display()
            ),
            "fix the file (docs/deploying.md, sts mode, has its fields and rules)",
        )
    })
}

/// The pods the agent served credentials to, or the check that says why they are unknown.
fn served_pods(probe: SocketAddr) -> Result<Vec<PodStats>, Check> {
    match pods::fetch(probe) {
        Ok((_, pods)) => {
            let mut served: Vec<PodStats> = pods
                .into_iter()
                .filter(|p| !p.association_id.is_empty())
                .collect();
            served.sort_by(|a, b| (&a.namespace, &a.pod).cmp(&(&b.namespace, &b.pod)));
            Ok(served)
        }
        Err(e) => Err(Check::fail(
            NAME,
            format!("cannot read the pods: {e:#}"),
            "read the agent's log",
        )),
    }
}

/// One line: each served pod and its session's tags and policy.
fn report(served: &[PodStats], scope: impl Fn(&PodStats) -> Option<SessionScope>) -> Check {
    if served.is_empty() {
        return Check::ok(NAME, "no pod has been served credentials yet");
    }
    let words = |s: Option<SessionScope>| match s {
        None => "unknown",
        Some(SessionScope { tags: true, .. }) => "tags on",
        Some(SessionScope { policy: false, .. }) => "tags off",
        Some(SessionScope { policy: true, .. }) => "tags off, scoped by a session policy",
    };
    let mut lines: Vec<String> = served
        .iter()
        .take(LISTED)
        .map(|p| {
            format!(
                "{}/{}: {}",
                printable(&p.namespace),
                printable(&p.pod),
                words(scope(p))
            )
        })
        .collect();
    if served.len() > LISTED {
        lines.push(format!("and {} more", served.len() - LISTED));
    }
    let policies = served
        .iter()
        .filter(|p| scope(p).is_some_and(|s| s.policy))
        .count();
    Check::ok(
        NAME,
        format!(
            "{} served pods, {policies} scoped by a session policy: {}",
            served.len(),
            lines.join("; ")
        ),
    )
}
