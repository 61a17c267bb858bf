//! `--credential-source sts`: EKS Pod Identity's contract on clusters EKS Auth does not know.
//! What EKS Auth does is done here: the token is verified locally (`verify`), the service
//! account's association is looked up in a file (`associations`), and the role is assumed with
//! STS `AssumeRole`, signed with the node's credentials, with the session tags EKS sets (all
//! transitive; none with `disableSessionTags`) and EKS's session name. An association with a
//! target role chains a second `AssumeRole` into it, signed with the first role's credentials
//! and passing the association's `ExternalId`. A session policy scopes the pod's session: the
//! last hop's, as in EKS (with a target role, the first role is not scoped).

pub mod associations;

use std::{path::PathBuf, sync::Arc, time::SystemTime};

use aws_sdk_sts::operation::{RequestId as _, assume_role::AssumeRoleOutput};

use self::associations::{Association, Associations, Session};
use crate::{
    aws::{AwsOptions, EndpointRecorder, app_name},
    credentials::Credentials,
    issuer::{TokenCheck, Verifier},
    token::TokenClaims,
    upstream::{
        AssumedRole, Checked, NodeSigned, SessionScope, Upstream, UpstreamError, account_from_arn,
        map_sdk_error,
    },
};

const SERVICE: &str = "STS";
/// What an unreadable answer is named after.
const CALL: &str = "STS AssumeRole";

/// STS's longest session for a chained role, and the default for any: credentials are refreshed
/// ahead of expiry by the cache either way.
const SESSION_SECONDS: i32 = 3600;

/// What `--credential-source sts` needs.
#[derive(Clone, Debug)]
pub struct StsOptions {
    pub cluster_name: String,
    /// Tagged as `eks-cluster-arn` when given.
    pub cluster_arn: Option<String>,
    pub region: Option<String>,
    pub fips: bool,
    pub node_name: Option<String>,
    pub associations_file: PathBuf,
    /// The issuer's keys and what tokens must say: nothing upstream verifies tokens in sts mode.
    pub check: TokenCheck,
}

pub struct Sts {
    cluster_name: String,
    cluster_arn: Option<String>,
    verifier: Verifier,
    associations: Associations,
    client: NodeSigned<aws_sdk_sts::Client>,
}

impl Sts {
    /// Reads the associations and the issuer's keys (a bad file fails the start), and builds the
    /// STS client from the default chain (`AWS_ENDPOINT_URL_STS` honoured).
    pub async fn new(options: StsOptions) -> anyhow::Result<Sts> {
        let associations = Associations::load(&options.associations_file, &options.cluster_name)?;
        let verifier = Verifier::new(options.check).await?;
        let aws = AwsOptions {
            region: options.region,
            fips: options.fips,
            app_name: Some(app_name(options.node_name.as_deref())),
            ..AwsOptions::default()
        };
        let client = NodeSigned::new(SERVICE, aws, build_client).await?;
        Ok(Sts {
            cluster_name: options.cluster_name,
            cluster_arn: options.cluster_arn,
            verifier,
            associations,
            client,
        })
    }

    pub async fn region(&self) -> Option<String> {
        self.client.region().await
    }

    /// The session tags EKS Pod Identity sets, then the association's own.
    fn tags(&self, claims: &TokenClaims, own: &[(String, String)]) -> Vec<aws_sdk_sts::types::Tag> {
        let mut pairs: Vec<(&str, &str)> = Vec::with_capacity(6 + own.len());
        if let Some(arn) = &self.cluster_arn {
            pairs.push(("eks-cluster-arn", arn));
        }
        pairs.extend([
            ("eks-cluster-name", self.cluster_name.as_str()),
            ("kubernetes-namespace", claims.namespace.as_str()),
            (
                "kubernetes-service-account",
                claims.service_account.as_str(),
            ),
            ("kubernetes-pod-name", claims.pod_name.as_str()),
            ("kubernetes-pod-uid", claims.pod_uid.as_str()),
        ]);
        pairs.extend(own.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        pairs.into_iter().filter_map(|(k, v)| tag(k, v)).collect()
    }

    /// The EKS tags' keys: marked transitive, as EKS marks them, so a role the pod chains into
    /// carries them too.
    fn transitive_keys(&self) -> Vec<String> {
        associations::EKS_TAG_KEYS
            .iter()
            .filter(|k| self.cluster_arn.is_some() || **k != "eks-cluster-arn")
            .map(|k| (*k).to_owned())
            .collect()
    }

    /// The token's verified claims and its service account's association: EKS Auth's own checks,
    /// done locally.
    async fn admit(&self, token: &str) -> Result<(TokenClaims, Arc<Association>), UpstreamError> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = self.verifier.verify(token, now).await?;
        let association = self.associations.find(&claims.namespace, &claims.service_account).ok_or_else(|| UpstreamError::no_association(format!(
                "No Pod Identity assignment exists for the service account {}/{} in cluster {} (the agent's associations file)",
                claims.namespace, claims.service_account, self.cluster_name
            )))?;
        Ok((claims, association))
    }
}

fn tag(key: &str, value: &str) -> Option<aws_sdk_sts::types::Tag> {
    aws_sdk_sts::types::Tag::builder()
        .key(key)
        .value(value)
        .build()
        .ok()
}

fn build_client(
    config: &aws_config::SdkConfig,
    endpoint: &EndpointRecorder,
) -> aws_sdk_sts::Client {
    aws_sdk_sts::Client::from_conf(
        aws_sdk_sts::config::Builder::from(config)
            .interceptor(endpoint.clone())
            .build(),
    )
}

