//! The EKS control plane, REST-JSON as aws-sdk-eks speaks it: `DescribeCluster`,
//! `DescribeAddon`, and `List`/`Describe`/`Create`/`DeletePodIdentityAssociation`. Requests must be
//! signed for service `eks`.

use std::{collections::BTreeMap, sync::Mutex};

use bytes::Bytes;
use http::Method;
use http_body_util::Full;
use hyper::Response;

use super::{ApiCall, Association, State, authenticate, error, json};
use crate::{ACCOUNT, CLUSTER, REGION};

/// EKS's own limits on `maxResults`.
const MAX_RESULTS: usize = 100;

pub(super) fn handle(
    state: &Mutex<State>,
    parts: &http::request::Parts,
    body: &Bytes,
) -> Response<Full<Bytes>> {
    let signed_by = match authenticate(state, parts, body, "eks") {
        Ok(akid) => akid,
        Err(rejection) => return rejection,
    };
    let path = parts.uri.path();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let query = query(parts.uri.query().unwrap_or(""));
    let mut st = state.lock().unwrap();
    let (operation, response) = match (&parts.method, segments.as_slice()) {
        (&Method::GET, ["clusters", name]) => ("DescribeCluster", describe_cluster(&st, name)),
        (&Method::GET, ["clusters", name, "addons", addon]) => {
            ("DescribeAddon", describe_addon(&st, name, addon))
        }
        (&Method::GET, ["clusters", name, "pod-identity-associations"]) => {
            ("ListPodIdentityAssociations", list(&st, name, &query))
        }
        (&Method::GET, ["clusters", name, "pod-identity-associations", id]) => {
            ("DescribePodIdentityAssociation", describe(&st, name, id))
        }
        (&Method::POST, ["clusters", name, "pod-identity-associations"]) => {
            ("CreatePodIdentityAssociation", create(&mut st, name, body))
        }
        (&Method::DELETE, ["clusters", name, "pod-identity-associations", id]) => {
            ("DeletePodIdentityAssociation", delete(&mut st, name, id))
        }
        _ => (
            "Unknown",
            error(
                404,
                "UnknownOperationException",
                &format!("no operation {} {path}", parts.method),
            ),
        ),
    };
    st.api_calls.push(ApiCall {
        operation,
        signed_by,
        status: response.status().as_u16(),
    });
    response
}

fn query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| {
            (
                k.to_owned(),
                v.replace("%2F", "/")
                    .replace("%3D", "=")
                    .replace("%2B", "+"),
            )
        })
        .collect()
}

fn no_cluster(name: &str) -> Response<Full<Bytes>> {
    error(
        404,
        "ResourceNotFoundException",
        &format!("No cluster found for name: {name}."),
    )
}

/// The cluster exists under the fake's name, unless made absent.
fn cluster_ok(st: &State, name: &str) -> bool {
    name == CLUSTER && st.cluster_status.is_some()
}

fn describe_cluster(st: &State, name: &str) -> Response<Full<Bytes>> {
    let Some(status) = st.cluster_status.as_ref().filter(|_| name == CLUSTER) else {
        return no_cluster(name);
    };
    json(
        200,
        serde_json::json!({"cluster": {
            "name": name,
            "arn": format!("arn:aws:eks:{REGION}:{ACCOUNT}:cluster/{name}"),
            "status": status,
            "version": "1.31",
            "createdAt": 1_700_000_000,
            "endpoint": "https://E2E.gr7.us-west-2.eks.amazonaws.com",
        }}),
        &[],
    )
}

fn describe_addon(st: &State, name: &str, addon: &str) -> Response<Full<Bytes>> {
    if !cluster_ok(st, name) {
        return no_cluster(name);
    }
    match st.addons.get(addon) {
        Some(status) => json(
            200,
            serde_json::json!({"addon": {
                "addonName": addon,
                "clusterName": name,
                "status": status,
                "addonVersion": "v1.3.4-eksbuild.1",
                "addonArn": format!("arn:aws:eks:{REGION}:{ACCOUNT}:addon/{name}/{addon}/00000000-0000-0000-0000-000000000000"),
            }}),
            &[],
        ),
        None => error(
            404,
            "ResourceNotFoundException",
            &format!("No addon: {addon} found in cluster: {name}"),
        ),
    }
}

fn summary(a: &Association) -> serde_json::Value {
    serde_json::json!({
        "clusterName": CLUSTER,
        "namespace": a.namespace,
        "serviceAccount": a.service_account,
        "associationArn": a.arn,
        "associationId": a.id,
    })
}

