//! A credential source's AWS client, signed with the node's own credentials.

use std::fmt;

use aws_config::SdkConfig;
use aws_smithy_runtime_api::client::result::SdkError;

use super::{UpstreamError, map_sdk_error};
use crate::aws::{AwsOptions, EndpointRecorder, NodeCredentials, RegionalClient};

/// A credential source's AWS client: it signs with the node's own credentials, which the agent
/// holds itself (see [`NodeCredentials`]), in the region the default chain finds, and makes one
/// HTTP request per call (the SDK's retries are off; the cache retries).
pub struct NodeSigned<C> {
    service: &'static str,
    client: RegionalClient<C>,
    node: NodeCredentials,
}

impl<C: Clone> NodeSigned<C> {
    /// `options` says where (region, endpoint, FIPS) and who calls (the User-Agent's app name).
    pub async fn new(
        service: &'static str,
        options: AwsOptions,
        build: fn(&SdkConfig, &EndpointRecorder) -> C,
    ) -> anyhow::Result<NodeSigned<C>> {
        let node = NodeCredentials::default();
        let options = AwsOptions {
            sdk_retries: false,
            node_credentials: Some(node.clone()),
            ..options
        };
        Ok(NodeSigned {
            service,
            client: RegionalClient::new(options, build, service).await?,
            node,
        })
    }

    /// The client, once there is a region and the node has credentials. The credentials are
    /// fetched first so that their failure is named as such (the SDK would only say it could
    /// not sign).
    pub async fn client(&self) -> Result<C, UpstreamError> {
        let client = self.client.get().await.map_err(UpstreamError::no_region)?;
        self.node
            .get()
            .await
            .map_err(|e| UpstreamError::node_credentials_unavailable(&e))?;
        Ok(client)
    }

    /// A failed call, for the pod; a refusal of the node's credentials drops them for a reload.
    pub fn error<E, R>(&self, err: SdkError<E, R>) -> UpstreamError
    where
        E: aws_smithy_types::error::metadata::ProvideErrorMetadata + std::error::Error + 'static,
        R: fmt::Debug + crate::aws::HttpStatus,
    {
        node_credentials_refused(self.service, map_sdk_error(self.service, err), &self.node)
    }

    /// The region the client signs for, as the chain resolved it (`None` until found).
    pub async fn region(&self) -> Option<String> {
        self.client.region().await
    }

    /// Where the last call went (`https://eks-auth.us-west-2.api.aws`), once a call was made.
    pub fn last_endpoint(&self) -> Option<String> {
        self.client.last_endpoint()
    }
}

/// A service's refusal of the node's own credentials (the keys rotated, expired, or were
/// replaced on disk), as opposed to the pod's token: EKS Auth's and STS's codes. The
/// credentials are dropped, so the retry the cache makes signs with reloaded ones.
fn node_credentials_refused(
    service: &str,
    e: UpstreamError,
    node: &NodeCredentials,
) -> UpstreamError {
    let refused = matches!(
        (e.status(), e.code()),
        (
            403,
            "UnrecognizedClientException"
                | "InvalidSignatureException"
                | "ExpiredTokenException"
                | "InvalidClientTokenId"
                | "SignatureDoesNotMatch"
                | "IncompleteSignature"
                | "MissingAuthenticationTokenException"
        ) | (400, "ExpiredToken")
    );
    if !refused {
        return e;
    }
    node.invalidate();
    UpstreamError::node_credentials_rejected(
        service,
        e.code(),
        e.message(),
        e.request_id().map(str::to_owned),
    )
}
