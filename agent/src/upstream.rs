//! The EKS Auth API (`AssumeRoleForPodIdentity`), called with the node's own credentials.
//!
//! The SDK's own retries are off: the cache retries with its own deadline and budget, so one
//! upstream call means one HTTP request to EKS Auth.

use std::{fmt, future::Future, time::SystemTime};

use aws_sdk_eksauth::{error::SdkError, operation::RequestId as _};

use crate::aws::{ApiErrorKind, NodeCredentials};

use crate::credentials::Credentials;

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
    pub fn new(credentials: Credentials, role_arn: String, association_id: String, request_id: Option<String>) -> AssumedRole {
        AssumedRole { body: bytes::Bytes::from(credentials.to_json()), expiration: credentials.expiration, role_arn, association_id, request_id }
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
            .field("expiration", &crate::credentials::expiration_string(self.expiration))
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
    options: EksAuthOptions,
    node: NodeCredentials,
    endpoint: EndpointRecorder,
    /// The client, once the region is known: it can come from IMDS, which may not answer yet
    /// when the agent starts, so it is looked for again until it does.
    client: tokio::sync::Mutex<Client>,
}

enum Client {
    Ready(aws_sdk_eksauth::Client),
    /// No region yet: why, and when it was last looked for.
    NoRegion { since: tokio::time::Instant, why: String },
}

/// How often a missing region is looked for again.
const REGION_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// Remembers where the SDK sent the last request (`scheme://host[:port]`): the endpoint as the
/// SDK resolved it from the flags, the environment, the region and FIPS.
#[derive(Clone, Debug, Default)]
struct EndpointRecorder(std::sync::Arc<std::sync::Mutex<Option<String>>>);

impl aws_sdk_eksauth::config::Intercept for EndpointRecorder {
    fn name(&self) -> &'static str {
        "EndpointRecorder"
    }

    fn read_before_transmit(
        &self,
        context: &aws_sdk_eksauth::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _components: &aws_sdk_eksauth::config::RuntimeComponents,
        _cfg: &mut aws_sdk_eksauth::config::ConfigBag,
    ) -> Result<(), aws_sdk_eksauth::error::BoxError> {
        if let Ok(uri) = context.request().uri().parse::<http::Uri>() {
            let origin = format!("{}://{}", uri.scheme_str().unwrap_or("https"), uri.authority().map(|a| a.as_str()).unwrap_or(""));
            *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(origin);
        }
        Ok(())
    }
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
    /// HTTP client honours `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` and `AWS_CA_BUNDLE`. Without a
    /// region yet (IMDS not answering), calls fail with that reason until one is found.
    pub async fn new(options: EksAuthOptions) -> anyhow::Result<EksAuth> {
        let auth = EksAuth {
            options,
            node: NodeCredentials::default(),
            endpoint: EndpointRecorder::default(),
            client: tokio::sync::Mutex::new(Client::NoRegion { since: tokio::time::Instant::now(), why: String::new() }),
        };
        let client = auth.build().await?;
        if let Client::NoRegion { why, .. } = &client {
            tracing::warn!("{why}; EKS Auth calls fail until it is found (looked for again every {REGION_RETRY:?})");
        }
        *auth.client.lock().await = client;
        Ok(auth)
    }

    async fn build(&self) -> anyhow::Result<Client> {
        let o = &self.options;
        let config = crate::aws::sdk_config(&crate::aws::AwsOptions {
            region: o.region.clone(),
            endpoint: o.endpoint.clone(),
            fips: o.fips,
            app_name: Some(match &o.node_name {
                Some(node) => format!("pod-identity-agent-{node}"),
                None => "pod-identity-agent".to_owned(),
            }),
            sdk_retries: false,
            node_credentials: Some(self.node.clone()),
        })
        .await?;
        if config.region().is_none() {
            return Ok(Client::NoRegion {
                since: tokio::time::Instant::now(),
                why: "no AWS region found (--region, AWS_REGION, the profile and IMDS gave none)".to_owned(),
            });
        }
        let client_config = aws_sdk_eksauth::config::Builder::from(&config).interceptor(self.endpoint.clone()).build();
        Ok(Client::Ready(aws_sdk_eksauth::Client::from_conf(client_config)))
    }

    /// The client, or why there is none yet.
    async fn client(&self) -> Result<aws_sdk_eksauth::Client, UpstreamError> {
        let mut client = self.client.lock().await;
        if let Client::NoRegion { since, .. } = &*client
            && since.elapsed() >= REGION_RETRY
        {
            match self.build().await {
                Ok(built) => *client = built,
                Err(e) => tracing::warn!("cannot build the EKS Auth client: {e:#}"),
            }
            if matches!(&*client, Client::Ready(_)) {
                tracing::info!(region = ?self.region_of(&client), "AWS region found; EKS Auth calls can start");
            }
        }
        match &*client {
            Client::Ready(c) => Ok(c.clone()),
            Client::NoRegion { why, .. } => Err(UpstreamError {
                status: 502,
                code: "NodeRegionUnavailable".into(),
                message: format!("{why}: is IMDS reachable from the node? set AWS_REGION or --region otherwise"),
                request_id: None,
            }),
        }
    }

    fn region_of(&self, client: &Client) -> Option<String> {
        match client {
            Client::Ready(c) => c.config().region().map(ToString::to_string),
            Client::NoRegion { .. } => None,
        }
    }

    /// Where the last call went (`https://eks-auth.us-west-2.api.aws`), once a call was made.
    pub fn last_endpoint(&self) -> Option<String> {
        self.endpoint.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The region the client signs for, as the chain resolved it (`None` until found).
    pub async fn region(&self) -> Option<String> {
        self.region_of(&*self.client.lock().await)
    }
}

