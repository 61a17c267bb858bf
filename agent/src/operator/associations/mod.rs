//! `pod-identity-agent associations`: the cluster's pod identity associations (EKS API, the
//! caller's own credentials, so it runs from a laptop as well as a node), joined to a node's pods
//! on request; `change` holds the create/update/delete steps of setting Pod Identity up.

mod change;

use std::{collections::BTreeMap, io::Read as _, process::ExitCode};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use serde::Serialize;

pub use self::change::{CreateArgs, UpdateArgs};
use super::{
    eks::{Association, ClusterArgs, Eks},
    or_dash, table,
};
use crate::{stats::PodStats, upstream::SessionScope};

const APP_NAME: &str = "pod-identity-agent-associations";

#[derive(Args, Debug)]
pub struct AssociationsArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(subcommand)]
    pub action: Option<Action>,
    /// Only associations in this namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Only associations for this service account.
    #[arg(long)]
    pub service_account: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Join a node's pods to the associations: the output of `pod-identity-agent pods --json`,
    /// from a file or `-` for standard input.
    #[arg(long, value_name = "FILE|-")]
    pub pods: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Action {
    /// Let a service account's pods assume a role: CreatePodIdentityAssociation. Prints the new
    /// association's ID (and, for a target role, the trust-policy statement it needs).
    Create(CreateArgs),
    /// Change an association's role, target role, session policy or session tags:
    /// UpdatePodIdentityAssociation.
    Update(UpdateArgs),
    /// Delete an association by its ID: DeletePodIdentityAssociation.
    Delete {
        /// The association ID (`a-...`).
        id: String,
    },
}

impl AssociationsArgs {
    /// The listing flags mean nothing to `create` and `delete`: say so rather than ignore them.
    pub fn check(&self) -> anyhow::Result<()> {
        let listing = self.namespace.is_some()
            || self.service_account.is_some()
            || self.json
            || self.pods.is_some();
        if self.action.is_some() && listing {
            bail!(
                "--namespace, --service-account, --json and --pods are for listing; give an action's own flags after it (`create`, `update`)"
            );
        }
        Ok(())
    }
}

