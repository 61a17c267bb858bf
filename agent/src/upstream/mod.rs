//! What a credential source is to the cache: a pod's token in, the pod's credentials (or an
//! error shaped for the pod) out. The sources themselves live in `eks_auth` and `sts`; the
//! cache sees only [`Upstream`].
//!
//! The SDKs' own retries are off in every source: the cache retries with its own deadline and
//! budget, so one upstream call means one HTTP request.

mod error;
mod node_signed;

use std::{fmt, future::Future, time::SystemTime};

pub use self::{
    error::{UpstreamError, map_sdk_error},
    node_signed::NodeSigned,
};
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
    /// How the session is scoped, when the source knows (sts); EKS Auth does not say.
    pub scope: Option<SessionScope>,
    /// The upstream's request id, for logs.
    pub request_id: Option<String>,
}

/// What a pod's session carries besides its role: EKS's session tags, or a session policy that
/// scopes it down (an association's `disableSessionTags` and `policy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionScope {
    /// EKS's session tags are set (and the association's own).
    pub tags: bool,
    /// A session policy scopes the session down.
    pub policy: bool,
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
            scope: None,
            request_id,
        }
    }

    /// The same, with the session's scope known.
    pub fn with_scope(self, scope: SessionScope) -> AssumedRole {
        AssumedRole {
            scope: Some(scope),
            ..self
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

/// What a source's precheck could say of a token it did not refuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checked {
    /// Signed by the cluster's issuer, for the audience, current: its claims are the issuer's.
    Verified,
    /// Not judged here (the source has no keys to judge it with); the upstream call will.
    Unchecked,
}

/// Exchanges a pod's token for credentials: `source::CredentialSource` in production (EKS Auth
/// or STS); a scripted fake in the cache's unit tests.
pub trait Upstream: Send + Sync + 'static {
    fn assume_role(
        &self,
        token: &str,
    ) -> impl Future<Output = Result<AssumedRole, UpstreamError>> + Send;

    /// Refuses a token the source can judge without calling AWS, before any of the node's
    /// budget is spent on it (a pod flooding forged tokens must not starve its neighbours), and
    /// says whether the token was verified (its signature, issuer, audience and expiry) or only
    /// left for `assume_role` to judge. `assume_role` still checks everything on its own.
    fn precheck(
        &self,
        _token: &str,
    ) -> impl Future<Output = Result<Checked, UpstreamError>> + Send {
        std::future::ready(Ok(Checked::Unchecked))
    }

    /// The service called, in operators' words (`EKS Auth`, `STS`), for logs and messages.
    fn name(&self) -> &'static str;
}

/// The account field of an ARN (`arn:partition:service:region:account:resource`).
pub fn account_from_arn(arn: &str) -> Option<&str> {
    let account = arn.split(':').nth(4)?;
    (account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit())).then_some(account)
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
}
