//! EKS Auth: `AssumeRoleForPodIdentity`. Checks the token's signature (the cluster issuer's,
//! `jwt::cluster_issuer`), audience, expiry and `kubernetes.io` claims, finds the association of
//! its namespace and service account, and issues credentials for the association's role.

use std::sync::Mutex;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;

use super::{Call, State, authenticate, error, json, rand_u32};
use crate::{ACCOUNT, jwt};

pub(super) async fn handle(
    state: &Mutex<State>,
    cluster: &str,
    parts: &http::request::Parts,
    body: &Bytes,
) -> Response<Full<Bytes>> {
    if parts.method != http::Method::POST {
        return error(405, "InvalidRequestException", "POST only");
    }
    let signed_by = match authenticate(state, parts, body, "eks-auth") {
        Ok(akid) => akid,
        Err(rejection) => return rejection,
    };
    if state.lock().unwrap().denied.contains(&signed_by) {
        return error(
            403,
            "AccessDeniedException",
            &format!(
                "User: arn:aws:sts::{ACCOUNT}:assumed-role/node-role/i-0 is not authorized to perform: eks-auth:AssumeRoleForPodIdentity"
            ),
        );
    }
    let token = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("token").and_then(|t| t.as_str()).map(str::to_owned))
        .unwrap_or_default();
    let claims = match jwt::claims(&token) {
        Ok(c) => c,
        Err(e) => {
            return error(
                400,
                "InvalidTokenException",
                &format!("token is not a JWT: {e}"),
            );
        }
    };
    let k8s = &claims["kubernetes.io"];
    let namespace = k8s["namespace"].as_str().unwrap_or("").to_owned();
    let service_account = k8s["serviceaccount"]["name"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let pod_uid = k8s["pod"]["uid"].as_str().unwrap_or("").to_owned();
    let host = parts
        .headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_owned();

    let latency = state.lock().unwrap().latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let mut st = state.lock().unwrap();
    let record = |st: &mut State, status: u16| {
        st.calls.push(Call {
            cluster: cluster.to_owned(),
            namespace: namespace.clone(),
            service_account: service_account.clone(),
            pod_uid: pod_uid.clone(),
            status,
            signed_by: signed_by.clone(),
            host: host.clone(),
        })
    };
    if let Some(fault) = st.fault.clone() {
        record(&mut st, fault.status);
        return error(fault.status, &fault.code, "injected fault");
    }
    if !jwt::cluster_issuer().signed(&token) {
        record(&mut st, 400);
        return error(
            400,
            "InvalidTokenException",
            "token signature is not the cluster issuer's",
        );
    }
    let audience_ok = claims["aud"]
        .as_array()
        .is_some_and(|a| a.iter().any(|v| v == jwt::AUDIENCE));
    if !audience_ok || namespace.is_empty() || service_account.is_empty() || pod_uid.is_empty() {
        record(&mut st, 400);
        return error(
            400,
            "InvalidTokenException",
            "token lacks the pods.eks.amazonaws.com audience or kubernetes.io claims",
        );
    }
    if claims["exp"].as_i64().unwrap_or(0) <= jwt::now() {
        record(&mut st, 400);
        return error(400, "ExpiredTokenException", "token has expired");
    }
    let Some(association) = st
        .associations
        .iter()
        .find(|a| a.namespace == namespace && a.service_account == service_account)
        .cloned()
    else {
        record(&mut st, 404);
        return error(
            404,
            "ResourceNotFoundException",
            &format!(
                "no pod identity association for {namespace}/{service_account} in cluster {cluster}"
            ),
        );
    };
    record(&mut st, 200);
    st.issued += 1;
    let serial = st.issued;
    let expiration = jwt::now() + st.lifetime.as_secs() as i64;
    let secret = format!("fakeSecret{serial:08}{}", rand_u32());
    let session = format!("fakeSession{serial:08}{}", rand_u32());
    crate::secrets::remember(&secret);
    crate::secrets::remember(&session);
    let role = association.role_arn.rsplit('/').next().unwrap_or("role");
    let access_key = super::access_key_for(&namespace, &service_account);
    // The session EKS would make: its six tags unless disabled, scoped by the policy if any.
    let tags = if association.disable_session_tags {
        std::collections::BTreeMap::new()
    } else {
        [
            ("eks-cluster-name", cluster.to_owned()),
            ("kubernetes-namespace", namespace.clone()),
            ("kubernetes-service-account", service_account.clone()),
            ("kubernetes-pod-uid", pod_uid.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    };
    st.sts_sessions.insert(
        access_key.clone(),
        super::sts::Session {
            transitive: tags.clone(),
            tags,
            policy: association
                .policy
                .as_deref()
                .and_then(|p| serde_json::from_str(p).ok()),
        },
    );
    json(
        200,
        serde_json::json!({
            "subject": {"namespace": namespace, "serviceAccount": service_account},
            "audience": jwt::AUDIENCE,
            "podIdentityAssociation": {
                "associationArn": association.arn,
                "associationId": association.id,
            },
            "assumedRoleUser": {
                "arn": format!("arn:aws:sts::{ACCOUNT}:assumed-role/{role}/eks-{cluster}-{}", &pod_uid[..pod_uid.len().min(8)]),
                "assumeRoleId": format!("AROAFAKE{serial:012}:eks-{cluster}"),
            },
            "credentials": {
                "accessKeyId": access_key,
                "secretAccessKey": secret,
                "sessionToken": session,
                "expiration": expiration,
            }
        }),
        &[],
    )
}