pub fn run(args: AssociationsArgs) -> anyhow::Result<ExitCode> {
    args.check()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let eks = Eks::connect(&args.cluster, APP_NAME).await?;
        match &args.action {
            Some(Action::Create(create)) => change::create(&eks, create).await,
            Some(Action::Update(update)) => change::update(&eks, update).await,
            Some(Action::Delete { id }) => change::delete(&eks, id).await,
            None => list(&eks, &args).await,
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

async fn list(eks: &Eks, args: &AssociationsArgs) -> anyhow::Result<()> {
    let pods = args.pods.as_deref().map(read_pods).transpose()?;
    let associations = eks
        .associations(args.namespace.as_deref(), args.service_account.as_deref())
        .await
        .with_context(|| {
            format!(
                "listing the pod identity associations of cluster {}",
                eks.cluster
            )
        })?;
    match (pods, args.json) {
        (None, true) => println!("{}", serde_json::to_string_pretty(&associations)?),
        (None, false) => print!("{}", render_associations(&eks.cluster, &associations)),
        (Some(pods), json) => {
            let joined = join(&pods, &associations, &eks.cluster, eks.region.as_deref());
            if json {
                println!("{}", serde_json::to_string_pretty(&joined)?);
            } else {
                print!("{}", render_join(&joined));
            }
        }
    }
    Ok(())
}

/// A file's text, or standard input's for `-`.
fn read_input(source: &str, what: &str) -> anyhow::Result<String> {
    let mut text = String::new();
    if source == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .with_context(|| format!("reading {what} from standard input"))?;
    } else {
        text = std::fs::read_to_string(source)
            .with_context(|| format!("reading {what} from {source}"))?;
    }
    Ok(text)
}

fn read_pods(source: &str) -> anyhow::Result<Vec<PodStats>> {
    let text = read_input(source, "the pods JSON")?;
    let pods: Vec<PodStats> = serde_json::from_str(&text).with_context(|| {
        format!("{source} is not the output of `pod-identity-agent pods --json`")
    })?;
    if pods.is_empty() && text.trim() != "[]" {
        bail!("{source}: no pods");
    }
    Ok(pods)
}

fn render_associations(cluster: &str, associations: &[Association]) -> String {
    if associations.is_empty() {
        return format!("(no pod identity associations in cluster {cluster})\n");
    }
    let rows: Vec<[String; 9]> = associations
        .iter()
        .map(|a| {
            [
                a.association_id.clone(),
                a.namespace.clone(),
                a.service_account.clone(),
                a.role_arn.clone(),
                or_dash(a.target_role_arn.as_deref().unwrap_or_default()),
                or_dash(a.external_id.as_deref().unwrap_or_default()),
                if a.disable_session_tags { "off" } else { "on" }.to_owned(),
                or_dash(&abbreviate(a.policy.as_deref().unwrap_or_default())),
                or_dash(
                    &a.tags
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(","),
                ),
            ]
        })
        .collect();
    table(
        [
            "ASSOCIATION",
            "NAMESPACE",
            "SERVICE-ACCOUNT",
            "ROLE-ARN",
            "TARGET-ROLE-ARN",
            "EXTERNAL-ID",
            "SESSION-TAGS",
            "POLICY",
            "TAGS",
        ],
        &rows,
    )
}

/// A policy in a table cell: its first characters (`--json` has it whole).
fn abbreviate(policy: &str) -> String {
    const WIDTH: usize = 40;
    if policy.chars().count() <= WIDTH {
        return policy.to_owned();
    }
    let head: String = policy.chars().take(WIDTH - 3).collect();
    format!("{head}...")
}

/// How one pod of the node stands with the cluster's associations.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PodJoin {
    pub namespace: String,
    pub pod: String,
    pub service_account: String,
    pub state: JoinState,
    /// The association that serves (or served) the pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub association_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role_arn: Option<String>,
    /// The session's tags and policy: from the association (EKS API), else as the agent
    /// assumed the role (sts mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionScope>,
    /// What the state means, in a sentence.
    pub detail: String,
    /// Connects to IMDS (the IMDS guard): the pod reaches for the node role's credentials.
    #[serde(skip_serializing_if = "is_zero")]
    pub imds_connects: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum JoinState {
    /// Credentials were served under an association that still exists.
    Served,
    /// EKS Auth found no association for the service account.
    NoAssociation,
    /// The pod was served under an association that no longer exists.
    AssociationGone,
    /// The pod got no association, but one exists now.
    AssociationNew,
    /// Refused for another reason.
    Failing,
    /// No credentials asked for, no association, but connects to IMDS: the node role's
    /// credentials are what it uses.
    UsingNodeRole,
    /// Nothing asked yet, or nothing known.
    Unknown,
}

impl JoinState {
    fn label(self) -> &'static str {
        match self {
            JoinState::Served => "served",
            JoinState::NoAssociation => "no association",
            JoinState::AssociationGone => "association deleted",
            JoinState::AssociationNew => "association created since",
            JoinState::Failing => "failing",
            JoinState::UsingNodeRole => "using the node role",
            JoinState::Unknown => "-",
        }
    }
}

/// The command that creates the missing association for one service account.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Fix {
    pub namespace: String,
    pub service_account: String,
    pub command: String,
    /// A pod of the service account connects to IMDS: it is using the node role meanwhile.
    pub using_node_role: bool,
}

/// A pod that reaches IMDS and never asked for credentials: its name and service account are
/// unknown to the agent, so the fix starts with finding it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodeRoleUser {
    pub pod_uid: String,
    pub cgroup: String,
    pub imds_connects: u64,
    /// Names the pod and its service account from its UID.
    pub find_command: String,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Joined {
    pub pods: Vec<PodJoin>,
    pub fixes: Vec<Fix>,
    #[serde(rename = "usingNodeRole")]
    pub using_node_role: Vec<NodeRoleUser>,
}

const NOT_FOUND: &str = "ResourceNotFoundException";

