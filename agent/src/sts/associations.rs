//! The associations of `--credential-source sts`: which role each service account gets, from a
//! YAML file (a ConfigMap in the manifests), re-read when it changes.
//!
//! ```yaml
//! associations:
//!   - namespace: payments
//!     serviceAccount: api
//!     roleArn: arn:aws:iam::111122223333:role/payments-api
//!     targetRoleArn: arn:aws:iam::444455556666:role/payments-reader   # optional second hop
//!     externalId: payments-api-reader       # optional; derived when a target role has none
//!     tags: {team: payments}                                         # optional session tags
//!   - namespace: batch
//!     serviceAccount: report
//!     roleArn: arn:aws:iam::111122223333:role/shared-reader
//!     disableSessionTags: true              # none of EKS's six session tags
//!     policy:                               # a session policy; needs disableSessionTags
//!       Version: "2012-10-17"
//!       Statement: [{Effect: Allow, Action: "s3:GetObject", Resource: "*"}]
//! ```
//!
//! The fields and rules are EKS's (`CreatePodIdentityAssociation`): a policy is at most 2,048
//! characters of JSON (written as YAML, or as a JSON string) and needs session tags disabled; an
//! external ID is what the chained hop into the target role passes as `sts:ExternalId`.
//!
//! A ConfigMap volume is updated by swapping a symlink, so the file is watched by what the path
//! resolves to (inode, size, modification time), checked at most once a second, on lookups. An
//! edit that does not parse or breaks a rule is logged and the previous associations stay in
//! force.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Deserialize;

use crate::file_stamp::FileStamp;

/// Tag keys the agent sets itself on every session, as EKS Pod Identity does.
pub const EKS_TAG_KEYS: [&str; 6] = [
    "eks-cluster-arn",
    "eks-cluster-name",
    "kubernetes-namespace",
    "kubernetes-service-account",
    "kubernetes-pod-name",
    "kubernetes-pod-uid",
];

/// STS accepts at most 50 session tags per call.
const MAX_SESSION_TAGS: usize = 50;

/// How often, at most, the file is looked at for changes.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// STS's limit on an inline session policy, and EKS's on an association's `policy`.
pub const MAX_POLICY_CHARS: usize = 2048;

/// One service account's role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Association {
    /// `namespace/serviceAccount`: the association's id in logs and statistics.
    pub id: String,
    pub role_arn: String,
    /// A second role, assumed with the first one's credentials (cross-account access).
    pub target: Option<Target>,
    /// What the session carries: EKS's tags, or no tags and perhaps a policy.
    pub session: Session,
}

/// The second hop of a chained association.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub role_arn: String,
    /// Passed as `ExternalId` on the hop into the target role, whose trust policy names it.
    pub external_id: ExternalId,
}

/// `sts:ExternalId` for a target role: the entry's own, or one derived from the cluster and the
/// service account, stable across restarts and edits, as EKS generates one per association.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalId {
    pub value: String,
    /// Derived by the agent, not written in the file: logged at load so the target role's trust
    /// policy can name it.
    pub derived: bool,
}

/// The session's tags and scope. A policy needs session tags off (EKS's rule), so the two
/// cannot be asked for together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Session {
    /// EKS's six session tags (transitive), then the association's own.
    Tagged { own: Vec<(String, String)> },
    /// `disableSessionTags: true`: no tags; the session is scoped down by `policy` if given.
    Untagged { policy: Option<String> },
}

impl Session {
    pub fn tags_on(&self) -> bool {
        matches!(self, Session::Tagged { .. })
    }

