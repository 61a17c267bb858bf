//! Verifies AWS Signature Version 4 the way AWS does: rebuilds the canonical request from what
//! arrived, derives the signing key from the secret the fake knows for the access key, and
//! compares signatures. Written from the published algorithm, independently of the SDK that
//! signs, so a signing bug in the agent cannot hide behind the same bug in the checker.

use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::{Digest as _, Sha256};

/// A rejected request: status, AWS error code, message.
pub type Rejection = (u16, &'static str, String);

/// Credentials the fake accepts.
#[derive(Clone, Debug)]
pub struct Key {
    pub secret: String,
    /// Temporary credentials carry a session token, which must be signed as
    /// `X-Amz-Security-Token`.
    pub session_token: Option<String>,
}

/// What a valid signature proved.
#[derive(Clone, Debug)]
pub struct Signed {
    pub access_key_id: String,
    pub region: String,
}

/// Checks `parts`+`body` against SigV4 for `service` in `region`, with `lookup` giving the secret of
/// an access key. Returns the access key that signed.
pub fn verify(
    parts: &http::request::Parts,
    body: &[u8],
    service: &str,
    region: &str,
    lookup: impl Fn(&str) -> Option<Key>,
) -> Result<Signed, Rejection> {
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let missing = || {
        (
            403,
            "MissingAuthenticationTokenException",
            "Missing Authentication Token".to_owned(),
        )
    };
    let auth = header("authorization").ok_or_else(missing)?;
    let rest = auth.strip_prefix("AWS4-HMAC-SHA256 ").ok_or_else(missing)?;
    let field = |name: &str| {
        rest.split(',')
            .map(str::trim)
            .find_map(|f| f.strip_prefix(name))
            .map(str::to_owned)
    };
    let (Some(credential), Some(signed_headers), Some(signature)) = (
        field("Credential="),
        field("SignedHeaders="),
        field("Signature="),
    ) else {
        return Err((
            403,
            "IncompleteSignatureException",
            format!("Authorization header is incomplete: {auth:.40}..."),
        ));
    };
    let scope: Vec<&str> = credential.split('/').collect();
    let [akid, date, scope_region, scope_service, "aws4_request"] = scope.as_slice() else {
        return Err((
            403,
            "IncompleteSignatureException",
            "Credential scope is malformed".into(),
        ));
    };
    if *scope_service != service || *scope_region != region {
        return Err((
            403,
            "InvalidSignatureException",
            format!(
                "Credential should be scoped to a valid region and service: expected {region}/{service}, got {scope_region}/{scope_service}"
            ),
        ));
    }
    let Some(key) = lookup(akid) else {
        return Err((
            403,
            "UnrecognizedClientException",
            "The security token included in the request is invalid.".into(),
        ));
    };
    if key.session_token.as_deref() != header("x-amz-security-token") {
        return Err((
            403,
            "UnrecognizedClientException",
            "The security token included in the request is invalid.".into(),
        ));
    }
    let amz_date = header("x-amz-date").ok_or_else(|| {
        (
            403,
            "IncompleteSignatureException",
            "X-Amz-Date is missing".to_owned(),
        )
    })?;
    if !amz_date.starts_with(date) {
        return Err((
            403,
            "InvalidSignatureException",
            "X-Amz-Date does not match the credential scope's date".into(),
        ));
    }
    if !signed_headers.split(';').any(|h| h == "host") {
        return Err((
            403,
            "InvalidSignatureException",
            "the Host header must be signed".into(),
        ));
    }
    let payload_hash = match header("x-amz-content-sha256") {
        Some(h) => h.to_owned(),
        None => hex(&Sha256::digest(body)),
    };
    let mut canonical_headers = String::new();
    for name in signed_headers.split(';') {
        let values: Vec<String> = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| {
                v.to_str()
                    .unwrap_or("")
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        let value = if name == "host" && values.is_empty() {
            parts
                .uri
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_default()
        } else {
            values.join(",")
        };
        canonical_headers.push_str(&format!("{name}:{value}\n"));
    }
    let canonical_request = format!(
        "{}\n{}\n{}\n{canonical_headers}\n{signed_headers}\n{payload_hash}",
        parts.method,
        encode(parts.uri.path(), false),
        canonical_query(parts.uri.query().unwrap_or("")),
    );
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{date}/{region}/{service}/aws4_request\n{}",
        hex(&Sha256::digest(canonical_request.as_bytes()))
    );
    let mut k = hmac(format!("AWS4{}", key.secret).as_bytes(), date.as_bytes());
    for part in [region, service, "aws4_request"] {
        k = hmac(&k, part.as_bytes());
    }
    let expected = hex(&hmac(&k, string_to_sign.as_bytes()));
    if expected != signature {
        return Err((
            403,
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method.".into(),
        ));
    }
    Ok(Signed {
        access_key_id: akid.to_string(),
        region: region.to_owned(),
    })
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// RFC 3986 percent-encoding of everything but unreserved characters (and `/` in paths).
fn encode(s: &str, encode_slash: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b'/' if !encode_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match (
            bytes[i],
            bytes
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()),
        ) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Query parameters decoded, re-encoded strictly, and sorted by name then value.
fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (encode(&decode(k), true), encode(&decode(v), true))
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of AWS's SigV4 documentation ("GET /?Param2=value2&Param1=value1" to
    /// example.amazonaws.com, service "service", 2015-08-30) with its published signature.
    #[test]
    fn verifies_the_documented_example() {
        let secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
        let signature = "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500";
        let req = http::Request::get("https://example.amazonaws.com/?Param2=value2&Param1=value1")
            .header("host", "example.amazonaws.com")
            .header("x-amz-date", "20150830T123600Z")
            .header(
                "authorization",
                format!("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature={signature}"),
            )
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let lookup = |akid: &str| {
            (akid == "AKIDEXAMPLE").then(|| Key {
                secret: secret.into(),
                session_token: None,
            })
        };
        let signed = verify(&parts, b"", "service", "us-east-1", lookup).unwrap();
        assert_eq!(signed.access_key_id, "AKIDEXAMPLE");
        assert_eq!(
            verify(&parts, b"", "eks", "us-east-1", lookup)
                .unwrap_err()
                .1,
            "InvalidSignatureException"
        );
        let wrong = |_: &str| {
            Some(Key {
                secret: "other".into(),
                session_token: None,
            })
        };
        assert_eq!(
            verify(&parts, b"", "service", "us-east-1", wrong)
                .unwrap_err()
                .1,
            "InvalidSignatureException"
        );
        assert_eq!(
            verify(&parts, b"", "service", "us-east-1", |_| None)
                .unwrap_err()
                .1,
            "UnrecognizedClientException"
        );
    }
}
