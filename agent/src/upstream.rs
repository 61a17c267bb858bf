//! The EKS Auth API (`AssumeRoleForPodIdentity`), called with the node's own credentials.
//!
//! The SDK's own retries are off: the cache retries with its own deadline and budget, so one
//! upstream call means one HTTP request to EKS Auth.

use std::{fmt, future::Future, time::SystemTime};

use aws_sdk_eksauth::{error::SdkError, operation::RequestId as _};

use crate::credentials::Credentials;

/// What a successful exchange yields: the pod's credentials and who they are for.
#[derive(Clone, Debug)]
pub struct AssumedRole {
    pub credentials: Credentials,
    pub role_arn: String,
    pub association_id: String,
    /// EKS Auth's request id, for logs.
    pub request_id: Option<String>,
    /// The response body, serialised once: every cached answer hands out the same bytes.
    body: std::sync::OnceLock<bytes::Bytes>,
}

impl AssumedRole {
    pub fn new(credentials: Credentials, role_arn: String, association_id: String, request_id: Option<String>) -> AssumedRole {
        AssumedRole { credentials, role_arn, association_id, request_id, body: std::sync::OnceLock::new() }
    }

    /// The credentials in the SDK wire format.
    pub fn body(&self) -> bytes::Bytes {
        self.body.get_or_init(|| bytes::Bytes::from(self.credentials.to_json())).clone()
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

/// Exchanges a pod's token for credentials. [`EksAuth`] in production; a scripted fake in the
/// cache's unit tests.
pub trait Upstream: Send + Sync + 'static {
    fn assume_role(&self, token: &str) -> impl Future<Output = Result<AssumedRole, UpstreamError>> + Send;
}

impl UpstreamError {
    /// The call did not finish within its deadline (retries included).
    pub fn timeout(deadline: std::time::Duration) -> UpstreamError {
        UpstreamError {
            status: 504,
            code: "UpstreamTimeout".into(),
            message: format!("EKS Auth did not answer within {deadline:?} (retries included)"),
            request_id: None,
        }
    }

    /// The node-wide upstream budget (--upstream-qps/--upstream-burst) had no room in time.
    pub fn budget_exhausted() -> UpstreamError {
        UpstreamError {
            status: 429,
            code: "UpstreamBudgetExhausted".into(),
            message: "the node's EKS Auth call budget (--upstream-qps, --upstream-burst) is used up; retry shortly".into(),
            request_id: None,
        }
    }

    /// The pod's own upstream budget (--pod-upstream-qps/--pod-upstream-burst) is used up: it asked
    /// for credentials for too many distinct tokens too fast.
    pub fn pod_budget_exhausted(pod: &str) -> UpstreamError {
        UpstreamError {
            status: 429,
            code: "PodUpstreamBudgetExhausted".into(),
            message: format!("pod {pod} presented too many new tokens too fast (--pod-upstream-qps, --pod-upstream-burst); retry shortly"),
            request_id: None,
        }
    }

    /// Worth another attempt: throttling, server errors, network failures and timeouts.
    pub fn is_transient(&self) -> bool {
        self.status == 429 || self.status >= 500
    }

    /// Errors that a retry with the same token cannot fix.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self.code.as_str(),
            "AccessDeniedException" | "ExpiredTokenException" | "InvalidTokenException" | "ResourceNotFoundException"
        )
    }

    fn fault(&self) -> &'static str {
        if (400..500).contains(&self.status) { "client" } else { "server" }
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

pub struct EksAuth {
    client: aws_sdk_eksauth::Client,
    cluster_name: String,
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
}

impl EksAuth {
    /// Builds the client from the default AWS configuration chain (environment, profile, IMDS).
    /// `AWS_ENDPOINT_URL_EKS_AUTH` and `AWS_USE_FIPS_ENDPOINT` are honoured by the chain; the
    /// HTTP client honours `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`.
    pub async fn new(options: EksAuthOptions) -> anyhow::Result<EksAuth> {
        use aws_smithy_http_client::{pool, proxy::ProxyConfig, tls};
        let pool = pool::ConnectionPool::builder()
            .proxy_config(ProxyConfig::from_env())
            .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::AwsLc))
            .build_https()
            .map_err(|e| anyhow::anyhow!("building the EKS Auth HTTP client: {e}"))?;
        let http = pool::Client::new(&pool).map_err(|e| anyhow::anyhow!("building the EKS Auth HTTP client: {e}"))?;
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(http)
            .retry_config(aws_config::retry::RetryConfig::disabled());
        if let Some(region) = options.region {
            loader = loader.region(aws_config::Region::new(region));
        }
        if let Some(endpoint) = options.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if options.fips {
            loader = loader.use_fips(true);
        }
        let app = match &options.node_name {
            Some(node) => format!("pod-identity-agent-{node}"),
            None => "pod-identity-agent".to_owned(),
        };
        if let Ok(app) = aws_config::AppName::new(app) {
            loader = loader.app_name(app);
        }
        let config = loader.load().await;
        Ok(EksAuth { client: aws_sdk_eksauth::Client::new(&config), cluster_name: options.cluster_name })
    }
}