/// EKS's role session name, `eks-CLUSTER-POD-UUID`, in STS's 64 characters of
/// `[A-Za-z0-9+=,.@_-]`. A long cluster or pod name is cut, never the UUID: it is what keeps
/// sessions apart in CloudTrail.
pub fn session_name(cluster: &str, pod: &str, random: [u8; 16]) -> String {
    const MAX: usize = 64;
    let mut uuid = random;
    uuid[6] = (uuid[6] & 0x0f) | 0x40;
    uuid[8] = (uuid[8] & 0x3f) | 0x80;
    let hex: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    );
    let prefix: String = format!("eks-{cluster}-{pod}-")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "+=,.@_-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(MAX - uuid.len())
        .collect();
    prefix + &uuid
}

impl Upstream for Sts {
    fn name(&self) -> &'static str {
        SERVICE
    }

    /// A token that does not verify, or whose service account has no association, is refused
    /// here, without STS.
    async fn precheck(&self, token: &str) -> Result<Checked, UpstreamError> {
        self.admit(token).await.map(|_| Checked::Verified)
    }

    async fn assume_role(&self, token: &str) -> Result<AssumedRole, UpstreamError> {
        let (claims, association) = self.admit(token).await?;
        let client = self.client.client().await?;
        let mut random = [0u8; 16];
        let _ = aws_lc_rs::rand::fill(&mut random);
        let session = session_name(&self.cluster_name, &claims.pod_name, random);
        let mut first = client
            .assume_role()
            .role_arn(&association.role_arn)
            .role_session_name(&session)
            .duration_seconds(SESSION_SECONDS);
        first = match &association.session {
            Session::Tagged { own } => first
                .set_tags(Some(self.tags(&claims, own)))
                .set_transitive_tag_keys(Some(self.transitive_keys())),
            // With a target role the policy scopes the target's session, not this one.
            Session::Untagged { policy } => {
                first.set_policy(policy.clone().filter(|_| association.target.is_none()))
            }
        };
        let out = first.send().await.map_err(|e| self.client.error(e))?;
        let out = match &association.target {
            Some(target) => chain(&client, &association, target, &session, out).await?,
            None => out,
        };
        assumed(out, &association)
    }
}

/// The second hop: the target role, assumed with the first role's credentials, passing the
/// association's external ID and, when set, its policy.
async fn chain(
    client: &aws_sdk_sts::Client,
    association: &Association,
    target: &associations::Target,
    session: &str,
    first: AssumeRoleOutput,
) -> Result<AssumeRoleOutput, UpstreamError> {
    let creds = first
        .credentials()
        .ok_or_else(|| UpstreamError::malformed(CALL, "credentials", first.request_id()))?;
    let expiry = SystemTime::try_from(*creds.expiration()).ok();
    let hop = aws_credential_types::Credentials::new(
        creds.access_key_id(),
        creds.secret_access_key(),
        Some(creds.session_token().to_owned()),
        expiry,
        "sts-first-hop",
    );
    let chained = aws_sdk_sts::Client::from_conf(
        client
            .config()
            .to_builder()
            .credentials_provider(hop)
            .build(),
    );
    let mut call = chained
        .assume_role()
        .role_arn(&target.role_arn)
        .role_session_name(session)
        .duration_seconds(SESSION_SECONDS)
        .external_id(&target.external_id.value);
    call = match &association.session {
        // The EKS tags come along as transitive tags (passing them again would be refused);
        // the association's own are not transitive, so they are set again.
        Session::Tagged { own } => {
            let own: Vec<_> = own.iter().filter_map(|(k, v)| tag(k, v)).collect();
            call.set_tags((!own.is_empty()).then_some(own))
        }
        Session::Untagged { policy } => call.set_policy(policy.clone()),
    };
    call.send().await.map_err(|e| {
        map_sdk_error(SERVICE, e).context(format_args!(
            "assuming the target role {} with {}'s credentials",
            target.role_arn, association.role_arn
        ))
    })
}

/// The pod's credentials from the last hop's answer.
fn assumed(out: AssumeRoleOutput, association: &Association) -> Result<AssumedRole, UpstreamError> {
    let request_id = out.request_id().map(str::to_owned);
    let creds = out
        .credentials()
        .ok_or_else(|| UpstreamError::malformed(CALL, "credentials", out.request_id()))?;
    let role = out
        .assumed_role_user()
        .ok_or_else(|| UpstreamError::malformed(CALL, "AssumedRoleUser", out.request_id()))?;
    let expiration = SystemTime::try_from(*creds.expiration())
        .map_err(|_| UpstreamError::malformed(CALL, "valid expiration", out.request_id()))?;
    Ok(AssumedRole::new(
        Credentials {
            access_key_id: creds.access_key_id().to_owned(),
            secret_access_key: creds.secret_access_key().to_owned(),
            session_token: creds.session_token().to_owned(),
            account_id: account_from_arn(role.arn()).unwrap_or_default().to_owned(),
            expiration,
        },
        role.arn().to_owned(),
        association.id.clone(),
        request_id,
    )
    .with_scope(SessionScope {
        tags: association.session.tags_on(),
        policy: association.session.policy().is_some(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names_follow_eks_and_fit_sts() {
        let name = session_name("prod", "api-7d9f", [0xab; 16]);
        assert_eq!(
            name,
            "eks-prod-api-7d9f-abababab-abab-4bab-abab-abababababab"
        );
        let long = session_name(
            "a-very-long-cluster-name",
            "a-pod-with-a-long-generated-name-x7k2p",
            [0; 16],
        );
        assert_eq!(
            long,
            "eks-a-very-long-cluster-name00000000-0000-4000-8000-000000000000"
        );
        assert_eq!(
            session_name("prod/eu", "api:0", [0; 16]),
            "eks-prod-eu-api-0-00000000-0000-4000-8000-000000000000"
        );
        assert!(
            long.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c))
        );
    }
}
