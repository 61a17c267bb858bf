//! What a credential source is to the cache: a pod's token in, the pod's credentials (or an
//! error shaped for the pod) out. The sources themselves live in `eks_auth` and `sts`; the
//! cache sees only [`Upstream`].
//!
//! The SDKs' own retries are off in every source: the cache retries with its own deadline and
//! budget, so one upstream call means one HTTP request.

use std::{fmt, future::Future, time::SystemTime};

use aws_config::SdkConfig;
use aws_smithy_runtime_api::client::result::SdkError;

use crate::{
    aws::{ApiErrorKind, AwsOptions, EndpointRecorder, NodeCredentials, RegionalClient},
    credentials::Credentials,
};

/// What a successful exchange yields: the pod's credentials and who they are for.
#[derive(Clone)]
pub struct AssumedRole {
    /// The credentials in the SDK wire format, serialised once: every cached answer hands out
    /// the same bytes, and the secrets are kept nowhere else.
    body: bytes::Bytes,
    pub expiration: SystemTime,
    pub role_arn: String,
    pub association_id: String,
    /// The upstream's request id, for logs.
    pub request_id: Option<String>,
}

impl AssumedRole {
    pub fn new(
        credentials: Credentials,
        role_arn: String,
        association_id: String,
        request_id: Option<String>,
    ) -> AssumedRole {
        AssumedRole {
            body: bytes::Bytes::from(credentials.to_json()),
            expiration: credentials.expiration,
            role_arn,
            association_id,
            request_id,
        }
    }

    /// The credentials in the SDK wire format.
    pub fn body(&self) -> bytes::Bytes {
        self.body.clone()
    }

    /// The access key id of the credentials (not a secret; for tests).
    #[cfg(test)]
    pub fn access_key_id(&self) -> String {
        let v: serde_json::Value = serde_json::from_slice(&self.body).expect("the body is JSON");
        v["AccessKeyId"].as_str().unwrap_or_default().to_owned()
    }
}

impl fmt::Debug for AssumedRole {
    // The body holds the secrets: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AssumedRole")
            .field(
                "expiration",
                &crate::credentials::expiration_string(self.expiration),
            )
            .field("role_arn", &self.role_arn)
            .field("association_id", &self.association_id)
            .field("request_id", &self.request_id)
            .finish_non_exhaustive()
    }
}

/// An upstream failure, shaped the way the reference agent passes it on to the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamError {
    /// HTTP status for the pod: the upstream status, 502 for network failures, 504 for timeouts.
    pub status: u16,
    /// The service's error code (`ResourceNotFoundException`, ...) or a local one.
    pub code: String,
    pub message: String,
    pub request_id: Option<String>,
}

/// Exchanges a pod's token for credentials: `source::CredentialSource` in production (EKS Auth
/// or STS); a scripted fake in the cache's unit tests.
pub trait Upstream: Send + Sync + 'static {
    fn assume_role(
        &self,
        token: &str,
    ) -> impl Future<Output = Result<AssumedRole, UpstreamError>> + Send;

    /// Refuses a token the source can judge without calling AWS, before any of the node's
    /// budget is spent on it (a pod flooding forged tokens must not starve its neighbours).
    /// EKS Auth judges tokens itself, so by default nothing is refused here; `assume_role`
    /// still checks everything on its own.
    fn precheck(&self, _token: &str) -> impl Future<Output = Result<(), UpstreamError>> + Send {
        std::future::ready(Ok(()))
    }

    /// The service called, in operators' words (`EKS Auth`, `STS`), for logs and messages.
    fn name(&self) -> &'static str;
}

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

impl UpstreamError {
    /// `service` answered without `what` (its request id kept for the logs).
    pub fn malformed(service: &str, what: &str, request_id: Option<&str>) -> UpstreamError {
        UpstreamError {
            status: 502,
            code: "InvalidUpstreamResponse".into(),
            message: format!("{service} response has no {what}"),
            request_id: request_id.map(str::to_owned),
        }
    }

    /// The call did not finish within its deadline (retries included).
    pub fn timeout(upstream: &str, deadline: std::time::Duration) -> UpstreamError {
        UpstreamError {
            status: 504,
            code: "UpstreamTimeout".into(),
            message: format!("{upstream} did not answer within {deadline:?} (retries included)"),
            request_id: None,
        }
    }

    /// The node-wide upstream budget (--upstream-qps/--upstream-burst) had no room in time.
    pub fn budget_exhausted(upstream: &str) -> UpstreamError {
        UpstreamError {
            status: 429,
            code: "UpstreamBudgetExhausted".into(),
            message: format!(
                "the node's {upstream} call budget (--upstream-qps, --upstream-burst) is used up; retry shortly"
            ),
            request_id: None,
        }
    }

    /// The node's own credentials could not be had: named as such (the SDK would only say it
    /// could not sign).
    pub fn node_credentials_unavailable(e: &dyn std::error::Error) -> UpstreamError {
        UpstreamError {
            status: 502,
            code: "NodeCredentialsUnavailable".into(),
            message: format!(
                "cannot get the node's own AWS credentials: {}",
                crate::aws::error_chain(Some(e))
            ),
            request_id: None,
        }
    }