pub fn join(
    pods: &[PodStats],
    associations: &[Association],
    cluster: &str,
    region: Option<&str>,
) -> Joined {
    let mut by_account: BTreeMap<(&str, &str), Vec<&Association>> = BTreeMap::new();
    for a in associations {
        by_account
            .entry((a.namespace.as_str(), a.service_account.as_str()))
            .or_default()
            .push(a);
    }
    // Roles in the account the cluster's associations already use, for the fix's placeholder.
    let account = associations
        .iter()
        .find_map(|a| crate::upstream::account_from_arn(&a.role_arn))
        .unwrap_or("ACCOUNT_ID");
    let mut rows = Vec::new();
    let mut fixes: BTreeMap<(String, String), Fix> = BTreeMap::new();
    let mut using_node_role = Vec::new();
    for p in pods {
        let matching = by_account
            .get(&(p.namespace.as_str(), p.service_account.as_str()))
            .cloned()
            .unwrap_or_default();
        let (state, association, detail) = judge(p, &matching, associations);
        if state == JoinState::NoAssociation {
            let fix = fixes
                .entry((p.namespace.clone(), p.service_account.clone()))
                .or_insert_with(|| Fix {
                    namespace: p.namespace.clone(),
                    service_account: p.service_account.clone(),
                    command: fix_command(
                        cluster,
                        region,
                        &p.namespace,
                        &p.service_account,
                        account,
                    ),
                    using_node_role: false,
                });
            fix.using_node_role |= p.imds_connects > 0;
        }
        if state == JoinState::UsingNodeRole {
            using_node_role.push(NodeRoleUser {
                pod_uid: p.pod_uid.clone(),
                cgroup: p.cgroup.clone(),
                imds_connects: p.imds_connects,
                find_command: find_command(&p.pod_uid),
            });
        }
        rows.push(pod_row(p, state, association, detail));
    }
    rows.sort_by(|a, b| (&a.namespace, &a.pod).cmp(&(&b.namespace, &b.pod)));
    Joined {
        pods: rows,
        fixes: fixes.into_values().collect(),
        using_node_role,
    }
}

/// One pod's row: the association that serves it (or would), else what the agent knows.
fn pod_row(
    p: &PodStats,
    state: JoinState,
    association: Option<&Association>,
    detail: String,
) -> PodJoin {
    PodJoin {
        namespace: p.namespace.clone(),
        pod: if p.pod.is_empty() {
            format!("uid:{}", p.pod_uid)
        } else {
            p.pod.clone()
        },
        service_account: p.service_account.clone(),
        state,
        association_id: association
            .map(|a| a.association_id.clone())
            .or_else(|| (state == JoinState::AssociationGone).then(|| p.association_id.clone())),
        role_arn: association
            .map(|a| a.role_arn.clone())
            .or_else(|| (!p.role_arn.is_empty()).then(|| p.role_arn.clone())),
        session: association.map(Association::session_scope).or(p.session),
        detail,
        imds_connects: p.imds_connects,
    }
}

/// Names a pod, its namespace and service account from its UID.
fn find_command(uid: &str) -> String {
    format!(
        "kubectl get pods -A --no-headers -o custom-columns=NAMESPACE:.metadata.namespace,POD:.metadata.name,SERVICE-ACCOUNT:.spec.serviceAccountName,UID:.metadata.uid | grep {uid}"
    )
}

/// What a pod's statistics and the cluster's associations say of it: its state, the
/// association that serves it (or would), and a sentence for the operator.
fn judge<'a>(
    p: &PodStats,
    matching: &[&'a Association],
    associations: &'a [Association],
) -> (JoinState, Option<&'a Association>, String) {
    let last_code = p.last_error.as_ref().map(|e| e.code.as_str());
    let served_by = (!p.association_id.is_empty()).then(|| {
        associations
            .iter()
            .find(|a| a.association_id == p.association_id)
    });
    match (served_by, last_code) {
        (_, Some(NOT_FOUND)) if matching.is_empty() => (
            JoinState::NoAssociation,
            None,
            format!(
                "EKS Auth found no association for service account {}/{}",
                p.namespace, p.service_account
            ),
        ),
        (_, Some(NOT_FOUND)) => (
            JoinState::AssociationNew,
            matching.first().copied(),
            "the pod's last request found no association, but one exists now: its next request gets credentials".to_owned(),
        ),
        (Some(Some(a)), _) => {
            (JoinState::Served, Some(a), format!("served under association {}", a.association_id))
        }
        (Some(None), _) => (
            JoinState::AssociationGone,
            None,
            format!(
                "served under association {}, which no longer exists: the pod loses access when its credentials are next refreshed",
                p.association_id
            ),
        ),
        (None, Some(code)) => {
            (JoinState::Failing, matching.first().copied(), format!("last request refused: {code}"))
        }
        (None, None) if p.imds_connects > 0 && matching.is_empty() => (
            JoinState::UsingNodeRole,
            None,
            format!(
                "connected to IMDS {} times and asked for no credentials: it is using the node role",
                p.imds_connects
            ),
        ),
        (None, None) => {
            (JoinState::Unknown, matching.first().copied(), "no credentials served yet".to_owned())
        }
    }
}

fn fix_command(
    cluster: &str,
    region: Option<&str>,
    namespace: &str,
    service_account: &str,
    account: &str,
) -> String {
    let region = region.map(|r| format!(" --region {r}")).unwrap_or_default();
    format!(
        "aws eks create-pod-identity-association --cluster-name {cluster}{region} --namespace {namespace} --service-account {service_account} --role-arn arn:aws:iam::{account}:role/ROLE_NAME"
    )
}

