//! Pod credentials and their wire format.

use std::{
    fmt,
    time::{SystemTime, UNIX_EPOCH},
};

use aws_smithy_types::date_time::{DateTime, Format};
use sha2::{Digest as _, Sha256};

#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub account_id: String,
    pub expiration: SystemTime,
}

impl fmt::Debug for Credentials {
    // Secrets never reach a log line, even through {:?}.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("session_token", &"<redacted>")
            .field("account_id", &self.account_id)
            .field("expiration", &expiration_string(self.expiration))
            .finish()
    }
}

/// RFC 3339 in UTC with a literal `Z` and whole seconds: the Rust and JS SDKs reject `+00:00`.
pub fn expiration_string(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    DateTime::from_secs(secs as i64)
        .fmt(Format::DateTime)
        .unwrap_or_default()
}

impl Credentials {
    /// The body unmodified AWS SDKs expect from a container credentials endpoint.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "AccessKeyId": self.access_key_id,
            "SecretAccessKey": self.secret_access_key,
            "Token": self.session_token,
            "AccountId": self.account_id,
            "Expiration": expiration_string(self.expiration),
        }))
        .expect("a JSON object of strings always serialises")
    }
}

/// SHA-256 of a token: the cache key, so raw tokens are never kept as keys.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenDigest([u8; 32]);

impl TokenDigest {
    pub fn of(token: &str) -> TokenDigest {
        TokenDigest(Sha256::digest(token.as_bytes()).into())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn creds() -> Credentials {
        Credentials {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: "secret-key".into(),
            session_token: "session-token".into(),
            account_id: "123456789012".into(),
            expiration: UNIX_EPOCH + Duration::from_secs(1_795_950_000),
        }
    }

    #[test]
    fn json_matches_the_sdk_contract() {
        let v: serde_json::Value = serde_json::from_slice(&creds().to_json()).unwrap();
        assert_eq!(v["AccessKeyId"], "ASIAEXAMPLE");
        assert_eq!(v["SecretAccessKey"], "secret-key");
        assert_eq!(v["Token"], "session-token");
        assert_eq!(v["AccountId"], "123456789012");
        assert_eq!(v["Expiration"], "2026-11-29T11:00:00Z");
        assert_eq!(v.as_object().unwrap().len(), 5);
    }

    #[test]
    fn expiration_drops_subseconds_and_ends_in_z() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_950_000_250);
        assert_eq!(expiration_string(t), "2026-11-29T11:00:00Z");
    }

    #[test]
    fn debug_redacts_secrets() {
        let s = format!("{:?}", creds());
        assert!(
            !s.contains("secret-key") && !s.contains("session-token"),
            "{s}"
        );
    }
}