    /// No region for the client yet (`why`).
    pub fn no_region(why: String) -> UpstreamError {
        UpstreamError {
            status: 502,
            code: "NodeRegionUnavailable".into(),
            message: format!(
                "{why}: is IMDS reachable from the node? set AWS_REGION or --region otherwise"
            ),
            request_id: None,
        }
    }

    /// The pod's own upstream budget (--pod-upstream-qps/--pod-upstream-burst) is used up: it asked
    /// for credentials for too many distinct tokens too fast.
    pub fn pod_budget_exhausted(pod: &str) -> UpstreamError {
        UpstreamError {
            status: 429,
            code: "PodUpstreamBudgetExhausted".into(),
            message: format!(
                "pod {pod} presented too many new tokens too fast (--pod-upstream-qps, --pod-upstream-burst); retry shortly"
            ),
            request_id: None,
        }
    }

    /// Worth another attempt: throttling, server errors, network failures and timeouts. STS
    /// throttles with a 400 and the code `Throttling`, EKS Auth with a 429.
    pub fn is_transient(&self) -> bool {
        self.status == 429 || self.status >= 500 || self.code == "Throttling"
    }

    /// Errors that a retry with the same token cannot fix: EKS Auth's codes, and STS's
    /// `AccessDenied` (the role does not trust the node, or the tags are not allowed).
    pub fn is_terminal(&self) -> bool {
        matches!(
            self.code.as_str(),
            "AccessDeniedException"
                | "AccessDenied"
                | "ExpiredTokenException"
                | "InvalidTokenException"
                | "ResourceNotFoundException"
        )
    }

    fn fault(&self) -> &'static str {
        if (400..500).contains(&self.status) {
            "client"
        } else {
            "server"
        }
    }
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{}]: ({}): {}, fault: {}",
            self.request_id.as_deref().unwrap_or("-"),
            self.code,
            self.message,
            self.fault()
        )
    }
}

/// The account field of an ARN (`arn:partition:service:region:account:resource`).
pub fn account_from_arn(arn: &str) -> Option<&str> {
    let account = arn.split(':').nth(4)?;
    (account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit())).then_some(account)
}

/// An SDK call's failure, for the pod: the service's own status and code when it answered, else
/// a local code that names `service` and what went wrong on the way.
pub fn map_sdk_error<E, R>(service: &str, err: SdkError<E, R>) -> UpstreamError
where
    E: aws_smithy_types::error::metadata::ProvideErrorMetadata + std::error::Error + 'static,
    R: fmt::Debug + crate::aws::HttpStatus,
{
    let e = crate::aws::api_error(err);
    let (status, code, message) = match e.kind {
        ApiErrorKind::Service => (e.status.unwrap_or(502), e.code, e.message),
        ApiErrorKind::Timeout => (
            504,
            "UpstreamTimeout".into(),
            format!("{service} did not answer in time"),
        ),
        ApiErrorKind::Unreachable => (
            502,
            "UpstreamUnreachable".into(),
            format!("could not reach {service}: {}", e.message),
        ),
        ApiErrorKind::BadResponse => (
            502,
            "InvalidUpstreamResponse".into(),
            format!("{service} sent a response that could not be read"),
        ),
        ApiErrorKind::Other => (
            500,
            "UpstreamRequestFailed".into(),
            format!("could not call {service}: {}", e.message),
        ),
    };
    UpstreamError {
        status,
        code,
        message,
        request_id: e.request_id,
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
        (e.status, e.code.as_str()),
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
    UpstreamError {
        status: 502,
        code: "NodeCredentialsRejected".into(),
        message: format!(
            "{service} refused the node's own credentials ({}: {}); they are reloaded",
            e.code, e.message
        ),
        request_id: e.request_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_comes_from_the_role_arn() {
        assert_eq!(
            account_from_arn("arn:aws:sts::123456789012:assumed-role/my-role/eks-c-pod-1"),
            Some("123456789012")
        );
        assert_eq!(account_from_arn("arn:aws:sts::12345:assumed-role/x"), None);
        assert_eq!(account_from_arn("nonsense"), None);
    }

    #[test]
    fn error_body_matches_the_reference_agent() {
        let e = UpstreamError {
            status: 404,
            code: "ResourceNotFoundException".into(),
            message: "no association".into(),
            request_id: Some("rid-1".into()),
        };
        assert_eq!(
            e.to_string(),
            "[rid-1]: (ResourceNotFoundException): no association, fault: client"
        );
        assert!(e.is_terminal());
        let e = UpstreamError {
            status: 503,
            code: "ServiceUnavailableException".into(),
            ..e
        };
        assert!(e.to_string().ends_with("fault: server"));
        assert!(!e.is_terminal());
    }

    #[test]
    fn both_services_codes_are_classified() {
        let e = |status, code: &str| UpstreamError {
            status,
            code: code.into(),
            message: String::new(),
            request_id: None,
        };
        assert!(
            e(429, "ThrottlingException").is_transient(),
            "EKS Auth throttling"
        );
        assert!(e(400, "Throttling").is_transient(), "STS throttling");
        assert!(e(503, "ServiceUnavailable").is_transient());
        assert!(!e(400, "InvalidTokenException").is_transient());
        assert!(e(400, "AccessDeniedException").is_terminal(), "EKS Auth");
        assert!(e(403, "AccessDenied").is_terminal(), "STS");
        assert!(!e(400, "Throttling").is_terminal());
    }
}
