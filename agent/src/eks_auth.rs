//! The EKS Auth API (`AssumeRoleForPodIdentity`), called with the node's own credentials: EKS
//! verifies the token, finds the association and assumes the role. Given the cluster issuer's
//! keys, the agent verifies the token first, so a forged one never reaches EKS Auth.

use aws_sdk_eksauth::operation::RequestId as _;

use crate::{
    aws::{AwsOptions, EndpointRecorder, app_name},
    credentials::Credentials,
    issuer::{TokenCheck, Verifier},
    upstream::{AssumedRole, Checked, NodeSigned, Upstream, UpstreamError, account_from_arn},
};

const SERVICE: &str = "EKS Auth";

pub struct EksAuth {
    cluster_name: String,
    client: NodeSigned<aws_sdk_eksauth::Client>,
    /// Verifies tokens before EKS Auth sees them, when the issuer's keys were given.
    verifier: Option<Verifier>,
}

/// How to reach EKS Auth.
#[derive(Clone, Debug, Default)]
pub struct EksAuthOptions {
    pub cluster_name: String,
    pub region: Option<String>,
    /// Overrides `AWS_ENDPOINT_URL_EKS_AUTH` and the regional default.
    pub endpoint: Option<String>,
    /// FIPS endpoint (also set by `AWS_USE_FIPS_ENDPOINT=true`).
    pub fips: bool,
    /// Sent in the User-Agent (`app/pod-identity-agent-<node>`), so calls can be traced to a node.
    pub node_name: Option<String>,
    /// The issuer's keys (`--jwks-file`, `--jwks-url`), to verify tokens locally first.
    pub check: Option<TokenCheck>,
}

impl EksAuth {
    /// Builds the client from the default AWS configuration chain (environment, profile, IMDS).
    /// `AWS_ENDPOINT_URL_EKS_AUTH` and `AWS_USE_FIPS_ENDPOINT` are honoured by the chain; the
    /// HTTP client honours `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` and `AWS_CA_BUNDLE`. Without a
    /// region yet (IMDS not answering), calls fail with that reason until one is found.
    pub async fn new(options: EksAuthOptions) -> anyhow::Result<EksAuth> {
        let aws = AwsOptions {
            region: options.region,
            endpoint: options.endpoint,
            fips: options.fips,
            app_name: Some(app_name(options.node_name.as_deref())),
            ..AwsOptions::default()
        };
        let verifier = match options.check {
            Some(check) => Some(Verifier::new(check).await?),
            None => None,
        };
        Ok(EksAuth {
            cluster_name: options.cluster_name,
            client: NodeSigned::new(SERVICE, aws, build_client).await?,
            verifier,
        })
    }

    /// Where the last call went (`https://eks-auth.us-west-2.api.aws`), once a call was made.
    pub fn last_endpoint(&self) -> Option<String> {
        self.client.last_endpoint()
    }

    /// The region the client signs for, as the chain resolved it (`None` until found).
    pub async fn region(&self) -> Option<String> {
        self.client.region().await
    }
}

fn build_client(
    config: &aws_config::SdkConfig,
    endpoint: &EndpointRecorder,
) -> aws_sdk_eksauth::Client {
    aws_sdk_eksauth::Client::from_conf(
        aws_sdk_eksauth::config::Builder::from(config)
            .interceptor(endpoint.clone())
            .build(),
    )
}

impl Upstream for EksAuth {
    fn name(&self) -> &'static str {
        SERVICE
    }

    /// With the issuer's keys, a token that does not verify is refused here, as EKS Auth would
    /// refuse it, without calling it.
    async fn precheck(&self, token: &str) -> Result<Checked, UpstreamError> {
        let Some(verifier) = &self.verifier else {
            return Ok(Checked::Unchecked);
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        verifier.verify(token, now).await.map(|_| Checked::Verified)
    }

    async fn assume_role(&self, token: &str) -> Result<AssumedRole, UpstreamError> {
        let out = self
            .client
            .client()
            .await?
            .assume_role_for_pod_identity()
            .cluster_name(&self.cluster_name)
            .token(token)
            .send()
            .await
            .map_err(|e| self.client.error(e))?;
        let malformed = |what: &str| UpstreamError::malformed(SERVICE, what, out.request_id());
        let creds = out.credentials().ok_or_else(|| malformed("credentials"))?;
        let role = out
            .assumed_role_user()
            .ok_or_else(|| malformed("assumedRoleUser"))?;
        let expiration = std::time::SystemTime::try_from(*creds.expiration())
            .map_err(|_| malformed("valid expiration"))?;
        Ok(AssumedRole::new(
            Credentials {
                access_key_id: creds.access_key_id().to_owned(),
                secret_access_key: creds.secret_access_key().to_owned(),
                session_token: creds.session_token().to_owned(),
                account_id: account_from_arn(role.arn()).unwrap_or_default().to_owned(),
                expiration,
            },
            role.arn().to_owned(),
            out.pod_identity_association()
                .map(|a| a.association_id().to_owned())
                .unwrap_or_default(),
            out.request_id().map(str::to_owned),
        ))
    }
}
