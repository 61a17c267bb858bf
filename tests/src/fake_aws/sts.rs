//! STS `AssumeRole` (query protocol: a form-encoded POST, an XML answer), as the agent's
//! `--credential-source sts` calls it. Every call is recorded with its role, session name, session
//! tags, transitive tag keys, the tags inherited from the calling session, its session policy and
//! external ID, and its signer. The credentials it issues are keys the fake accepts from then on
//! (for the second hop of a chain), and the transitive tags of their session go with them, as in
//! STS. A session's policy is kept with it: [`super::FakeAws::session_allows`] judges an action
//! the way IAM intersects a session policy with the role's (every role here allows everything).
//! A role can demand an external ID in its trust policy ([`super::FakeAws::require_external_id`]).

use std::{collections::BTreeMap, sync::Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;

use super::{State, authenticate_xml, rand_u32, sigv4};
use crate::{ACCOUNT, jwt};

/// One AssumeRole call the fake answered.
#[derive(Clone, Debug, Default)]
pub struct StsCall {
    pub role_arn: String,
    pub session_name: String,
    /// The tags passed in the call.
    pub tags: BTreeMap<String, String>,
    pub transitive_keys: Vec<String>,
    /// Transitive tags carried over from the session whose credentials signed the call.
    pub inherited: BTreeMap<String, String>,
    pub duration_seconds: Option<u32>,
    /// The session policy passed (`Policy`), as given.
    pub policy: Option<String>,
    /// `ExternalId`, as given.
    pub external_id: Option<String>,
    /// The access key that signed the call.
    pub signed_by: String,
    pub status: u16,
}

/// A session STS (or EKS Auth) issued: what a call signed with its keys inherits, and what it
/// may do.
#[derive(Clone, Debug, Default)]
pub struct Session {
    /// Every session tag it carries.
    pub tags: BTreeMap<String, String>,
    /// Of those, the transitive ones: a role chained into from this session inherits them.
    pub transitive: BTreeMap<String, String>,
    /// The session policy that scopes it, parsed.
    pub policy: Option<serde_json::Value>,
}

impl Session {
    /// Whether the session may perform `action`: without a session policy, whatever the role
    /// may (everything, here); with one, only what it allows and does not deny.
    pub fn allows(&self, action: &str) -> bool {
        let Some(policy) = &self.policy else {
            return true;
        };
        let statements = match &policy["Statement"] {
            serde_json::Value::Array(all) => all.clone(),
            one => vec![one.clone()],
        };
        let matches = |statement: &serde_json::Value| {
            let actions = match &statement["Action"] {
                serde_json::Value::Array(all) => all.clone(),
                one => vec![one.clone()],
            };
            actions
                .iter()
                .filter_map(|a| a.as_str())
                .any(|pattern| action_matches(pattern, action))
        };
        let effect = |e: &str| statements.iter().any(|s| s["Effect"] == e && matches(s));
        !effect("Deny") && effect("Allow")
    }
}

/// IAM's action patterns: case-insensitive, `*` matches any run of characters.
fn action_matches(pattern: &str, action: &str) -> bool {
    let (pattern, action) = (pattern.to_lowercase(), action.to_lowercase());
    match pattern.split_once('*') {
        None => pattern == action,
        Some((head, tail)) => {
            action.starts_with(head)
                && (0..=action.len() - head.len())
                    .any(|i| action_matches(tail, &action[head.len() + i..]))
        }
    }
}

pub(super) fn xml_error(status: u16, code: &str, message: &str) -> Response<Full<Bytes>> {
    let kind = if status >= 500 { "Receiver" } else { "Sender" };
    let body = format!(
        "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>{kind}</Type><Code>{code}</Code><Message>{}</Message></Error><RequestId>fake-{:08x}</RequestId></ErrorResponse>",
        escape(message),
        rand_u32()
    );
    Response::builder()
        .status(status)
        .header("content-type", "text/xml")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `application/x-www-form-urlencoded` pairs.
pub fn form(body: &[u8]) -> BTreeMap<String, String> {
    fn decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < b.len() => match u8::from_str_radix(
                    std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"),
                    16,
                ) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                },
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// UTC `YYYY-MM-DDTHH:MM:SSZ` for Unix seconds.
fn iso8601(t: i64) -> String {
    let (days, secs) = (t.div_euclid(86400), t.rem_euclid(86400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

pub(super) async fn handle(
    state: &Mutex<State>,
    parts: &http::request::Parts,
    body: &Bytes,
) -> Response<Full<Bytes>> {
    let params = form(body);
    let action = params.get("Action").map(String::as_str);
    if !matches!(action, Some("AssumeRole" | "GetCallerIdentity")) {
        return xml_error(
            400,
            "InvalidAction",
            &format!("the fake STS answers AssumeRole and GetCallerIdentity only, not {action:?}"),
        );
    }
    let signed_by = match authenticate_xml(state, parts, body, "sts") {
        Ok(akid) => akid,
        Err(rejection) => return rejection,
    };
    if action == Some("GetCallerIdentity") {
        let body = format!(
            "<GetCallerIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><GetCallerIdentityResult><Arn>arn:aws:sts::{ACCOUNT}:assumed-role/node-role/{signed_by}</Arn><UserId>AROANODE:{signed_by}</UserId><Account>{ACCOUNT}</Account></GetCallerIdentityResult><ResponseMetadata><RequestId>fake-{:08x}</RequestId></ResponseMetadata></GetCallerIdentityResponse>",
            rand_u32()
        );
        return Response::builder()
            .status(200)
            .header("content-type", "text/xml")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
    }
    let list = |prefix: &str| -> Vec<String> {
        (1..)
            .map_while(|i| params.get(&format!("{prefix}.member.{i}")).cloned())
            .collect()
    };
    let mut call = StsCall {
        role_arn: params.get("RoleArn").cloned().unwrap_or_default(),
        session_name: params.get("RoleSessionName").cloned().unwrap_or_default(),
        tags: (1..)
            .map_while(|i| {
                Some((
                    params.get(&format!("Tags.member.{i}.Key"))?.clone(),
                    params.get(&format!("Tags.member.{i}.Value"))?.clone(),
                ))
            })
            .collect(),
        transitive_keys: list("TransitiveTagKeys"),
        duration_seconds: params.get("DurationSeconds").and_then(|d| d.parse().ok()),
        policy: params.get("Policy").cloned(),
        external_id: params.get("ExternalId").cloned(),
        signed_by: signed_by.clone(),
        ..Default::default()
    };
    let latency = state.lock().unwrap().latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let mut st = state.lock().unwrap();
    call.inherited = st
        .sts_sessions
        .get(&signed_by)
        .map(|s| s.transitive.clone())
        .unwrap_or_default();
    let refuse = |st: &mut State, mut call: StsCall, status: u16, code: &str, message: &str| {
        call.status = status;
        st.sts_calls.push(call);
        xml_error(status, code, message)
    };
    if let Some(fault) = st.sts_fault.clone() {
        return refuse(&mut st, call, fault.status, &fault.code, "injected fault");
    }
    let session_ok = !call.session_name.is_empty()
        && call.session_name.len() <= 64
        && call
            .session_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c));
    if !session_ok {
        let message = format!(
            "1 validation error detected: Value '{}' at 'roleSessionName' failed to satisfy constraint",
            call.session_name
        );
        return refuse(&mut st, call, 400, "ValidationError", &message);
    }
    if let Some(key) = call.tags.keys().find(|k| call.inherited.contains_key(*k)) {
        let message =
            format!("the tag {key} is transitive from the calling session and cannot be set again");
        return refuse(&mut st, call, 400, "InvalidParameterValue", &message);
    }
    if call
        .transitive_keys
        .iter()
        .any(|k| !call.tags.contains_key(k))
    {
        return refuse(
            &mut st,
            call,
            400,
            "InvalidParameterValue",
            "a transitive tag key has no tag in the call",
        );
    }
    if let Err((code, message)) = check_policy_and_external_id(&call) {
        return refuse(&mut st, call, 400, code, &message);
    }
    if call.tags.len() + call.inherited.len() > 50 {
        return refuse(
            &mut st,
            call,
            400,
            "PackedPolicyTooLarge",
            "too many session tags",
        );
    }
    // arn:aws:iam::ACCOUNT:role/NAME, in any account (cross-account chains).
    let parsed = call
        .role_arn
        .strip_prefix("arn:aws:iam::")
        .and_then(|rest| rest.split_once(":role/"))
        .filter(|(account, name)| {
            account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit()) && !name.is_empty()
        });
    let Some((account, role)) = parsed.map(|(a, r)| (a.to_owned(), r.to_owned())) else {
        let message = format!("no such role {}", call.role_arn);
        return refuse(&mut st, call, 403, "AccessDenied", &message);
    };
    let external_id_refused = st
        .required_external_ids
        .get(&call.role_arn)
        .is_some_and(|required| call.external_id.as_ref() != Some(required));
    if st.denied_roles.contains(&call.role_arn) || external_id_refused {
        let message = format!(
            "User: {signed_by} is not authorized to perform: sts:AssumeRole on resource: {}",
            call.role_arn
        );
        return refuse(&mut st, call, 403, "AccessDenied", &message);
    }
    call.status = 200;
    st.issued += 1;
    let serial = st.issued;
    let expiration = jwt::now() + i64::from(call.duration_seconds.unwrap_or(3600));
    let access_key = format!("ASIASTS{serial:013}");
    let secret = format!("fakeStsSecret{serial:08}{}", rand_u32());
    let session_token = format!("fakeStsSession{serial:08}{}", rand_u32());
    crate::secrets::remember(&secret);
    crate::secrets::remember(&session_token);
    // The new session's transitive tags: what it inherited, and what this call marked.
    let mut transitive = call.inherited.clone();
    for k in &call.transitive_keys {
        transitive.insert(k.clone(), call.tags[k].clone());
    }
    let mut tags = call.inherited.clone();
    tags.extend(call.tags.clone());
    let policy = call
        .policy
        .as_deref()
        .and_then(|p| serde_json::from_str(p).ok());
    st.sts_sessions.insert(
        access_key.clone(),
        Session {
            tags,
            transitive,
            policy,
        },
    );
    st.keys.insert(
        access_key.clone(),
        sigv4::Key {
            secret: secret.clone(),
            session_token: Some(session_token.clone()),
        },
    );
    let session_name = call.session_name.clone();
    st.sts_calls.push(call);
    let body = format!(
        "<AssumeRoleResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><AssumeRoleResult><Credentials><AccessKeyId>{access_key}</AccessKeyId><SecretAccessKey>{secret}</SecretAccessKey><SessionToken>{session_token}</SessionToken><Expiration>{}</Expiration></Credentials><AssumedRoleUser><AssumedRoleId>AROAFAKE{serial:012}:{session_name}</AssumedRoleId><Arn>arn:aws:sts::{account}:assumed-role/{role}/{session_name}</Arn></AssumedRoleUser><PackedPolicySize>6</PackedPolicySize></AssumeRoleResult><ResponseMetadata><RequestId>fake-{:08x}</RequestId></ResponseMetadata></AssumeRoleResponse>",
        iso8601(expiration),
        rand_u32()
    );
    Response::builder()
        .status(200)
        .header("content-type", "text/xml")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// STS's checks of `Policy` (at most 2,048 characters of JSON) and `ExternalId` (2 to 1,224
/// characters of `[\w+=,.@:/-]`).
fn check_policy_and_external_id(call: &StsCall) -> Result<(), (&'static str, String)> {
    if let Some(policy) = &call.policy {
        if policy.chars().count() > 2048 {
            return Err((
                "ValidationError",
                "1 validation error detected: Value at 'policy' failed to satisfy constraint: Member must have length less than or equal to 2048".to_owned(),
            ));
        }
        if serde_json::from_str::<serde_json::Value>(policy).is_err() {
            return Err((
                "MalformedPolicyDocument",
                "The policy is not in the valid JSON format.".to_owned(),
            ));
        }
    }
    if let Some(id) = &call.external_id {
        let ok = (2..=1224).contains(&id.len())
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_+=,.@:/-".contains(c));
        if !ok {
            return Err((
                "ValidationError",
                format!(
                    "1 validation error detected: Value '{id}' at 'externalId' failed to satisfy constraint"
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn forms_and_times() {
        let f =
            super::form(b"Action=AssumeRole&RoleSessionName=eks-c-p%2Bq&Tags.member.1.Value=a+b");
        assert_eq!(f["RoleSessionName"], "eks-c-p+q");
        assert_eq!(f["Tags.member.1.Value"], "a b");
        assert_eq!(super::iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::iso8601(1_798_000_000), "2026-12-23T04:26:40Z");
    }

    #[test]
    fn session_policies_allow_what_they_allow_and_nothing_they_deny() {
        let session = |policy: serde_json::Value| super::Session {
            policy: Some(policy),
            ..Default::default()
        };
        let s = session(serde_json::json!({"Statement": [
            {"Effect": "Allow", "Action": ["s3:Get*", "sqs:SendMessage"], "Resource": "*"},
            {"Effect": "Deny", "Action": "s3:GetObjectAcl", "Resource": "*"},
        ]}));
        assert!(s.allows("s3:GetObject"));
        assert!(s.allows("SQS:sendmessage"));
        assert!(!s.allows("s3:GetObjectAcl"), "an explicit deny wins");
        assert!(!s.allows("s3:PutObject"), "not allowed");
        assert!(
            super::Session::default().allows("s3:PutObject"),
            "no policy"
        );
        assert!(super::action_matches("*", "iam:CreateRole"));
        assert!(!super::action_matches("s3:*Object", "s3:ListBucket"));
    }
}
