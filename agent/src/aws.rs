//! The one way this program builds its AWS SDK configuration: the default chain for credentials
//! and region (environment, profile, `credential_process`, SSO, IMDS), an HTTPS client that
//! honours `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`, and the standard `AWS_ENDPOINT_URL_<SERVICE>`
//! and `AWS_USE_FIPS_ENDPOINT` variables. The daemon's EKS Auth client and the operator commands
//! both start here.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use aws_config::SdkConfig;
use aws_credential_types::{
    Credentials,
    credential_feature::AwsCredentialFeature,
    provider::{ProvideCredentials, error::CredentialsError, future},
};
use aws_types::request_id::RequestId as _;

/// How long an idle connection to an AWS endpoint is kept for reuse.
pub const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(20);

/// What the caller may set on top of the default chain.
#[derive(Clone, Debug, Default)]
pub struct AwsOptions {
    pub region: Option<String>,
    /// Endpoint of the one service this configuration is for (overrides the environment).
    pub endpoint: Option<String>,
    pub fips: bool,
    /// Sent in the User-Agent (`app/<name>`), so calls can be traced to a node or tool.
    pub app_name: Option<String>,
    /// Let the SDK retry on its own. Off for EKS Auth: the cache retries with its own deadline
    /// and budget, so one upstream attempt is one HTTP request.
    pub sdk_retries: bool,
    /// The daemon's own credentials, cached by it rather than the SDK (see [`NodeCredentials`]);
    /// `None`: the default chain with the SDK's cache (the operator commands).
    pub node_credentials: Option<NodeCredentials>,
}

/// The daemon's User-Agent application name (`app/pod-identity-agent-<node>`): calls can be
/// traced to a node.
pub fn app_name(node_name: Option<&str>) -> String {
    match node_name {
        Some(node) => format!("pod-identity-agent-{node}"),
        None => "pod-identity-agent".to_owned(),
    }
}

pub async fn sdk_config(options: &AwsOptions) -> anyhow::Result<SdkConfig> {
    use aws_smithy_http_client::{pool, proxy::ProxyConfig, tls};
    let pool = pool::ConnectionPool::builder()
        // After a burst (a node's pods starting together) hundreds of connections sit idle with
        // their buffers; calls later are minutes apart per pod, so keeping them saves little.
        .idle_timeout(IDLE_CONNECTION_TIMEOUT)
        .proxy_config(ProxyConfig::from_env())
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::AwsLc,
        ))
        .tls_context(tls_context()?)
        .build_https()
        .map_err(|e| anyhow::anyhow!("building the AWS HTTP client: {e}"))?;
    let http = pool::Client::new(&pool)
        .map_err(|e| anyhow::anyhow!("building the AWS HTTP client: {e}"))?;
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http);
    if !options.sdk_retries {
        loader = loader.retry_config(aws_config::retry::RetryConfig::disabled());
    }
    if let Some(region) = &options.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(endpoint) = &options.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    if options.fips {
        loader = loader.use_fips(true);
    }
    if let Some(app) = options
        .app_name
        .as_ref()
        .and_then(|a| aws_config::AppName::new(a.clone()).ok())
    {
        loader = loader.app_name(app);
    }
    if let Some(node) = &options.node_credentials {
        loader = loader
            .credentials_provider(node.clone())
            .identity_cache(aws_config::identity::IdentityCache::no_cache());
    }
    Ok(loader.load().await)
}

/// `AWS_CA_BUNDLE` (the AWS CLI's and other SDKs' variable): a PEM file of certificate
/// authorities trusted besides the system's (which `SSL_CERT_FILE` and `SSL_CERT_DIR` replace).
pub const CA_BUNDLE_ENV: &str = "AWS_CA_BUNDLE";

fn tls_context() -> anyhow::Result<aws_smithy_http_client::tls::TlsContext> {
    use aws_smithy_http_client::tls::{TlsContext, TrustStore};
    let mut store = TrustStore::empty().with_native_roots(true);
    if let Some(path) = std::env::var_os(CA_BUNDLE_ENV).filter(|p| !p.is_empty()) {
        let pem = std::fs::read(&path)
            .map_err(|e| anyhow::anyhow!("{CA_BUNDLE_ENV}={}: {e}", path.to_string_lossy()))?;
        store = store.with_pem_certificate(pem);
    }
    TlsContext::builder()
        .with_trust_store(store)
        .build()
        .map_err(|e| anyhow::anyhow!("{CA_BUNDLE_ENV}: {e}"))
}

