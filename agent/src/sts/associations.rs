//! The associations of `--credential-source sts`: which role each service account gets, from a
//! YAML file (a ConfigMap in the manifests), re-read when it changes.
//!
//! ```yaml
//! associations:
//!   - namespace: payments
//!     serviceAccount: api
//!     roleArn: arn:aws:iam::111122223333:role/payments-api
//!     targetRoleArn: arn:aws:iam::444455556666:role/payments-reader   # optional second hop
//!     tags: {team: payments}                                         # optional session tags
//! ```
//!
//! A ConfigMap volume is updated by swapping a symlink, so the file is watched by what the path
//! resolves to (inode, size, modification time), checked at most once a second, on lookups. An
//! edit that does not parse is logged and the previous associations stay in force.

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

/// One service account's role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Association {
    /// `namespace/serviceAccount`: the association's id in logs and statistics.
    pub id: String,
    pub role_arn: String,
    /// A second role, assumed with the first one's credentials (cross-account access).
    pub target_role_arn: Option<String>,
    /// Session tags of the association's own, besides the EKS ones.
    pub tags: Vec<(String, String)>,
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
    #[serde(default)]
    tags: BTreeMap<String, String>,
}

type Table = HashMap<(String, String), Arc<Association>>;

/// Parses and checks an associations file's text.
fn parse(text: &str) -> anyhow::Result<Table> {
    let file: File = serde_yaml_ng::from_str(text)
        .context("not an associations file (a list under `associations:` of namespace, serviceAccount, roleArn, targetRoleArn, tags)")?;
    let mut table = Table::new();
    for (i, e) in file.associations.into_iter().enumerate() {
        let at = format!(
            "association {} ({}/{})",
            i + 1,
            e.namespace,
            e.service_account
        );
        if e.namespace.is_empty() || e.service_account.is_empty() {
            bail!("{at}: namespace and serviceAccount must not be empty");
        }
        check_role_arn(&e.role_arn).with_context(|| format!("{at}: roleArn"))?;
        if let Some(target) = &e.target_role_arn {
            check_role_arn(target).with_context(|| format!("{at}: targetRoleArn"))?;
        }
        check_tags(&e.tags).with_context(|| format!("{at}: tags"))?;
        if e.tags.len() + EKS_TAG_KEYS.len() > MAX_SESSION_TAGS {
            bail!(
                "{at}: at most {} tags of its own (STS takes {MAX_SESSION_TAGS} per session, {} are the EKS ones)",
                MAX_SESSION_TAGS - EKS_TAG_KEYS.len(),
                EKS_TAG_KEYS.len()
            );
        }
        let id = format!("{}/{}", e.namespace, e.service_account);
        let association = Association {
            id,
            role_arn: e.role_arn,
            target_role_arn: e.target_role_arn,
            tags: e.tags.into_iter().collect(),
        };
        if table
            .insert((e.namespace, e.service_account), Arc::new(association))
            .is_some()
        {
            bail!("{at}: the service account has two associations");
        }
    }
    Ok(table)
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
    pub fn load(path: &Path) -> anyhow::Result<Associations> {
        let (table, stamp) =
            read(path).with_context(|| format!("--associations-file {}", path.display()))?;
        tracing::info!(file = %path.display(), associations = table.len(), "associations loaded");
        Ok(Associations {
            path: path.to_owned(),
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
                Ok(now) if now != state.stamp => match read(&self.path) {
                    Ok((table, stamp)) => {
                        tracing::info!(file = %self.path.display(), associations = table.len(), "associations reloaded");
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

fn read(path: &Path) -> anyhow::Result<(Table, FileStamp)> {
    // The stamp first: an update between the two reads is seen at the next check.
    let stamp = FileStamp::of(path)?;
    let text = std::fs::read_to_string(path)?;
    Ok((parse(&text)?, stamp))
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
        let t = parse(GOOD).unwrap();
        let a = &t[&("payments".to_owned(), "api".to_owned())];
        assert_eq!(a.id, "payments/api");
        assert_eq!(
            a.target_role_arn.as_deref(),
            Some("arn:aws:iam::444455556666:role/reader")
        );
        assert_eq!(a.tags, vec![("team".to_owned(), "payments".to_owned())]);
        assert!(
            t[&("web".to_owned(), "default".to_owned())]
                .target_role_arn
                .is_none()
        );
        assert!(parse("associations: []").unwrap().is_empty());
    }

    #[test]
    fn mistakes_are_named() {
        let err = |text: &str| format!("{:#}", parse(text).unwrap_err());
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
            parse(&tagged(
                "{team: payments, cost-center: 'a b/c=d+e@f.g:h_i'}"
            ))
            .is_ok()
        );
        assert!(err(&tagged("{'aws:team': x}")).contains("aws: prefix is reserved"));
        assert!(err(&tagged("{Team: x, team: y}")).contains("ignoring case"));
        assert!(err(&tagged("{team: 'a;b'}")).contains("letters, digits, spaces"));
        assert!(err(&tagged("{'': x}")).contains("1 to 128 characters"));
        let twice = "associations:\n  - {namespace: a, serviceAccount: b, roleArn: 'arn:aws:iam::111122223333:role/x'}\n  - {namespace: a, serviceAccount: b, roleArn: 'arn:aws:iam::111122223333:role/y'}\n";
        assert!(err(twice).contains("two associations"));
    }

    #[test]
    fn an_edit_is_picked_up_and_a_broken_one_is_not() {
        let dir = std::env::temp_dir().join(format!("pia-assoc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("associations.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let a = Associations::load(&path).unwrap();
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
