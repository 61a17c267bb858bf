//! How a credential source's failure reaches the pod: a status, a code and a message, in the
//! reference agent's body format.

use std::fmt;

use aws_smithy_runtime_api::client::result::SdkError;

use crate::aws::ApiErrorKind;

/// An upstream failure, shaped the way the reference agent passes it on to the pod. Built only
/// through its constructors, each of which names one way a call can fail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamError {
    /// HTTP status for the pod: the upstream status, 502 for network failures, 504 for timeouts.
    status: u16,
    /// The service's error code (`ResourceNotFoundException`, ...) or a local one.
    code: String,
    /// What the pod is told: a code's sentence, never the agent's own configuration.
    message: String,
    /// What only the log is told (an error chain that may name files, hosts or a helper's
    /// output).
    detail: Option<String>,
    request_id: Option<String>,
}

impl UpstreamError {
    /// The service's own answer (or a source's local stand-in for it, with the service's code).
    pub fn answered(
        status: u16,
        code: impl Into<String>,
        message: impl Into<String>,
        request_id: Option<String>,
    ) -> UpstreamError {
        UpstreamError {
            status,
            code: code.into(),
            message: message.into(),
            detail: None,
            request_id,
        }
    }

    /// The token was refused as EKS Auth refuses one (400 `InvalidTokenException`).
    pub fn invalid_token(message: impl Into<String>) -> UpstreamError {
        UpstreamError::answered(400, "InvalidTokenException", message, None)
    }

    /// The token has expired (400 `ExpiredTokenException`, as EKS Auth says it).
    pub fn expired_token(message: impl Into<String>) -> UpstreamError {
        UpstreamError::answered(400, "ExpiredTokenException", message, None)
    }

    /// The service account has no association (404 `ResourceNotFoundException`).
    pub fn no_association(message: impl Into<String>) -> UpstreamError {
        UpstreamError::answered(404, "ResourceNotFoundException", message, None)
    }

    /// The issuer's keys could not be had, so no token can be verified (`why`).
    pub fn issuer_keys_unavailable(why: impl fmt::Display) -> UpstreamError {
        UpstreamError::answered(
            502,
            "IssuerKeysUnavailable",
            "cannot verify service-account tokens: the issuer's keys are unavailable",
            None,
        )
        .with_detail(why)
    }

    /// The agent stopped before the call finished.
    pub fn shutting_down() -> UpstreamError {
        UpstreamError::answered(503, "AgentShuttingDown", "the agent is shutting down", None)
    }

    /// The service refused the node's own credentials (`code`: `message`), which are reloaded.
    pub fn node_credentials_rejected(
        service: &str,
        code: &str,
        message: &str,
        request_id: Option<String>,
    ) -> UpstreamError {
        UpstreamError::answered(
            502,
            "NodeCredentialsRejected",
            format!(
                "{service} refused the node's own credentials ({code}: {message}); they are reloaded"
            ),
            request_id,
        )
    }

    /// `service` answered without `what` (its request id kept for the logs).
    pub fn malformed(service: &str, what: &str, request_id: Option<&str>) -> UpstreamError {
        UpstreamError::answered(
            502,
            "InvalidUpstreamResponse",
            format!("{service} response has no {what}"),
            request_id.map(str::to_owned),
        )
    }

    /// The call did not finish within its deadline (retries included).
    pub fn timeout(upstream: &str, deadline: std::time::Duration) -> UpstreamError {
        UpstreamError::answered(
            504,
            "UpstreamTimeout",
            format!("{upstream} did not answer within {deadline:?} (retries included)"),
            None,
        )
    }

    /// The node-wide upstream budget (--upstream-qps/--upstream-burst) had no room in time.
    pub fn budget_exhausted(upstream: &str) -> UpstreamError {
        UpstreamError::answered(
            429,
            "UpstreamBudgetExhausted",
            format!(
                "the node's {upstream} call budget (--upstream-qps, --upstream-burst) is used up; retry shortly"
            ),
            None,
        )
    }

    /// The node's own credentials could not be had: named as such (the SDK would only say it
    /// could not sign).
    pub fn node_credentials_unavailable(e: &dyn std::error::Error) -> UpstreamError {
        UpstreamError::answered(
            502,
            "NodeCredentialsUnavailable",
            "the node's own AWS credentials are unavailable to the agent",
            None,
        )
        .with_detail(crate::aws::error_chain(Some(e)))
    }