fn full(a: &Association) -> serde_json::Value {
    let mut v = serde_json::json!({
        "clusterName": CLUSTER,
        "namespace": a.namespace,
        "serviceAccount": a.service_account,
        "roleArn": a.role_arn,
        "associationArn": a.arn,
        "associationId": a.id,
        "tags": a.tags,
        "createdAt": a.created_at,
        "modifiedAt": a.created_at,
        "disableSessionTags": false,
    });
    if let Some(target) = &a.target_role_arn {
        v["targetRoleArn"] = target.clone().into();
        v["externalId"] = format!("{}-external", a.id).into();
    }
    v
}

/// Pages of at most `maxResults` (EKS's limit: 100); `nextToken` is the offset of the next page.
fn list(st: &State, name: &str, query: &BTreeMap<String, String>) -> Response<Full<Bytes>> {
    if !cluster_ok(st, name) {
        return no_cluster(name);
    }
    let max = match query.get("maxResults").map(|m| m.parse::<usize>()) {
        None => MAX_RESULTS,
        Some(Ok(m)) if (1..=MAX_RESULTS).contains(&m) => m,
        Some(_) => {
            return error(
                400,
                "InvalidParameterException",
                "maxResults must be between 1 and 100",
            );
        }
    };
    let start = match query.get("nextToken").map(|t| {
        t.strip_prefix("offset-")
            .and_then(|n| n.parse::<usize>().ok())
    }) {
        None => 0,
        Some(Some(n)) => n,
        Some(None) => return error(400, "InvalidParameterException", "The nextToken is invalid"),
    };
    let matching: Vec<&Association> = st
        .associations
        .iter()
        .filter(|a| query.get("namespace").is_none_or(|ns| *ns == a.namespace))
        .filter(|a| {
            query
                .get("serviceAccount")
                .is_none_or(|sa| *sa == a.service_account)
        })
        .collect();
    let page: Vec<serde_json::Value> = matching
        .iter()
        .skip(start)
        .take(max)
        .map(|a| summary(a))
        .collect();
    let mut body = serde_json::json!({ "associations": page });
    if start + max < matching.len() {
        body["nextToken"] = format!("offset-{}", start + max).into();
    }
    json(200, body, &[])
}

fn not_found(id: &str) -> Response<Full<Bytes>> {
    error(
        404,
        "ResourceNotFoundException",
        &format!("No Pod Identity Association found with id {id}"),
    )
}

fn describe(st: &State, name: &str, id: &str) -> Response<Full<Bytes>> {
    if !cluster_ok(st, name) {
        return no_cluster(name);
    }
    match st.associations.iter().find(|a| a.id == id) {
        Some(a) => json(200, serde_json::json!({ "association": full(a) }), &[]),
        None => not_found(id),
    }
}

fn create(st: &mut State, name: &str, body: &Bytes) -> Response<Full<Bytes>> {
    if !cluster_ok(st, name) {
        return no_cluster(name);
    }
    let Ok(input) = serde_json::from_slice::<serde_json::Value>(body) else {
        return error(400, "InvalidParameterException", "request body is not JSON");
    };
    let text = |key: &str| {
        input[key]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let (Some(namespace), Some(service_account), Some(role_arn)) =
        (text("namespace"), text("serviceAccount"), text("roleArn"))
    else {
        return error(
            400,
            "InvalidParameterException",
            "namespace, serviceAccount and roleArn are required",
        );
    };
    if !role_arn.starts_with("arn:aws:iam::") {
        return error(
            400,
            "InvalidParameterException",
            &format!("Role ARN {role_arn} is not a valid IAM role ARN"),
        );
    }
    if let Some(existing) = st
        .associations
        .iter()
        .find(|a| a.namespace == namespace && a.service_account == service_account)
    {
        return error(
            409,
            "ResourceInUseException",
            &format!("Association already exists: {}", existing.id),
        );
    }
    let tags = input["tags"]
        .as_object()
        .map(|t| {
            t.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    let created = st.add_association(
        &namespace,
        &service_account,
        &role_arn,
        text("targetRoleArn"),
        tags,
    );
    json(
        200,
        serde_json::json!({ "association": full(&created) }),
        &[],
    )
}

fn delete(st: &mut State, name: &str, id: &str) -> Response<Full<Bytes>> {
    if !cluster_ok(st, name) {
        return no_cluster(name);
    }
    match st.associations.iter().position(|a| a.id == id) {
        Some(i) => {
            let gone = st.associations.remove(i);
            json(200, serde_json::json!({ "association": full(&gone) }), &[])
        }
        None => not_found(id),
    }
}
