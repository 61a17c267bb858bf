//! The EKS control-plane API (aws-sdk-eks), as the operator commands use it: pod identity
//! associations, the cluster, and its add-ons.

use std::collections::BTreeMap;

use clap::Args;
use serde::Serialize;

use crate::aws::{ApiError, AwsOptions, api_error};

/// Which cluster, and how to reach its API. The caller's own credentials sign the calls.
#[derive(Args, Clone, Debug, Default)]
pub struct ClusterArgs {
    /// The EKS cluster.
    #[arg(long, env = "CLUSTER_NAME", global = true)]
    pub cluster_name: Option<String>,
    /// Its region (default: the AWS SDK chain, e.g. AWS_REGION, the profile, IMDS).
    #[arg(long, global = true)]
    pub region: Option<String>,
    /// EKS API endpoint (default: AWS_ENDPOINT_URL_EKS, else the regional endpoint).
    #[arg(long, value_name = "URL", global = true)]
    pub eks_endpoint: Option<String>,
}

impl ClusterArgs {
    pub fn name(&self) -> anyhow::Result<&str> {
        self.cluster_name
            .as_deref()
            .filter(|n| !n.trim().is_empty())
            .ok_or_else(|| anyhow::anyhow!("no cluster: pass --cluster-name or set CLUSTER_NAME"))
    }
}

#[derive(Clone)]
pub struct Eks {
    client: aws_sdk_eks::Client,
    pub cluster: String,
    pub region: Option<String>,
}

/// One pod identity association, as `associations --json` prints it.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Association {
    pub association_id: String,
    pub association_arn: String,
    pub namespace: String,
    pub service_account: String,
    pub role_arn: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_role_arn: Option<String>,
    /// What EKS generated for a target role: the `sts:ExternalId` its trust policy requires.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    pub disable_session_tags: bool,
    /// The session policy that scopes the pods' sessions (JSON, as EKS holds it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    pub tags: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub modified_at: Option<String>,
    /// Set when an EKS add-on owns the association.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_arn: Option<String>,
}

impl Association {
    /// What the pods' sessions carry under this association.
    pub fn session_scope(&self) -> crate::upstream::SessionScope {
        crate::upstream::SessionScope {
            tags: !self.disable_session_tags,
            policy: self.policy.is_some(),
        }
    }
}

/// What `associations create` asks for.
#[derive(Clone, Debug, Default)]
pub struct NewAssociation {
    pub namespace: String,
    pub service_account: String,
    pub role_arn: String,
    pub target_role_arn: Option<String>,
    pub disable_session_tags: bool,
    pub policy: Option<String>,
    pub tags: BTreeMap<String, String>,
}

/// What `associations update` changes; `None` leaves a field as it is, and `Some("")` removes a
/// target role or a policy (EKS's own convention).
#[derive(Clone, Debug, Default)]
pub struct AssociationChange {
    pub role_arn: Option<String>,
    pub target_role_arn: Option<String>,
    pub disable_session_tags: Option<bool>,
    pub policy: Option<String>,
}

pub struct Cluster {
    pub status: String,
    pub version: String,
}

pub struct Addon {
    pub status: String,
    pub version: String,
}

/// Associations asked for per page: EKS's maximum.
const PAGE_SIZE: i32 = 100;
/// Describe calls in flight at once when listing.
const DESCRIBE_CONCURRENCY: usize = 8;

impl Eks {
    pub async fn connect(args: &ClusterArgs, app_name: &str) -> anyhow::Result<Eks> {
        let config = crate::aws::sdk_config(&AwsOptions {
            region: args.region.clone(),
            endpoint: args.eks_endpoint.clone(),
            app_name: Some(app_name.to_owned()),
            sdk_retries: true,
            ..Default::default()
        })
        .await?;
        let region = config.region().map(ToString::to_string);
        Ok(Eks {
            client: aws_sdk_eks::Client::new(&config),
            cluster: args.name()?.to_owned(),
            region,
        })
    }

    /// Every association of the cluster (all pages), optionally only one namespace's or one
    /// service account's, each described in full.
    pub async fn associations(
        &self,
        namespace: Option<&str>,
        service_account: Option<&str>,
    ) -> Result<Vec<Association>, ApiError> {
        let mut ids = Vec::new();
        let mut next_token = None;
        loop {
            let page = self
                .client
                .list_pod_identity_associations()
                .cluster_name(&self.cluster)
                .set_namespace(namespace.map(str::to_owned))
                .set_service_account(service_account.map(str::to_owned))
                .max_results(PAGE_SIZE)
                .set_next_token(next_token)
                .send()
                .await
                .map_err(api_error)?;
            ids.extend(
                page.associations()
                    .iter()
                    .filter_map(|a| a.association_id().map(str::to_owned)),
            );
            next_token = page
                .next_token()
                .filter(|t| !t.is_empty())
                .map(str::to_owned);
            if next_token.is_none() {
                break;
            }
        }
        let mut out = Vec::with_capacity(ids.len());
        let mut running = tokio::task::JoinSet::new();
        for id in ids {
            if running.len() >= DESCRIBE_CONCURRENCY
                && let Some(done) = running.join_next().await
            {
                out.push(done.expect("describe task panicked")?);
            }
            let eks = self.clone();
            running.spawn(async move { eks.describe(&id).await });
        }
        while let Some(done) = running.join_next().await {
            out.push(done.expect("describe task panicked")?);
        }
        out.sort_by(|a, b| {
            (&a.namespace, &a.service_account, &a.association_id).cmp(&(
                &b.namespace,
                &b.service_account,
                &b.association_id,
            ))
        });
        Ok(out)
    }