impl Upstream for EksAuth {
    async fn assume_role(&self, token: &str) -> Result<AssumedRole, UpstreamError> {
        let out = self
            .client
            .assume_role_for_pod_identity()
            .cluster_name(&self.cluster_name)
            .token(token)
            .send()
            .await
            .map_err(map_sdk_error)?;
        let malformed = |what: &str| UpstreamError {
            status: 502,
            code: "InvalidUpstreamResponse".into(),
            message: format!("EKS Auth response has no {what}"),
            request_id: out.request_id().map(str::to_owned),
        };
        let creds = out.credentials().ok_or_else(|| malformed("credentials"))?;
        let role = out.assumed_role_user().ok_or_else(|| malformed("assumedRoleUser"))?;
        let expiration = SystemTime::try_from(*creds.expiration()).map_err(|_| malformed("valid expiration"))?;
        Ok(AssumedRole::new(
            Credentials {
                access_key_id: creds.access_key_id().to_owned(),
                secret_access_key: creds.secret_access_key().to_owned(),
                session_token: creds.session_token().to_owned(),
                account_id: account_from_arn(role.arn()).unwrap_or_default().to_owned(),
                expiration,
            },
            role.arn().to_owned(),
            out.pod_identity_association().map(|a| a.association_id().to_owned()).unwrap_or_default(),
            out.request_id().map(str::to_owned),
        ))
    }
}

/// The account field of an ARN (`arn:partition:service:region:account:resource`).
pub fn account_from_arn(arn: &str) -> Option<&str> {
    let account = arn.split(':').nth(4)?;
    (account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit())).then_some(account)
}

fn map_sdk_error<E, R>(err: SdkError<E, R>) -> UpstreamError
where
    E: aws_sdk_eksauth::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: fmt::Debug + HttpStatus,
{
    match &err {
        SdkError::ServiceError(service) => UpstreamError {
            status: service.raw().status_code(),
            code: service.err().code().unwrap_or("UnknownError").to_owned(),
            message: service.err().message().unwrap_or("no message").to_owned(),
            request_id: service.err().meta().request_id().map(str::to_owned),
        },
        SdkError::TimeoutError(_) => UpstreamError {
            status: 504,
            code: "UpstreamTimeout".into(),
            message: "EKS Auth did not answer in time".into(),
            request_id: None,
        },
        SdkError::DispatchFailure(failure) => UpstreamError {
            status: 502,
            code: "UpstreamUnreachable".into(),
            message: format!("could not reach EKS Auth: {}", error_chain(failure.as_connector_error().map(|e| e as &dyn std::error::Error))),
            request_id: None,
        },
        SdkError::ResponseError(_) => UpstreamError {
            status: 502,
            code: "InvalidUpstreamResponse".into(),
            message: "EKS Auth sent a response that could not be read".into(),
            request_id: None,
        },
        _ => UpstreamError {
            status: 500,
            code: "UpstreamRequestFailed".into(),
            message: format!("could not call EKS Auth: {}", error_chain(Some(&err))),
            request_id: None,
        },
    }
}

/// Lets [`map_sdk_error`] read the status of the raw HTTP response.
pub trait HttpStatus {
    fn status_code(&self) -> u16;
}

impl HttpStatus for aws_sdk_eksauth::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

fn error_chain(err: Option<&dyn std::error::Error>) -> String {
    let mut parts = Vec::new();
    let mut next = err;
    while let Some(e) = next {
        parts.push(e.to_string());
        next = e.source();
    }
    if parts.is_empty() { "unknown error".into() } else { parts.join(": ") }
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
        assert_eq!(e.to_string(), "[rid-1]: (ResourceNotFoundException): no association, fault: client");
        assert!(e.is_terminal());
        let e = UpstreamError { status: 503, code: "ServiceUnavailableException".into(), ..e };
        assert!(e.to_string().ends_with("fault: server"));
        assert!(!e.is_terminal());
    }
}
