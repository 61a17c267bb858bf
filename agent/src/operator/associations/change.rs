//! `associations create`, `update` and `delete`: the steps of setting Pod Identity up, with the
//! fields EKS has now (a session policy, session tags off, a target role and its external ID).
//! EKS enforces its own rules and its refusals are passed on whole; what is checked here is only
//! what a person can get wrong before EKS sees it (a policy file that is not a JSON policy, an
//! empty ARN that EKS would read as "remove").

use anyhow::{Context as _, bail};
use clap::Args;

use super::{super::eks::AssociationChange, read_input};
use crate::operator::eks::{Association, Eks, NewAssociation};

#[derive(Args, Debug)]
pub struct CreateArgs {
    #[arg(long)]
    pub namespace: String,
    #[arg(long)]
    pub service_account: String,
    /// The IAM role the pods get.
    #[arg(long, value_parser = non_empty)]
    pub role_arn: String,
    /// A role in another account, assumed from `--role-arn` (cross-account access). EKS gives
    /// the association an external ID that the target role's trust policy must require.
    #[arg(long, value_parser = non_empty)]
    pub target_role_arn: Option<String>,
    /// A session policy that scopes the pods' sessions down (JSON, at most 2,048 characters
    /// once compacted), from a file or `-` for standard input. Needs --disable-session-tags.
    #[arg(long, value_name = "FILE|-")]
    pub policy: Option<String>,
    /// Leave out the six session tags EKS sets (cluster, namespace, service account, pod).
    #[arg(long)]
    pub disable_session_tags: bool,
    /// A tag on the association (an AWS resource tag, not a session tag); repeatable.
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
    pub tags: Vec<(String, String)>,
}

#[derive(Args, Debug)]
pub struct UpdateArgs {
    /// The association ID (`a-...`).
    pub id: String,
    /// A new role for the pods.
    #[arg(long, value_parser = non_empty)]
    pub role_arn: Option<String>,
    /// A new target role (EKS gives it a new external ID).
    #[arg(long, conflicts_with = "no_target_role", value_parser = non_empty)]
    pub target_role_arn: Option<String>,
    /// Remove the target role (sent as an empty target role ARN, as EKS's API takes it).
    #[arg(long)]
    pub no_target_role: bool,
    /// A new session policy, from a file or `-`. Needs session tags off.
    #[arg(long, value_name = "FILE|-", conflicts_with = "no_policy")]
    pub policy: Option<String>,
    /// Remove the session policy (sent as an empty policy).
    #[arg(long)]
    pub no_policy: bool,
    /// Turn EKS's session tags off.
    #[arg(long, conflicts_with = "enable_session_tags")]
    pub disable_session_tags: bool,
    /// Turn EKS's session tags back on (the association must have no policy).
    #[arg(long)]
    pub enable_session_tags: bool,
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// A policy document as EKS takes it: the file's JSON, compacted, so that indentation does not
/// count against EKS's 2,048 characters.
fn read_policy(source: &str) -> anyhow::Result<String> {
    let text = read_input(source, "the session policy")?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("--policy {source}: not a JSON policy document"))?;
    crate::sts::associations::compact_policy(&json).with_context(|| format!("--policy {source}"))
}

/// An ARN flag's value: an empty one would tell EKS to remove the field (see `--no-...`).
fn non_empty(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        Err("must not be empty (--no-target-role removes a target role)".to_owned())
    } else {
        Ok(s.to_owned())
    }
}

pub async fn create(eks: &Eks, args: &CreateArgs) -> anyhow::Result<()> {
    let new = NewAssociation {
        namespace: args.namespace.clone(),
        service_account: args.service_account.clone(),
        role_arn: args.role_arn.clone(),
        target_role_arn: args.target_role_arn.clone(),
        disable_session_tags: args.disable_session_tags,
        policy: args.policy.as_deref().map(read_policy).transpose()?,
        tags: args.tags.iter().cloned().collect(),
    };
    let created = eks.create(&new).await.with_context(|| {
        format!(
            "creating the association for {}/{} in cluster {}",
            args.namespace, args.service_account, eks.cluster
        )
    })?;
    // The ID alone on standard output, for scripts; the sentences for people on standard error.
    eprint!("{}", describe("created", &eks.cluster, &created));
    println!("{}", created.association_id);
    Ok(())
}

pub async fn update(eks: &Eks, args: &UpdateArgs) -> anyhow::Result<()> {
    let change = AssociationChange {
        role_arn: args.role_arn.clone(),
        target_role_arn: if args.no_target_role {
            Some(String::new())
        } else {
            args.target_role_arn.clone()
        },
        disable_session_tags: match (args.disable_session_tags, args.enable_session_tags) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
        policy: if args.no_policy {
            Some(String::new())
        } else {
            args.policy.as_deref().map(read_policy).transpose()?
        },
    };
    if change.role_arn.is_none()
        && change.target_role_arn.is_none()
        && change.disable_session_tags.is_none()
        && change.policy.is_none()
    {
        bail!(
            "nothing to change: give --role-arn, --target-role-arn/--no-target-role, --policy/--no-policy or --disable-session-tags/--enable-session-tags"
        );
    }
    let updated = eks.update(&args.id, &change).await.with_context(|| {
        format!(
            "updating association {} in cluster {}",
            args.id, eks.cluster
        )
    })?;
    print!("{}", describe("updated", &eks.cluster, &updated));
    Ok(())
}

