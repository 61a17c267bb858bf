//! The EKS control plane, REST-JSON as aws-sdk-eks speaks it: `DescribeCluster`,
//! `DescribeAddon`, and `List`/`Describe`/`Create`/`Update`/`DeletePodIdentityAssociation`.
//! Requests must be signed for service `eks`. An association's fields follow EKS's rules: a
//! policy is at most 2,048 characters of JSON and needs session tags disabled, a target role
//! gets an external ID, and a service account has one association.

use std::{collections::BTreeMap, sync::Mutex};

use bytes::Bytes;
use http::Method;
use http_body_util::Full;
use hyper::Response;

use super::{ApiCall, Association, State, authenticate, error, json, rand_u32};
use crate::{ACCOUNT, CLUSTER, REGION, jwt};

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
        (&Method::POST, ["clusters", name, "pod-identity-associations", id]) => (
            "UpdatePodIdentityAssociation",
            update(&mut st, name, id, body),
        ),
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
        "modifiedAt": a.modified_at,
        "disableSessionTags": a.disable_session_tags,
    });
    if let Some(target) = &a.target_role_arn {
        v["targetRoleArn"] = target.clone().into();
    }
    if let Some(id) = &a.external_id {
        v["externalId"] = id.clone().into();
    }
    if let Some(policy) = &a.policy {
        v["policy"] = policy.clone().into();
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

fn invalid(message: &str) -> Response<Full<Bytes>> {
    error(400, "InvalidParameterException", message)
}

fn create(st: &mut State, name: &str, body: &Bytes) -> Response<Full<Bytes>> {
    if !cluster_ok(st, name) {
        return no_cluster(name);
    }
    let Ok(input) = serde_json::from_slice::<serde_json::Value>(body) else {
        return invalid("request body is not JSON");
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
        return invalid("namespace, serviceAccount and roleArn are required");
    };
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
    let new = Association {
        namespace,
        service_account,
        role_arn,
        target_role_arn: text("targetRoleArn"),
        disable_session_tags: input["disableSessionTags"].as_bool().unwrap_or(false),
        policy: text("policy"),
        tags: input["tags"]
            .as_object()
            .map(|t| {
                t.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default(),
        ..Association::default()
    };
    if let Err(message) = check(&new) {
        return invalid(&message);
    }
    let created = st.add_association(new);
    json(
        200,
        serde_json::json!({ "association": full(&created) }),
        &[],
    )
}

/// EKS's rules for an association's fields.
fn check(a: &Association) -> Result<(), String> {
    for arn in std::iter::once(&a.role_arn).chain(&a.target_role_arn) {
        if !arn.starts_with("arn:aws:iam::") || !arn.contains(":role/") {
            return Err(format!("Role ARN {arn} is not a valid IAM role ARN"));
        }
    }
    if let Some(policy) = &a.policy {
        if policy.chars().count() > 2048 {
            return Err(
                "1 validation error detected: Value at 'policy' failed to satisfy constraint: Member must have length less than or equal to 2048".to_owned(),
            );
        }
        if serde_json::from_str::<serde_json::Value>(policy).is_err() {
            return Err("The policy is not a valid JSON document".to_owned());
        }
        if !a.disable_session_tags {
            return Err(
                "Session tags must be disabled (disableSessionTags: true) when a policy is specified"
                    .to_owned(),
            );
        }
    }
    Ok(())
}

/// Changes what the body names: `roleArn`, `targetRoleArn` and `policy` (an empty string removes
/// the latter two), `disableSessionTags`. A new target role gets a new external ID.
fn update(st: &mut State, name: &str, id: &str, body: &Bytes) -> Response<Full<Bytes>> {
    if !cluster_ok(st, name) {
        return no_cluster(name);
    }
    let Ok(input) = serde_json::from_slice::<serde_json::Value>(body) else {
        return invalid("request body is not JSON");
    };
    let Some(i) = st.associations.iter().position(|a| a.id == id) else {
        return not_found(id);
    };
    let mut next = st.associations[i].clone();
    if let Some(role) = input["roleArn"].as_str() {
        next.role_arn = role.to_owned();
    }
    if let Some(target) = input["targetRoleArn"].as_str() {
        let target = (!target.is_empty()).then(|| target.to_owned());
        if target != next.target_role_arn {
            next.external_id = target.as_ref().map(|_| format!("{id}-{:08x}", rand_u32()));
        }
        next.target_role_arn = target;
    }
    if let Some(policy) = input["policy"].as_str() {
        next.policy = (!policy.is_empty()).then(|| policy.to_owned());
    }
    if let Some(disabled) = input["disableSessionTags"].as_bool() {
        next.disable_session_tags = disabled;
    }
    if let Err(message) = check(&next) {
        return invalid(&message);
    }
    next.modified_at = jwt::now();
    st.associations[i] = next.clone();
    json(200, serde_json::json!({ "association": full(&next) }), &[])
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