/// EKS Auth's answers that mean the node's own credentials were refused (HTTP 403), as opposed
/// to the pod's token (400): the keys rotated, expired, or were replaced on disk.
fn node_credentials_rejected(e: &UpstreamError) -> bool {
    e.status == 403
        && matches!(
            e.code.as_str(),
            "UnrecognizedClientException"
                | "InvalidSignatureException"
                | "ExpiredTokenException"
                | "InvalidClientTokenId"
                | "SignatureDoesNotMatch"
                | "IncompleteSignature"
                | "MissingAuthenticationTokenException"
        )
}

impl Upstream for EksAuth {
    async fn assume_role(&self, token: &str) -> Result<AssumedRole, UpstreamError> {
        let client = self.client().await?;
        // Credentials first, so that their failure is named as such (the SDK would only say it
        // could not sign).
        self.node.get().await.map_err(|e| UpstreamError {
            status: 502,
            code: "NodeCredentialsUnavailable".into(),
            message: format!("cannot get the node's own AWS credentials: {}", crate::aws::error_chain(Some(&e))),
            request_id: None,
        })?;
        let out = match client.assume_role_for_pod_identity().cluster_name(&self.options.cluster_name).token(token).send().await {
            Ok(out) => out,
            Err(e) => {
                let e = map_sdk_error(e);
                if node_credentials_rejected(&e) {
                    // Reloaded for the next attempt, which the cache makes: a transient error.
                    self.node.invalidate();
                    return Err(UpstreamError {
                        status: 502,
                        code: "NodeCredentialsRejected".into(),
                        message: format!("EKS Auth refused the node's own credentials ({}: {}); they are reloaded", e.code, e.message),
                        request_id: e.request_id,
                    });
                }
                return Err(e);
            }
        };
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
    R: fmt::Debug + crate::aws::HttpStatus,
{
    let e = crate::aws::api_error(err);
    let (status, code, message) = match e.kind {
        ApiErrorKind::Service => (e.status.unwrap_or(502), e.code, e.message),
        ApiErrorKind::Timeout => (504, "UpstreamTimeout".into(), "EKS Auth did not answer in time".into()),
        ApiErrorKind::Unreachable => (502, "UpstreamUnreachable".into(), format!("could not reach EKS Auth: {}", e.message)),
        ApiErrorKind::BadResponse => (502, "InvalidUpstreamResponse".into(), "EKS Auth sent a response that could not be read".into()),
        ApiErrorKind::Other => (500, "UpstreamRequestFailed".into(), format!("could not call EKS Auth: {}", e.message)),
    };
    UpstreamError { status, code, message, request_id: e.request_id }
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
