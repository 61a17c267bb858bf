//! The credential source the daemon runs with (`--credential-source`): the one place that knows
//! there is more than one. The cache holds a [`CredentialSource`] and sees only [`Upstream`].

use crate::{
    config::{Settings, SourceSettings},
    eks_auth::{EksAuth, EksAuthOptions},
    sts::{Sts, StsOptions},
    upstream::{AssumedRole, Checked, Upstream, UpstreamError},
};

pub enum CredentialSource {
    /// EKS Auth `AssumeRoleForPodIdentity` (EKS clusters).
    EksAuth(EksAuth),
    /// Local associations and token verification, STS `AssumeRole` (other clusters).
    Sts(Sts),
}

impl CredentialSource {
    /// The source `--credential-source` names, configured from the flags.
    pub async fn from_settings(settings: &Settings) -> anyhow::Result<CredentialSource> {
        let f = &settings.flags;
        Ok(match &settings.source {
            SourceSettings::EksAuth { check } => CredentialSource::EksAuth(
                EksAuth::new(EksAuthOptions {
                    cluster_name: f.cluster_name.clone(),
                    region: f.region.clone(),
                    endpoint: f.eks_auth_endpoint.clone(),
                    fips: f.fips,
                    node_name: f.node_name.clone(),
                    check: check.clone(),
                })
                .await?,
            ),
            SourceSettings::Sts {
                associations_file,
                check,
                cluster_arn,
            } => CredentialSource::Sts(
                Sts::new(StsOptions {
                    cluster_name: f.cluster_name.clone(),
                    cluster_arn: cluster_arn.clone(),
                    region: f.region.clone(),
                    fips: f.fips,
                    node_name: f.node_name.clone(),
                    associations_file: associations_file.clone(),
                    check: check.clone(),
                })
                .await?,
            ),
        })
    }

    /// `--credential-source` as `/v1/agent` and the doctor name it.
    pub fn kind(&self) -> &'static str {
        match self {
            CredentialSource::EksAuth(_) => "eks-auth",
            CredentialSource::Sts(_) => "sts",
        }
    }

    /// The region the source's client signs for (`None` until found).
    pub async fn region(&self) -> Option<String> {
        match self {
            CredentialSource::EksAuth(s) => s.region().await,
            CredentialSource::Sts(s) => s.region().await,
        }
    }
}

impl Upstream for CredentialSource {
    fn name(&self) -> &'static str {
        match self {
            CredentialSource::EksAuth(s) => s.name(),
            CredentialSource::Sts(s) => s.name(),
        }
    }

    async fn assume_role(&self, token: &str) -> Result<AssumedRole, UpstreamError> {
        match self {
            CredentialSource::EksAuth(s) => s.assume_role(token).await,
            CredentialSource::Sts(s) => s.assume_role(token).await,
        }
    }

    async fn precheck(&self, token: &str) -> Result<Checked, UpstreamError> {
        match self {
            CredentialSource::EksAuth(s) => s.precheck(token).await,
            CredentialSource::Sts(s) => s.precheck(token).await,
        }
    }
}