    /// No region for the client yet (`why`).
    pub fn no_region(why: String) -> UpstreamError {
        UpstreamError::answered(
            502,
            "NodeRegionUnavailable",
            format!("{why}: is IMDS reachable from the node? set AWS_REGION or --region otherwise"),
            None,
        )
    }

    /// The pod's own upstream budget (--pod-upstream-qps/--pod-upstream-burst) is used up: it asked
    /// for credentials for too many distinct tokens too fast.
    pub fn pod_budget_exhausted(pod: &str) -> UpstreamError {
        UpstreamError::answered(
            429,
            "PodUpstreamBudgetExhausted",
            format!(
                "pod {pod} presented too many new tokens too fast (--pod-upstream-qps, --pod-upstream-burst); retry shortly"
            ),
            None,
        )
    }

    /// The same error, with `detail` for the log only.
    pub fn with_detail(mut self, detail: impl fmt::Display) -> UpstreamError {
        self.detail = Some(detail.to_string());
        self
    }

    /// What the log is told beyond the message, if anything.
    pub fn detail(&self) -> Option<&str> {
        self.detail.as_deref()
    }

    /// The same error, its message prefixed with what was being done (`what: message`).
    pub fn context(mut self, what: impl fmt::Display) -> UpstreamError {
        self.message = format!("{what}: {}", self.message);
        self
    }

    /// The HTTP status the pod gets.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The service's error code, or the agent's own (`UpstreamTimeout`, ...).
    pub fn code(&self) -> &str {
        &self.code
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    /// The service's request id, when it answered.
    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }

    /// Whether the source accepted the token although it gave no credentials: it found the
    /// token valid and its service account without an association. Its names may be recorded.
    pub fn token_accepted(&self) -> bool {
        self.code == "ResourceNotFoundException"
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

impl std::error::Error for UpstreamError {}

/// An SDK call's failure, for the pod: the service's own status and code when it answered, else
/// a local code that names `service` and what went wrong on the way.
pub fn map_sdk_error<E, R>(service: &str, err: SdkError<E, R>) -> UpstreamError
where
    E: aws_smithy_types::error::metadata::ProvideErrorMetadata + std::error::Error + 'static,
    R: fmt::Debug + crate::aws::HttpStatus,
{
    let e = crate::aws::api_error(err);
    let (status, code, message, detail) = match e.kind {
        ApiErrorKind::Service => (e.status.unwrap_or(502), e.code, e.message, None),
        ApiErrorKind::Timeout => (
            504,
            "UpstreamTimeout".into(),
            format!("{service} did not answer in time"),
            None,
        ),
        // How the agent failed to reach the service names its proxy, endpoint and network: the
        // log's business, not the pod's.
        ApiErrorKind::Unreachable => (
            502,
            "UpstreamUnreachable".into(),
            format!("could not reach {service}"),
            Some(e.message),
        ),
        ApiErrorKind::BadResponse => (
            502,
            "InvalidUpstreamResponse".into(),
            format!("{service} sent a response that could not be read"),
            None,
        ),
        ApiErrorKind::Other => (
            500,
            "UpstreamRequestFailed".into(),
            format!("could not call {service}"),
            Some(e.message),
        ),
    };
    let error = UpstreamError::answered(status, code, message, e.request_id);
    match detail {
        Some(detail) => error.with_detail(detail),
        None => error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_matches_the_reference_agent() {
        let e = UpstreamError::answered(
            404,
            "ResourceNotFoundException",
            "no association",
            Some("rid-1".into()),
        );
        assert_eq!(
            e.to_string(),
            "[rid-1]: (ResourceNotFoundException): no association, fault: client"
        );
        assert!(e.is_terminal());
        let e = UpstreamError::answered(503, "ServiceUnavailableException", "m", None);
        assert!(e.to_string().ends_with("fault: server"));
        assert!(!e.is_terminal());
    }

    #[test]
    fn both_services_codes_are_classified() {
        let e = |status, code: &str| UpstreamError::answered(status, code, "", None);
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