    pub async fn describe(&self, id: &str) -> Result<Association, ApiError> {
        let out = self
            .client
            .describe_pod_identity_association()
            .cluster_name(&self.cluster)
            .association_id(id)
            .send()
            .await
            .map_err(api_error)?;
        Ok(out.association().map(association).unwrap_or_default())
    }

    pub async fn create(&self, new: &NewAssociation) -> Result<Association, ApiError> {
        let out = self
            .client
            .create_pod_identity_association()
            .cluster_name(&self.cluster)
            .namespace(&new.namespace)
            .service_account(&new.service_account)
            .role_arn(&new.role_arn)
            .set_target_role_arn(new.target_role_arn.clone())
            .set_disable_session_tags(new.disable_session_tags.then_some(true))
            .set_policy(new.policy.clone())
            .set_tags((!new.tags.is_empty()).then(|| new.tags.clone().into_iter().collect()))
            .send()
            .await
            .map_err(api_error)?;
        Ok(out.association().map(association).unwrap_or_default())
    }

    pub async fn update(
        &self,
        id: &str,
        change: &AssociationChange,
    ) -> Result<Association, ApiError> {
        let out = self
            .client
            .update_pod_identity_association()
            .cluster_name(&self.cluster)
            .association_id(id)
            .set_role_arn(change.role_arn.clone())
            .set_target_role_arn(change.target_role_arn.clone())
            .set_disable_session_tags(change.disable_session_tags)
            .set_policy(change.policy.clone())
            .send()
            .await
            .map_err(api_error)?;
        Ok(out.association().map(association).unwrap_or_default())
    }

    pub async fn delete(&self, id: &str) -> Result<Association, ApiError> {
        let out = self
            .client
            .delete_pod_identity_association()
            .cluster_name(&self.cluster)
            .association_id(id)
            .send()
            .await
            .map_err(api_error)?;
        Ok(out.association().map(association).unwrap_or_default())
    }

    pub async fn cluster(&self) -> Result<Cluster, ApiError> {
        let out = self
            .client
            .describe_cluster()
            .name(&self.cluster)
            .send()
            .await
            .map_err(api_error)?;
        let c = out.cluster();
        Ok(Cluster {
            status: c
                .and_then(|c| c.status())
                .map(|s| s.as_str().to_owned())
                .unwrap_or_else(|| "UNKNOWN".into()),
            version: c.and_then(|c| c.version()).unwrap_or_default().to_owned(),
        })
    }

    /// The add-on, or `None` when the cluster does not have it.
    pub async fn addon(&self, name: &str) -> Result<Option<Addon>, ApiError> {
        match self
            .client
            .describe_addon()
            .cluster_name(&self.cluster)
            .addon_name(name)
            .send()
            .await
            .map_err(api_error)
        {
            Ok(out) => Ok(Some(Addon {
                status: out
                    .addon()
                    .and_then(|a| a.status())
                    .map(|s| s.as_str().to_owned())
                    .unwrap_or_else(|| "UNKNOWN".into()),
                version: out
                    .addon()
                    .and_then(|a| a.addon_version())
                    .unwrap_or_default()
                    .to_owned(),
            })),
            Err(e) if e.code == "ResourceNotFoundException" => Ok(None),
            Err(e) => Err(e),
        }
    }
}

fn association(a: &aws_sdk_eks::types::PodIdentityAssociation) -> Association {
    let text = |v: Option<&str>| v.unwrap_or_default().to_owned();
    let time = |t: Option<&aws_smithy_types::DateTime>| {
        t.and_then(|t| t.fmt(aws_smithy_types::date_time::Format::DateTime).ok())
    };
    Association {
        association_id: text(a.association_id()),
        association_arn: text(a.association_arn()),
        namespace: text(a.namespace()),
        service_account: text(a.service_account()),
        role_arn: text(a.role_arn()),
        target_role_arn: a
            .target_role_arn()
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
        external_id: a.external_id().filter(|s| !s.is_empty()).map(str::to_owned),
        disable_session_tags: a.disable_session_tags().unwrap_or(false),
        policy: a.policy().filter(|s| !s.is_empty()).map(str::to_owned),
        tags: a
            .tags()
            .map(|t| t.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default(),
        created_at: time(a.created_at()),
        modified_at: time(a.modified_at()),
        owner_arn: a.owner_arn().filter(|s| !s.is_empty()).map(str::to_owned),
    }
}