/// The node's own credentials, from the default chain (environment, profile files with
/// `credential_process`, IMDS, ...), held here instead of in the SDK's identity cache so that
/// they can be dropped the moment a service rejects them: IMDS rotated the keys, or a hybrid
/// node's credentials file was rewritten. Reloading builds the chain anew, which re-reads the
/// profile files. Expiring credentials are reloaded 5 minutes before they expire; credentials
/// without an expiry (a credentials file) every 5 minutes.
#[derive(Clone, Debug, Default)]
pub struct NodeCredentials(Arc<NodeCredentialsState>);

#[derive(Debug, Default)]
struct NodeCredentialsState {
    /// The credentials and when they were loaded.
    cached: Mutex<Option<(Credentials, SystemTime)>>,
    /// Held while the chain loads: a burst of misses (start-up, a rejection) waits for one load
    /// instead of each running the chain (N IMDS logins, N credential_process runs).
    loading: tokio::sync::Mutex<()>,
}

const NODE_CREDENTIALS_MARGIN: Duration = Duration::from_secs(300);

/// Credentials that arrive with less than the margin left (a short-lived credential_process)
/// are still used, until they expire, for this long after loading, so calls do not reload them
/// back to back.
const NODE_CREDENTIALS_RELOAD_FLOOR: Duration = Duration::from_secs(5);

impl NodeCredentials {
    /// Drops what is cached: the next use loads anew.
    pub fn invalidate(&self) {
        *self.0.cached.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn cached(&self) -> Option<Credentials> {
        let now = SystemTime::now();
        let cached = self.0.cached.lock().unwrap_or_else(|e| e.into_inner());
        let (creds, loaded) = cached.as_ref()?;
        let age = now.duration_since(*loaded).unwrap_or_default();
        let fresh = match creds.expiry().map(|expiry| expiry.duration_since(now)) {
            Some(Ok(left)) => left > NODE_CREDENTIALS_MARGIN || age < NODE_CREDENTIALS_RELOAD_FLOOR,
            Some(Err(_expired)) => false,
            None => age < NODE_CREDENTIALS_MARGIN,
        };
        fresh.then(|| creds.clone())
    }

    /// The credentials: cached, or loaded from a new default chain, one load at a time.
    pub async fn get(&self) -> Result<Credentials, CredentialsError> {
        if let Some(creds) = self.cached() {
            return Ok(creds);
        }
        let _loading = self.0.loading.lock().await;
        if let Some(creds) = self.cached() {
            return Ok(creds);
        }
        let chain = aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
            .build()
            .await;
        let creds = chain.provide_credentials().await?;
        *self.0.cached.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((creds.clone(), SystemTime::now()));
        Ok(creds)
    }
}

impl ProvideCredentials for NodeCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(self.get())
    }
}

/// Where the default chain found a set of credentials, in an operator's words.
pub fn credential_source(credentials: &aws_credential_types::Credentials) -> &'static str {
    let features = credentials
        .get_property::<Vec<AwsCredentialFeature>>()
        .map(Vec::as_slice)
        .unwrap_or_default();
    // The last feature recorded is the provider that produced these credentials; earlier ones
    // are the sources it was configured from (e.g. a profile that assumes a role).
    match features.last() {
        Some(AwsCredentialFeature::CredentialsEnvVars) => {
            "environment variables (AWS_ACCESS_KEY_ID)"
        }
        Some(AwsCredentialFeature::CredentialsProfile) => {
            "a shared credentials or config file profile"
        }
        Some(
            AwsCredentialFeature::CredentialsProfileProcess
            | AwsCredentialFeature::CredentialsProcess,
        ) => "a credential_process in the config file",
        Some(AwsCredentialFeature::CredentialsImds) => "the instance metadata service (IMDS)",
        Some(AwsCredentialFeature::CredentialsHttp) => "a container credentials endpoint",
        Some(
            AwsCredentialFeature::CredentialsEnvVarsStsWebIdToken
            | AwsCredentialFeature::CredentialsProfileStsWebIdToken
            | AwsCredentialFeature::CredentialsStsAssumeRoleWebId,
        ) => "a web identity token (STS AssumeRoleWithWebIdentity)",
        Some(
            AwsCredentialFeature::CredentialsStsAssumeRole
            | AwsCredentialFeature::CredentialsProfileSourceProfile,
        ) => "a role assumed through STS",
        Some(
            AwsCredentialFeature::CredentialsSso | AwsCredentialFeature::CredentialsProfileSso,
        ) => "an SSO session",
        _ => "the default credential chain",
    }
}

