//! The credential source the daemon runs with (`--credential-source`): the one place that knows
//! there is more than one. The cache holds a [`CredentialSource`] and sees only [`Upstream`].

use crate::{
    eks_auth::EksAuth,
    sts::Sts,
    upstream::{AssumedRole, Upstream, UpstreamError},
};

pub enum CredentialSource {
    /// EKS Auth `AssumeRoleForPodIdentity` (EKS clusters).
    EksAuth(EksAuth),
    /// Local associations and token verification, STS `AssumeRole` (other clusters).
    Sts(Box<Sts>),
}

impl CredentialSource {
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

    async fn precheck(&self, token: &str) -> Result<(), UpstreamError> {
        match self {
            CredentialSource::EksAuth(s) => s.precheck(token).await,
            CredentialSource::Sts(s) => s.precheck(token).await,
        }
    }
}