    pub fn policy(&self) -> Option<&str> {
        match self {
            Session::Untagged { policy } => policy.as_deref(),
            Session::Tagged { .. } => None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    associations: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Entry {
    namespace: String,
    service_account: String,
    role_arn: String,
    target_role_arn: Option<String>,
    external_id: Option<String>,
    #[serde(default)]
    disable_session_tags: bool,
    /// YAML (a mapping) or a JSON string.
    policy: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    tags: BTreeMap<String, String>,
}

type Table = HashMap<(String, String), Arc<Association>>;

/// Parses and checks an associations file's text; `cluster` names the cluster in derived
/// external IDs.
fn parse(text: &str, cluster: &str) -> anyhow::Result<Table> {
    let file: File = serde_yaml_ng::from_str(text)
        .context("not an associations file (a list under `associations:` of namespace, serviceAccount, roleArn, targetRoleArn, externalId, disableSessionTags, policy, tags)")?;
    let mut table = Table::new();
    for (i, e) in file.associations.into_iter().enumerate() {
        let at = format!(
            "association {} ({}/{})",
            i + 1,
            e.namespace,
            e.service_account
        );
        let key = (e.namespace.clone(), e.service_account.clone());
        let association = entry(e, cluster).with_context(|| at.clone())?;
        if table.insert(key, Arc::new(association)).is_some() {
            bail!("{at}: the service account has two associations");
        }
    }
    check_external_ids_apart(&table)?;
    Ok(table)
}

/// Two associations that chain into the same target role with the same external ID could each
/// be handed the other's role: the external ID is what tells them apart (EKS generates one per
/// association, so it cannot happen there).
fn check_external_ids_apart(table: &Table) -> anyhow::Result<()> {
    let mut seen: HashMap<(&str, &str), &str> = HashMap::new();
    let mut chained: Vec<&Association> = table.values().map(Arc::as_ref).collect();
    chained.sort_by(|a, b| a.id.cmp(&b.id));
    for a in chained {
        let Some(t) = &a.target else { continue };
        if let Some(other) = seen.insert((&t.role_arn, &t.external_id.value), &a.id) {
            bail!(
                "associations {other} and {} chain into {} with the same externalId {:?}: give each its own",
                a.id,
                t.role_arn,
                t.external_id.value
            );
        }
    }
    Ok(())
}

/// One entry, checked by EKS's rules.
fn entry(e: Entry, cluster: &str) -> anyhow::Result<Association> {
    if e.namespace.is_empty() || e.service_account.is_empty() {
        bail!("namespace and serviceAccount must not be empty");
    }
    check_role_arn(&e.role_arn).context("roleArn")?;
    let target = match (e.target_role_arn, e.external_id) {
        (Some(role_arn), given) => {
            check_role_arn(&role_arn).context("targetRoleArn")?;
            let external_id = match given {
                Some(value) => {
                    check_external_id(&value).context("externalId")?;
                    ExternalId {
                        value,
                        derived: false,
                    }
                }
                None => ExternalId {
                    value: derive_external_id(cluster, &e.namespace, &e.service_account),
                    derived: true,
                },
            };
            Some(Target {
                role_arn,
                external_id,
            })
        }
        (None, Some(_)) => {
            bail!("externalId is passed to a target role: give targetRoleArn, or drop externalId")
        }
        (None, None) => None,
    };
    let session = if e.disable_session_tags {
        if !e.tags.is_empty() {
            bail!("tags are session tags, and disableSessionTags turns them off: drop one");
        }
        let policy = e
            .policy
            .as_ref()
            .map(policy_json)
            .transpose()
            .context("policy")?;
        Session::Untagged { policy }
    } else {
        if e.policy.is_some() {
            bail!(
                "a policy needs disableSessionTags: true (EKS's rule: session policies and session tags do not mix)"
            );
        }
        check_tags(&e.tags).context("tags")?;
        if e.tags.len() + EKS_TAG_KEYS.len() > MAX_SESSION_TAGS {
            bail!(
                "tags: at most {} of its own (STS takes {MAX_SESSION_TAGS} per session, {} are the EKS ones)",
                MAX_SESSION_TAGS - EKS_TAG_KEYS.len(),
                EKS_TAG_KEYS.len()
            );
        }
        Session::Tagged {
            own: e.tags.into_iter().collect(),
        }
    };
    Ok(Association {
        id: format!("{}/{}", e.namespace, e.service_account),
        role_arn: e.role_arn,
        target,
        session,
    })
}

/// A policy as the compact JSON STS takes: written as YAML, or as a JSON string. It must be a
/// JSON object with a `Statement`, and at most 2,048 characters.
fn policy_json(value: &serde_yaml_ng::Value) -> anyhow::Result<String> {
    let json: serde_json::Value = match value {
        serde_yaml_ng::Value::String(text) => {
            serde_json::from_str(text).context("not valid JSON")?
        }
        other => serde_json::to_value(other).context("not expressible as JSON")?,
    };
    let compact = compact_policy(&json)?;
    let chars = compact.chars().count();
    if chars > MAX_POLICY_CHARS {
        bail!("{chars} characters as compact JSON; STS and EKS take at most {MAX_POLICY_CHARS}");
    }
    Ok(compact)
}

/// A policy document as compact JSON (what STS and EKS count against 2,048 characters), if it is
/// one: a JSON object with a `Statement`. `associations --policy` checks files the same way.
pub fn compact_policy(json: &serde_json::Value) -> anyhow::Result<String> {
    if json.get("Statement").is_none() {
        bail!("not an IAM policy: a JSON object with a Statement");
    }
    Ok(serde_json::to_string(json)?)
}

/// STS's rule for `ExternalId`: 2 to 1,224 characters of letters, digits and `_+=,.@:/-`.
fn check_external_id(id: &str) -> anyhow::Result<()> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "_+=,.@:/-".contains(c);
    if !(2..=1224).contains(&id.len()) || !id.chars().all(allowed) {
        bail!("{id:?}: 2 to 1,224 characters of letters, digits and _+=,.@:/-");
    }
    Ok(())
}

/// `pia-` and 32 hex digits of SHA-256 over the cluster, namespace and service account: the same
/// on every node and across restarts, different for every service account, so one
/// association's chain cannot be replayed into another's target role.
pub fn derive_external_id(cluster: &str, namespace: &str, service_account: &str) -> String {
    use sha2::Digest as _;
    let mut hash = sha2::Sha256::new();
    for part in [
        "pod-identity-agent external id v1",
        cluster,
        namespace,
        service_account,
    ] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    let digest = hash.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("pia-{hex}")
}

/// STS's rules for session tags, checked here so that a mistake is named when the file is read
/// rather than refused by STS on every request: keys 1 to 128 characters and values at most 256
/// of letters, digits, spaces and `_.:/=+-@`; no `aws:` prefix; keys unique ignoring case; none
/// of the keys the agent sets itself.
fn check_tags(tags: &BTreeMap<String, String>) -> anyhow::Result<()> {
    let allowed = |s: &str| {
        s.chars()
            .all(|c| c.is_alphanumeric() || c.is_whitespace() || "_.:/=+-@".contains(c))
    };
    let mut seen = std::collections::HashSet::new();
    for (k, v) in tags {
        if EKS_TAG_KEYS.iter().any(|eks| eks.eq_ignore_ascii_case(k)) {
            bail!("{k:?} is a key the agent sets itself");
        }
        if k.is_empty() || k.chars().count() > 128 || v.chars().count() > 256 {
            bail!("{k:?}: keys are 1 to 128 characters, values at most 256");
        }
        if !allowed(k) || !allowed(v) {
            bail!("{k:?}: keys and values are letters, digits, spaces and _.:/=+-@");
        }
        if k.to_lowercase().starts_with("aws:") {
            bail!("{k:?}: the aws: prefix is reserved");
        }
        if !seen.insert(k.to_lowercase()) {
            bail!("{k:?}: STS compares tag keys ignoring case, and another key is the same");
        }
    }
    Ok(())
}

/// `arn:PARTITION:iam::ACCOUNT:role/NAME`.
fn check_role_arn(arn: &str) -> anyhow::Result<()> {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let ok = parts.len() == 6
        && parts[0] == "arn"
        && parts[1].starts_with("aws")
        && parts[2] == "iam"
        && parts[3].is_empty()
        && parts[4].len() == 12
        && parts[4].bytes().all(|b| b.is_ascii_digit())
        && parts[5]
            .strip_prefix("role/")
            .is_some_and(|name| !name.is_empty());
    if ok {
        Ok(())
    } else {
        bail!("{arn:?} is not an IAM role ARN (arn:aws:iam::123456789012:role/NAME)")
    }
}

/// The associations in force, re-read when the file changes.
pub struct Associations {
    path: PathBuf,
    /// Names the cluster in derived external IDs.
    cluster: String,
    state: Mutex<State>,
}

struct State {
    table: Arc<Table>,
    stamp: FileStamp,
    checked: Instant,
    /// Why the file cannot be read, while it cannot: logged when it starts, not every check.
    unreadable: Option<String>,
}

impl Associations {
    /// Reads the file; at start an unreadable or invalid file is an error.
    pub fn load(path: &Path, cluster: &str) -> anyhow::Result<Associations> {
        let (table, stamp) = read(path, cluster)
            .with_context(|| format!("--associations-file {}", path.display()))?;
        tracing::info!(file = %path.display(), associations = table.len(), "associations loaded");
        log_derived_external_ids(&table);
        Ok(Associations {
            path: path.to_owned(),
            cluster: cluster.to_owned(),
            state: Mutex::new(State {
                table: Arc::new(table),
                stamp,
                checked: Instant::now(),
                unreadable: None,
            }),
        })
    }

    /// The association of a service account, from the file as it is now.
    pub fn find(&self, namespace: &str, service_account: &str) -> Option<Arc<Association>> {
        let table = self.current();
        table
            .get(&(namespace.to_owned(), service_account.to_owned()))
            .cloned()
    }

    fn current(&self) -> Arc<Table> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.checked.elapsed() >= CHECK_INTERVAL {
            state.checked = Instant::now();
            match FileStamp::of(&self.path) {
                Ok(now) if now != state.stamp => match read(&self.path, &self.cluster) {
                    Ok((table, stamp)) => {
                        tracing::info!(file = %self.path.display(), associations = table.len(), "associations reloaded");
                        log_derived_external_ids(&table);
                        state.table = Arc::new(table);
                        state.stamp = stamp;
                    }
                    Err(e) => {
                        // Logged once per version of the file, not on every lookup.
                        state.stamp = now;
                        tracing::warn!(file = %self.path.display(), "associations file changed but is not valid; the previous associations stay in force: {e:#}");
                    }
                },
                Ok(_) => {}
                Err(e) => {
                    let e = e.to_string();
                    if state.unreadable.as_ref() != Some(&e) {
                        tracing::warn!(file = %self.path.display(), "cannot read the associations file; the previous associations stay in force: {e}");
                    }
                    state.unreadable = Some(e);
                    return state.table.clone();
                }
            }
            state.unreadable = None;
        }
        state.table.clone()
    }
}

fn read(path: &Path, cluster: &str) -> anyhow::Result<(Table, FileStamp)> {
    // The stamp first: an update between the two reads is seen at the next check.
    let stamp = FileStamp::of(path)?;
    let text = std::fs::read_to_string(path)?;
    Ok((parse(&text, cluster)?, stamp))
}

/// The associations a file holds, sorted by id, as the agent would read them for `cluster`:
/// for `doctor`, which reads the file the agent names.
pub fn read_file(path: &Path, cluster: &str) -> anyhow::Result<Vec<Arc<Association>>> {
    let (table, _) = read(path, cluster)?;
    let mut all: Vec<_> = table.into_values().collect();
    all.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(all)
}

/// The external IDs the agent made up, so that the target roles' trust policies can name them.
fn log_derived_external_ids(table: &Table) {
    let mut derived: Vec<_> = table
        .values()
        .filter_map(|a| Some((a, a.target.as_ref()?)))
        .filter(|(_, t)| t.external_id.derived)
        .collect();
    derived.sort_by(|a, b| a.0.id.cmp(&b.0.id));
    for (a, target) in derived {
        tracing::info!(
            association = %a.id,
            target_role = %target.role_arn,
            external_id = %target.external_id.value,
            "the target role is assumed with this sts:ExternalId (derived; set externalId to choose one): its trust policy must require it"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "associations:
  - namespace: payments
    serviceAccount: api
    roleArn: arn:aws:iam::111122223333:role/payments-api
    targetRoleArn: arn:aws:iam::444455556666:role/reader
    tags:
      team: payments
  - namespace: web
    serviceAccount: default
    roleArn: arn:aws-cn:iam::111122223333:role/web
";

    #[test]
    fn a_file_parses_into_associations() {
        let t = parse(GOOD, "prod").unwrap();
        let a = &t[&("payments".to_owned(), "api".to_owned())];
        assert_eq!(a.id, "payments/api");
        let target = a.target.as_ref().unwrap();
        assert_eq!(target.role_arn, "arn:aws:iam::444455556666:role/reader");
        assert_eq!(
            target.external_id,
            ExternalId {
                value: derive_external_id("prod", "payments", "api"),
                derived: true
            }
        );
        assert_eq!(
            a.session,
            Session::Tagged {
                own: vec![("team".to_owned(), "payments".to_owned())]
            }
        );
        assert!(
            t[&("web".to_owned(), "default".to_owned())]
                .target
                .is_none()
        );
        assert!(parse("associations: []", "prod").unwrap().is_empty());
    }

    #[test]
    fn mistakes_are_named() {
        let err = |text: &str| format!("{:#}", parse(text, "prod").unwrap_err());
        assert!(err("associations:\n  - namespace: a\n    serviceAccount: b\n    roleArn: arn:aws:iam::1:role/x\n").contains("not an IAM role ARN"));
        assert!(
            err("associations:\n  - namespace: a\n    serviceAccount: b\n    rolearn: x\n")
                .contains("not an associations file")
        );
        let eks_tag = "associations:\n  - namespace: a\n    serviceAccount: b\n    roleArn: arn:aws:iam::111122223333:role/x\n    tags: {kubernetes-namespace: other}\n";
        assert!(err(eks_tag).contains("a key the agent sets itself"));
        let tagged = |tags: &str| {
            format!(
                "associations:\n  - namespace: a\n    serviceAccount: b\n    roleArn: arn:aws:iam::111122223333:role/x\n    tags: {tags}\n"
            )
        };
        assert!(
            parse(
                &tagged("{team: payments, cost-center: 'a b/c=d+e@f.g:h_i'}"),
                "prod"
            )
            .is_ok()
        );
        assert!(err(&tagged("{'aws:team': x}")).contains("aws: prefix is reserved"));
        assert!(err(&tagged("{Team: x, team: y}")).contains("ignoring case"));
        assert!(err(&tagged("{team: 'a;b'}")).contains("letters, digits, spaces"));
        assert!(err(&tagged("{'': x}")).contains("1 to 128 characters"));
        let twice = "associations:\n  - {namespace: a, serviceAccount: b, roleArn: 'arn:aws:iam::111122223333:role/x'}\n  - {namespace: a, serviceAccount: b, roleArn: 'arn:aws:iam::111122223333:role/y'}\n";
        assert!(err(twice).contains("two associations"));
    }

    const BASE: &str = "associations:\n  - namespace: a\n    serviceAccount: b\n    roleArn: arn:aws:iam::111122223333:role/x\n";

    #[test]
    fn session_policies_need_tags_off_and_are_compact_json_within_the_limit() {
        let with = |extra: &str| parse(&format!("{BASE}{extra}"), "prod");
        let policy =
            |extra: &str| with(extra).map(|t| t.into_values().next().unwrap().session.clone());
        // As YAML and as a JSON string: the same compact JSON.
        let yaml = policy("    disableSessionTags: true\n    policy:\n      Version: '2012-10-17'\n      Statement: [{Effect: Allow, Action: 's3:GetObject', Resource: '*'}]\n").unwrap();
        let json = policy("    disableSessionTags: true\n    policy: '{\"Version\": \"2012-10-17\", \"Statement\": [{\"Effect\": \"Allow\", \"Action\": \"s3:GetObject\", \"Resource\": \"*\"}]}'\n").unwrap();
        assert_eq!(yaml, json);
        assert_eq!(
            yaml.policy(),
            Some(
                r#"{"Statement":[{"Action":"s3:GetObject","Effect":"Allow","Resource":"*"}],"Version":"2012-10-17"}"#
            )
        );
        assert!(!yaml.tags_on());
        assert_eq!(
            policy("    disableSessionTags: true\n").unwrap(),
            Session::Untagged { policy: None }
        );
        let err = |extra: &str| format!("{:#}", with(extra).unwrap_err());
        assert!(err("    policy: {Statement: []}\n").contains("needs disableSessionTags: true"));
        assert!(
            err("    disableSessionTags: true\n    policy: '{not json'\n")
                .contains("not valid JSON")
        );
        assert!(
            err("    disableSessionTags: true\n    policy: {Version: x}\n")
                .contains("with a Statement")
        );
        let long = format!(
            "    disableSessionTags: true\n    policy: {{Statement: [{{Effect: Allow, Action: '{}', Resource: '*'}}]}}\n",
            "s".repeat(2048)
        );
        assert!(err(&long).contains("at most 2048"));
        assert!(
            err("    disableSessionTags: true\n    tags: {team: a}\n")
                .contains("disableSessionTags turns them off")
        );
    }

    #[test]
    fn external_ids_are_given_or_derived_per_service_account_and_need_a_target() {
        let target = "    targetRoleArn: arn:aws:iam::444455556666:role/t\n";
        let given = parse(
            &format!("{BASE}{target}    externalId: team-a:reader\n"),
            "prod",
        )
        .unwrap();
        let t = given.values().next().unwrap().target.clone().unwrap();
        assert_eq!(t.external_id.value, "team-a:reader");
        assert!(!t.external_id.derived);
        let derived = derive_external_id("prod", "a", "b");
        assert!(
            derived.starts_with("pia-") && derived.len() == 36,
            "{derived}"
        );
        assert_eq!(derived, derive_external_id("prod", "a", "b"), "stable");
        assert_ne!(derived, derive_external_id("prod", "a", "c"));
        assert_ne!(derived, derive_external_id("staging", "a", "b"));
        // The separator keeps "ab"/"c" apart from "a"/"bc".
        assert_ne!(
            derive_external_id("p", "ab", "c"),
            derive_external_id("p", "a", "bc")
        );
        let err = |extra: &str| {
            format!(
                "{:#}",
                parse(&format!("{BASE}{extra}"), "prod").unwrap_err()
            )
        };
        assert!(err("    externalId: abc\n").contains("give targetRoleArn"));
        // Another service account claiming a/b's derived ID for the same target role.
        let impostor = format!(
            "{BASE}{target}  - namespace: c\n    serviceAccount: d\n    roleArn: arn:aws:iam::111122223333:role/y\n{target}    externalId: {derived}\n"
        );
        let e = format!("{:#}", parse(&impostor, "prod").unwrap_err());
        assert!(
            e.contains("associations a/b and c/d chain into") && e.contains("same externalId"),
            "{e}"
        );
        assert!(err(&format!("{target}    externalId: 'a b'\n")).contains("2 to 1,224 characters"));
        assert!(err(&format!("{target}    externalId: x\n")).contains("2 to 1,224 characters"));
    }

    #[test]
    fn the_sts_overlays_example_file_parses() {
        let shipped = include_str!("../../../deploy/kubernetes/overlays/sts/associations.yaml");
        let t = parse(shipped, "my-cluster").unwrap();
        let indexer = &t[&("search".to_owned(), "indexer".to_owned())];
        assert!(!indexer.session.tags_on() && indexer.session.policy().is_some());
    }

    #[test]
    fn an_edit_is_picked_up_and_a_broken_one_is_not() {
        let dir = std::env::temp_dir().join(format!("pia-assoc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("associations.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let a = Associations::load(&path, "prod").unwrap();
        assert!(a.find("payments", "api").is_some());
        assert!(a.find("payments", "worker").is_none());
        // As a ConfigMap volume does it: new content under a new name, renamed over the old.
        let swap = |text: &str| {
            let next = dir.join("next.yaml");
            std::fs::write(&next, text).unwrap();
            std::fs::rename(&next, &path).unwrap();
            a.state.lock().unwrap().checked -= CHECK_INTERVAL;
        };
        swap(
            "associations:\n  - {namespace: payments, serviceAccount: worker, roleArn: 'arn:aws:iam::111122223333:role/w'}\n",
        );
        assert!(a.find("payments", "worker").is_some());
        assert!(a.find("payments", "api").is_none());
        swap("associations: [broken");
        assert!(
            a.find("payments", "worker").is_some(),
            "a broken edit keeps what was in force"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