/// A failed AWS API call, with what an operator needs to act on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub kind: ApiErrorKind,
    /// HTTP status of the service's answer (service errors only).
    pub status: Option<u16>,
    /// The service's error code (`AccessDeniedException`, ...) or a local one.
    pub code: String,
    pub message: String,
    pub request_id: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiErrorKind {
    /// The service answered with an error.
    Service,
    /// No answer in time.
    Timeout,
    /// The request never got an answer: DNS, connect, TLS, proxy, or node credentials.
    Unreachable,
    /// An answer that could not be read.
    BadResponse,
    /// The request could not be built or signed.
    Other,
}

pub fn api_error<E, R>(err: aws_smithy_runtime_api::client::result::SdkError<E, R>) -> ApiError
where
    E: aws_smithy_types::error::metadata::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + HttpStatus,
{
    use aws_smithy_runtime_api::client::result::SdkError;
    let local = |kind, code: &str, message: String| ApiError {
        kind,
        status: None,
        code: code.to_owned(),
        message,
        request_id: None,
    };
    match &err {
        SdkError::ServiceError(service) => ApiError {
            kind: ApiErrorKind::Service,
            status: Some(service.raw().status_code()),
            code: service.err().code().unwrap_or("UnknownError").to_owned(),
            message: service.err().message().unwrap_or("no message").to_owned(),
            request_id: service.err().meta().request_id().map(str::to_owned),
        },
        SdkError::TimeoutError(_) => {
            local(ApiErrorKind::Timeout, "Timeout", "no answer in time".into())
        }
        SdkError::DispatchFailure(failure) => local(
            ApiErrorKind::Unreachable,
            "Unreachable",
            with_proxy(error_chain(
                failure
                    .as_connector_error()
                    .map(|e| e as &dyn std::error::Error),
            )),
        ),
        SdkError::ResponseError(_) => local(
            ApiErrorKind::BadResponse,
            "InvalidResponse",
            error_chain(Some(&err)),
        ),
        _ => local(
            ApiErrorKind::Other,
            "RequestFailed",
            error_chain(Some(&err)),
        ),
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.kind, &self.request_id) {
            (ApiErrorKind::Service, Some(id)) => {
                write!(f, "{}: {} (request id {id})", self.code, self.message)
            }
            (ApiErrorKind::Service, None) => write!(f, "{}: {}", self.code, self.message),
            _ => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for ApiError {}

/// Lets [`api_error`] read the status of the raw HTTP response.
pub trait HttpStatus {
    fn status_code(&self) -> u16;
}

impl HttpStatus for aws_smithy_runtime_api::http::Response {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

/// A connection failure through an HTTPS proxy says "tunnel error"; name the proxy, without any
/// credentials its URL holds.
fn with_proxy(message: String) -> String {
    if !message.contains("tunnel") {
        return message;
    }
    let Some(proxy) = ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|p| !p.is_empty()))
    else {
        return message;
    };
    format!("{message} (through the proxy {})", without_userinfo(&proxy))
}

/// Remembers where the SDK sent the last request (`scheme://host[:port]`): the endpoint as the
/// SDK resolved it from the flags, the environment, the region and FIPS. One interceptor type
/// serves every service's client.
#[derive(Clone, Debug, Default)]
pub struct EndpointRecorder(Arc<Mutex<Option<String>>>);

impl EndpointRecorder {
    pub fn last(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl aws_smithy_runtime_api::client::interceptors::Intercept for EndpointRecorder {
    fn name(&self) -> &'static str {
        "EndpointRecorder"
    }

    fn read_before_transmit(
        &self,
        context: &aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef<'_>,
        _components: &aws_smithy_runtime_api::client::runtime_components::RuntimeComponents,
        _cfg: &mut aws_smithy_types::config_bag::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        if let Ok(uri) = context.request().uri().parse::<http::Uri>() {
            let origin = format!(
                "{}://{}",
                uri.scheme_str().unwrap_or("https"),
                uri.authority().map(|a| a.as_str()).unwrap_or("")
            );
            *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(origin);
        }
        Ok(())
    }
}

/// A service client that needs a region, which can come from IMDS, and IMDS may not answer yet
/// when the agent starts: until a region is found, [`RegionalClient::get`] says why there is no
/// client, and the configuration is looked for again at most every [`REGION_RETRY`].
pub struct RegionalClient<C> {
    options: AwsOptions,
    build: fn(&SdkConfig, &EndpointRecorder) -> C,
    endpoint: EndpointRecorder,
    state: tokio::sync::Mutex<ClientState<C>>,
}

enum ClientState<C> {
    Ready {
        client: C,
        region: String,
    },
    /// No region yet: why, and when it was last looked for.
    NoRegion {
        since: tokio::time::Instant,
        why: String,
    },
}

/// How often a missing region is looked for again.
pub const REGION_RETRY: Duration = Duration::from_secs(2);

impl<C: Clone> RegionalClient<C> {
    /// Builds the client from the default chain now if a region is found; `build` makes the
    /// service client from the SDK configuration, with `endpoint` as an interceptor.
    pub async fn new(
        options: AwsOptions,
        build: fn(&SdkConfig, &EndpointRecorder) -> C,
        service: &str,
    ) -> anyhow::Result<RegionalClient<C>> {
        let placeholder = ClientState::NoRegion {
            since: tokio::time::Instant::now(),
            why: String::new(),
        };
        let client = RegionalClient {
            options,
            build,
            endpoint: EndpointRecorder::default(),
            state: tokio::sync::Mutex::new(placeholder),
        };
        let state = Self::load(&client.options, build, &client.endpoint).await?;
        if let ClientState::NoRegion { why, .. } = &state {
            tracing::warn!(
                "{why}; {service} calls fail until it is found (looked for again every {REGION_RETRY:?})"
            );
        }
        *client.state.lock().await = state;
        Ok(client)
    }

    async fn load(
        options: &AwsOptions,
        build: fn(&SdkConfig, &EndpointRecorder) -> C,
        endpoint: &EndpointRecorder,
    ) -> anyhow::Result<ClientState<C>> {
        let config = sdk_config(options).await?;
        Ok(match config.region() {
            Some(region) => ClientState::Ready {
                client: build(&config, endpoint),
                region: region.to_string(),
            },
            None => ClientState::NoRegion {
                since: tokio::time::Instant::now(),
                why: "no AWS region found (--region, AWS_REGION, the profile and IMDS gave none)"
                    .to_owned(),
            },
        })
    }

    /// The client, or why there is none yet.
    pub async fn get(&self) -> Result<C, String> {
        let mut state = self.state.lock().await;
        if let ClientState::NoRegion { since, .. } = &*state
            && since.elapsed() >= REGION_RETRY
        {
            match Self::load(&self.options, self.build, &self.endpoint).await {
                Ok(loaded) => *state = loaded,
                Err(e) => tracing::warn!("cannot build the AWS client: {e:#}"),
            }
            if let ClientState::Ready { region, .. } = &*state {
                tracing::info!(region = %region, "AWS region found; upstream calls can start");
            }
        }
        match &*state {
            ClientState::Ready { client, .. } => Ok(client.clone()),
            ClientState::NoRegion { why, .. } => Err(why.clone()),
        }
    }

    /// The region the client signs for (`None` until found).
    pub async fn region(&self) -> Option<String> {
        match &*self.state.lock().await {
            ClientState::Ready { region, .. } => Some(region.clone()),
            ClientState::NoRegion { .. } => None,
        }
    }

    /// Where the last call went (`https://eks-auth.us-west-2.api.aws`), once a call was made.
    pub fn last_endpoint(&self) -> Option<String> {
        self.endpoint.last()
    }
}

/// A URL without the `user:password@` part.
fn without_userinfo(url: &str) -> String {
    let shown = match url.split_once("://") {
        Some((scheme, rest)) => format!(
            "{scheme}://{}",
            rest.rsplit_once('@').map_or(rest, |(_, host)| host)
        ),
        None => url
            .rsplit_once('@')
            .map_or(url, |(_, host)| host)
            .to_owned(),
    };
    shown.trim_end_matches('/').to_owned()
}

/// An error and its sources, joined: `a: b: c`.
pub fn error_chain(err: Option<&dyn std::error::Error>) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = err;
    while let Some(e) = next {
        let text = e.to_string();
        // Wrappers often repeat their source's text; say each thing once.
        if !parts.last().is_some_and(|last| last.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    if parts.is_empty() {
        "unknown error".into()
    } else {
        parts.join(": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_are_shown_without_credentials() {
        assert_eq!(
            without_userinfo("http://user:secret@proxy.corp:3128/"),
            "http://proxy.corp:3128"
        );
        assert_eq!(without_userinfo("http://127.0.0.1:1"), "http://127.0.0.1:1");
        assert_eq!(without_userinfo("user:pw@proxy:8080"), "proxy:8080");
    }
}