/// A session's scope in a table cell.
fn session_cell(scope: Option<SessionScope>) -> &'static str {
    match scope {
        None => "-",
        Some(SessionScope { tags: true, .. }) => "tags",
        Some(SessionScope {
            tags: false,
            policy: false,
        }) => "no tags",
        Some(SessionScope {
            tags: false,
            policy: true,
        }) => "policy, no tags",
    }
}

fn render_join(joined: &Joined) -> String {
    let rows: Vec<[String; 7]> = joined
        .pods
        .iter()
        .map(|p| {
            [
                or_dash(&p.namespace),
                p.pod.clone(),
                or_dash(&p.service_account),
                p.state.label().to_owned(),
                or_dash(p.association_id.as_deref().unwrap_or_default()),
                or_dash(p.role_arn.as_deref().unwrap_or_default()),
                session_cell(p.session).to_owned(),
            ]
        })
        .collect();
    let mut out = table(
        [
            "NAMESPACE",
            "POD",
            "SERVICE-ACCOUNT",
            "STATE",
            "ASSOCIATION",
            "ROLE-ARN",
            "SESSION",
        ],
        &rows,
    );
    if rows.is_empty() {
        out.push_str("(the node has no pods that asked for credentials)\n");
    }
    for fix in &joined.fixes {
        out.push_str(&format!(
            "\nno association for service account {}/{}; create one (choose the role):\n  {}\n",
            super::printable(&fix.namespace),
            super::printable(&fix.service_account),
            super::printable(&fix.command)
        ));
        if fix.using_node_role {
            out.push_str("  this pod is using the node role: it connects to IMDS\n");
        }
    }
    for user in &joined.using_node_role {
        out.push_str(&format!(
            "\npod uid {} (cgroup {}) connected to IMDS {} times and asked for no credentials: this pod is using the node role. Find it, then create an association for its service account:\n  {}\n",
            super::printable(&user.pod_uid),
            super::printable(&user.cgroup),
            user.imds_connects,
            super::printable(&user.find_command)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::LastError;

    fn assoc(id: &str, ns: &str, sa: &str) -> Association {
        Association {
            association_id: id.into(),
            namespace: ns.into(),
            service_account: sa.into(),
            role_arn: "arn:aws:iam::123456789012:role/app".into(),
            ..Default::default()
        }
    }

    fn pod(ns: &str, name: &str, sa: &str, association: &str, last: Option<&str>) -> PodStats {
        PodStats {
            pod_uid: format!("uid-{name}"),
            namespace: ns.into(),
            pod: name.into(),
            service_account: sa.into(),
            association_id: association.into(),
            last_error: last.map(|code| LastError {
                status: 404,
                code: code.into(),
                age_seconds: 1.0,
            }),
            ..Default::default()
        }
    }

    /// `associations ...` as the command line gives it (without the binary's name).
    fn parse(argv: &[&str]) -> Result<AssociationsArgs, clap::Error> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: AssociationsArgs,
        }
        <Cli as clap::Parser>::try_parse_from(
            std::iter::once("associations").chain(argv.iter().copied()),
        )
        .map(|cli| cli.args)
    }

    #[test]
    fn cluster_flags_go_before_or_after_the_action() {
        let create = [
            "create",
            "--namespace",
            "ns",
            "--service-account",
            "sa",
            "--role-arn",
            "arn:aws:iam::1:role/r",
        ];
        let cluster = ["--cluster-name", "prod"];
        for argv in [
            [&cluster[..], &create[..]].concat(),
            [&create[..], &cluster[..]].concat(),
        ] {
            let a = parse(&argv).unwrap();
            assert_eq!(a.cluster.cluster_name.as_deref(), Some("prod"), "{argv:?}");
            assert!(matches!(a.action, Some(Action::Create(ref c)) if c.namespace == "ns"));
        }
        let a = parse(&["--namespace", "ns", "--json", "--cluster-name", "prod"]).unwrap();
        assert!(a.action.is_none() && a.json && a.namespace.as_deref() == Some("ns"));
        // Listing flags do not mix with an action.
        let a = parse(&["--json", "delete", "a-1"]).unwrap();
        assert!(
            a.check()
                .unwrap_err()
                .to_string()
                .contains("are for listing")
        );
    }

    #[test]
    fn join_names_each_pods_state_and_one_fix_per_service_account() {
        let associations = [
            assoc("a-1", "payments", "api"),
            assoc("a-3", "batch", "late"),
        ];
        let pods = [
            pod("payments", "api-0", "api", "a-1", None),
            pod("search", "idx-0", "indexer", "", Some(NOT_FOUND)),
            pod("search", "idx-1", "indexer", "", Some(NOT_FOUND)),
            pod("web", "old-0", "old", "a-2", None),
            pod("batch", "job-0", "late", "", Some(NOT_FOUND)),
            pod("web", "bad-0", "web", "", Some("token_pod_mismatch")),
        ];
        let j = join(&pods, &associations, "prod", Some("eu-west-1"));
        let state = |name: &str| j.pods.iter().find(|p| p.pod == name).unwrap().state;
        assert_eq!(state("api-0"), JoinState::Served);
        assert_eq!(state("idx-0"), JoinState::NoAssociation);
        assert_eq!(state("old-0"), JoinState::AssociationGone);
        assert_eq!(state("job-0"), JoinState::AssociationNew);
        assert_eq!(state("bad-0"), JoinState::Failing);
        assert_eq!(
            j.fixes.len(),
            1,
            "one fix per service account: {:?}",
            j.fixes
        );
        assert_eq!(
            j.fixes[0].command,
            "aws eks create-pod-identity-association --cluster-name prod --region eu-west-1 --namespace search --service-account indexer --role-arn arn:aws:iam::123456789012:role/ROLE_NAME"
        );
        let text = render_join(&j);
        assert!(
            text.contains("no association for service account search/indexer"),
            "{text}"
        );
    }

    #[test]
    fn pods_reaching_imds_without_an_association_are_using_the_node_role() {
        let associations = [assoc("a-1", "payments", "api")];
        let mut nameless = pod("", "", "", "", None);
        nameless.pod_uid = "0f1e".into();
        nameless.cgroup = "/kubepods/besteffort/pod0f1e/c1".into();
        nameless.imds_connects = 7;
        let mut refused = pod("search", "idx-0", "indexer", "", Some(NOT_FOUND));
        refused.imds_connects = 2;
        let mut served = pod("payments", "api-0", "api", "a-1", None);
        served.imds_connects = 1;
        let j = join(&[nameless, refused, served], &associations, "prod", None);
        let state = |pod: &str| j.pods.iter().find(|p| p.pod == pod).unwrap().state;
        assert_eq!(state("uid:0f1e"), JoinState::UsingNodeRole);
        assert_eq!(state("idx-0"), JoinState::NoAssociation);
        assert_eq!(state("api-0"), JoinState::Served);
        assert_eq!(j.using_node_role.len(), 1);
        assert!(j.using_node_role[0].find_command.ends_with("| grep 0f1e"));
        assert!(j.fixes[0].using_node_role);
        let text = render_join(&j);
        assert!(text.contains("this pod is using the node role"), "{text}");
        assert!(
            text.contains(
                "pod uid 0f1e (cgroup /kubepods/besteffort/pod0f1e/c1) connected to IMDS 7 times"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_pods_session_comes_from_its_association_else_from_the_agent() {
        let mut scoped = assoc("a-1", "payments", "api");
        scoped.disable_session_tags = true;
        scoped.policy = Some("{}".into());
        let on_eks = pod("payments", "api-0", "api", "a-1", None);
        // In sts mode no EKS association serves the pod: the agent's record says.
        let mut on_sts = pod("batch", "report-0", "report", "", None);
        on_sts.session = Some(SessionScope {
            tags: false,
            policy: false,
        });
        let unknown = pod("web", "web-0", "web", "", None);
        let j = join(&[on_eks, on_sts, unknown], &[scoped], "prod", None);
        let session = |pod: &str| j.pods.iter().find(|p| p.pod == pod).unwrap().session;
        assert_eq!(
            session("api-0"),
            Some(SessionScope {
                tags: false,
                policy: true
            })
        );
        assert_eq!(
            session("report-0"),
            Some(SessionScope {
                tags: false,
                policy: false
            })
        );
        assert_eq!(session("web-0"), None);
        let text = render_join(&j);
        let line = |pod: &str| text.lines().find(|l| l.contains(pod)).unwrap().to_owned();
        let session = |pod: &str| line(pod).rsplit("  ").next().unwrap().trim().to_owned();
        assert_eq!(session("api-0"), "policy, no tags", "{text}");
        assert_eq!(session("report-0"), "no tags", "{text}");
        assert_eq!(session("web-0"), "-", "{text}");
    }
}
