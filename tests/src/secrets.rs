//! Every secret the tests create: tokens, secret keys, session tokens, the node's own key. Each
//! agent's log is checked against them when its `Agent` is dropped, so the whole end-to-end
//! suite doubles as a scan for leaked secrets.

use std::sync::Mutex;

static SECRETS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Remembers `secret` (and, for a JWT, its signature alone, which is secret on its own).
pub fn remember(secret: &str) {
    let mut all = SECRETS.lock().unwrap();
    all.push(secret.to_owned());
    if let Some(signature) = secret
        .rsplit('.')
        .next()
        .filter(|s| s.len() >= 32 && *s != secret)
    {
        all.push(signature.to_owned());
    }
}

/// The first remembered secret that occurs in `text`, shown only by its first characters.
pub fn leaked_in(text: &str) -> Option<String> {
    let all = SECRETS.lock().unwrap();
    all.iter()
        .find(|s| text.contains(s.as_str()))
        .map(|s| format!("{}… ({} chars)", &s[..s.len().min(6)], s.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remembered_secret_or_its_jwt_signature_is_found() {
        let signature = "c2lnbmF0dXJlLXRoYXQtaXMtbG9uZy1lbm91Z2gtdG8tY291bnQ";
        remember(&format!("aGVhZGVy.cGF5bG9hZA.{signature}"));
        assert!(leaked_in(&format!("log line with {signature} in it")).is_some());
        let shown = leaked_in(&format!("Authorization: aGVhZGVy.cGF5bG9hZA.{signature}")).unwrap();
        assert!(
            !shown.contains(signature),
            "the report must not repeat the secret"
        );
        assert!(leaked_in("a clean log line").is_none());
    }
}