pub async fn delete(eks: &Eks, id: &str) -> anyhow::Result<()> {
    let deleted = eks
        .delete(id)
        .await
        .with_context(|| format!("deleting association {id} in cluster {}", eks.cluster))?;
    let printable = |s: &str| crate::operator::printable(s).into_owned();
    println!(
        "deleted association {} in cluster {} ({}/{} -> {})",
        printable(&deleted.association_id),
        eks.cluster,
        printable(&deleted.namespace),
        printable(&deleted.service_account),
        printable(&deleted.role_arn)
    );
    Ok(())
}

/// What an association now does, in sentences: its roles, its session's tags and policy, and
/// for a target role the trust-policy statement that role needs.
fn describe(verb: &str, cluster: &str, a: &Association) -> String {
    let printable = |s: &str| crate::operator::printable(s).into_owned();
    let roles = match &a.target_role_arn {
        Some(target) => format!("{}, then {}", a.role_arn, target),
        None => a.role_arn.clone(),
    };
    let mut out = format!(
        "{verb} association {} in cluster {cluster}: pods of {}/{} get {}\n",
        a.association_id,
        printable(&a.namespace),
        printable(&a.service_account),
        printable(&roles)
    );
    out.push_str(&format!("  session: {}\n", session_words(a)));
    if let Some(policy) = &a.policy {
        out.push_str(&format!("  session policy: {}\n", printable(policy)));
    }
    if let (Some(target), Some(external_id)) = (&a.target_role_arn, &a.external_id) {
        out.push_str(&format!(
            "  the target role {} must trust {} with this statement in its trust policy:\n{}\n",
            printable(target),
            printable(&a.role_arn),
            trust_statement(a, external_id)
        ));
    }
    out
}

/// "EKS session tags on" / "session tags off" / "session tags off, scoped by a session policy".
pub fn session_words(a: &Association) -> &'static str {
    match (a.disable_session_tags, a.policy.is_some()) {
        (false, _) => "EKS session tags on",
        (true, false) => "session tags off",
        (true, true) => "session tags off, scoped by a session policy",
    }
}

/// The statement a target role's trust policy needs: the first role may assume it (and tag the
/// session, when tags are on) only with the association's external ID.
fn trust_statement(a: &Association, external_id: &str) -> String {
    let actions: &[&str] = if a.disable_session_tags {
        &["sts:AssumeRole"]
    } else {
        &["sts:AssumeRole", "sts:TagSession"]
    };
    let statement = serde_json::json!({
        "Effect": "Allow",
        "Principal": {"AWS": a.role_arn},
        "Action": actions,
        "Condition": {"StringEquals": {"sts:ExternalId": external_id}},
    });
    serde_json::to_string_pretty(&statement).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_parse_as_key_value() {
        assert_eq!(
            parse_tag("team=payments"),
            Ok(("team".into(), "payments".into()))
        );
        assert_eq!(parse_tag("k="), Ok(("k".into(), String::new())));
        assert!(parse_tag("novalue").is_err());
        assert!(parse_tag("=v").is_err());
    }

    #[test]
    fn a_target_role_gets_its_trust_statement_with_the_external_id() {
        let a = Association {
            association_id: "a-1".into(),
            namespace: "payments".into(),
            service_account: "api".into(),
            role_arn: "arn:aws:iam::111122223333:role/first".into(),
            target_role_arn: Some("arn:aws:iam::444455556666:role/target".into()),
            external_id: Some("ext-1".into()),
            ..Default::default()
        };
        let text = describe("created", "prod", &a);
        assert!(
            text.contains("must trust arn:aws:iam::111122223333:role/first"),
            "{text}"
        );
        assert!(text.contains(r#""sts:ExternalId": "ext-1""#), "{text}");
        assert!(text.contains("sts:TagSession"), "tags on: {text}");
        let untagged = Association {
            disable_session_tags: true,
            policy: Some("{}".into()),
            ..a
        };
        let text = describe("updated", "prod", &untagged);
        assert!(!text.contains("sts:TagSession"), "tags off: {text}");
        assert!(text.contains("scoped by a session policy"), "{text}");
    }

    #[test]
    fn a_policy_file_is_compacted_and_must_be_json() {
        let dir = std::env::temp_dir().join(format!("pia-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.json");
        std::fs::write(
            &good,
            "{\n  \"Version\": \"2012-10-17\",\n  \"Statement\": []\n}\n",
        )
        .unwrap();
        assert_eq!(
            read_policy(good.to_str().unwrap()).unwrap(),
            r#"{"Statement":[],"Version":"2012-10-17"}"#
        );
        let bad = dir.join("bad.json");
        std::fs::write(&bad, "Version: 2012").unwrap();
        let err = format!("{:#}", read_policy(bad.to_str().unwrap()).unwrap_err());
        assert!(err.contains("not a JSON policy document"), "{err}");
        std::fs::write(&bad, "[42]").unwrap();
        let err = format!("{:#}", read_policy(bad.to_str().unwrap()).unwrap_err());
        assert!(err.contains("a JSON object with a Statement"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
