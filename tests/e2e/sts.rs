//! `--credential-source sts`, EKS Pod Identity's contract on a cluster EKS does not know.
//! The agent verifies tokens itself against the issuer's keys (a JWKS file, or the API server's
//! URL), finds the association in a file, and assumes the role with STS, signed with the node's
//! keys, with EKS's session tags. The fake STS records every call: its role, session name, tags,
//! transitive keys, the tags inherited from the calling session, and the key that signed it.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use pod_identity_e2e::{
    ACCOUNT, Agent, CLUSTER, CgroupShape, FakeAws, NODE_ACCESS_KEY, Node, Pod,
    agent::Launch,
    fake_aws::{Fault, role_arn},
    jwt::{Alg, Issuer},
};

use super::{V4_URL, wait_for};

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const EKS_KEYS: [&str; 6] = [
    "eks-cluster-arn",
    "eks-cluster-name",
    "kubernetes-namespace",
    "kubernetes-service-account",
    "kubernetes-pod-name",
    "kubernetes-pod-uid",
];

fn cluster_arn() -> String {
    format!("arn:aws:eks:us-west-2:{ACCOUNT}:cluster/{CLUSTER}")
}

/// A cluster that is not EKS: its issuer, the node, the fake STS, and the agent's files.
struct Cluster {
    issuer: Issuer,
    node: Node,
    fake: FakeAws,
    dir: PathBuf,
}

impl Cluster {
    fn new(associations: &str) -> Cluster {
        let node = Node::new();
        let fake = FakeAws::start_in(&node.netns);
        let dir = std::env::temp_dir().join(format!("pia-sts-{}", node.netns));
        std::fs::create_dir_all(&dir).unwrap();
        let c = Cluster {
            issuer: Issuer::new(ISSUER, "cluster"),
            node,
            fake,
            dir,
        };
        c.write_associations(associations);
        std::fs::write(c.dir.join("jwks.json"), c.issuer.jwks().to_string()).unwrap();
        c
    }

    /// Replaces the associations file the way a ConfigMap volume does: new content renamed over.
    fn write_associations(&self, yaml: &str) {
        let next = self.dir.join("associations.next");
        std::fs::write(&next, yaml).unwrap();
        std::fs::rename(&next, self.dir.join("associations.yaml")).unwrap();
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_owned()
    }

    /// The agent in sts mode with the keys from a file; `keys` replaces `--jwks-file` if given.
    fn agent(&self, keys: &[&str]) -> Agent {
        let (associations, jwks, arn) = (
            self.path("associations.yaml"),
            self.path("jwks.json"),
            cluster_arn(),
        );
        // These tests present many distinct tokens from one pod, which the per-pod budget of new
        // tokens (5 at once) would otherwise turn into 429s.
        let mut args = vec![
            "--credential-source",
            "sts",
            "--associations-file",
            &associations,
            "--token-issuer",
            ISSUER,
            "--cluster-arn",
            &arn,
            "--pod-upstream-burst",
            "100",
        ];
        if keys.is_empty() {
            args.extend(["--jwks-file", &jwks]);
        } else {
            args.extend(keys);
        }
        let launch = Launch {
            endpoint: false,
            env: vec![("AWS_ENDPOINT_URL_STS".into(), self.fake.endpoint())],
            ..Launch::default()
        };
        let mut agent = Agent::launch(&self.node, &self.fake, &args, &launch);
        agent.wait_ready(&self.node);
        agent
    }

    fn pod(&self, namespace: &str, name: &str, sa: &str) -> Pod {
        self.node
            .add_pod(namespace, name, sa, CgroupShape::SystemdBurstable)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn association(namespace: &str, sa: &str, role: &str, extra: &str) -> String {
    format!(
        "  - namespace: {namespace}\n    serviceAccount: {sa}\n    roleArn: {}\n{extra}",
        role_arn(role)
    )
}

const PAYMENTS: &str = "associations:\n  - namespace: payments\n    serviceAccount: api\n    roleArn: arn:aws:iam::111122223333:role/payments-api\n    tags:\n      team: payments\n";

fn access_key(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["AccessKeyId"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn a_pod_with_an_association_gets_credentials_with_eks_session_tags_and_one_without_gets_404() {
    let c = Cluster::new(PAYMENTS);
    let agent = c.agent(&[]);
    let api = c.pod("payments", "api-0", "api");
    let r = api.curl(V4_URL, &c.issuer.mint(&api.token_spec(), Alg::Rs256));
    assert_eq!(r.status, 200, "{}\n{}", r.body, agent.log());
    assert!(access_key(&r.body).starts_with("ASIASTS"), "{}", r.body);
    assert!(
        r.body.contains("\"AccountId\":\"111122223333\""),
        "the account of the assumed role: {}",
        r.body
    );
    let calls = c.fake.sts_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let call = &calls[0];
    assert_eq!(call.role_arn, "arn:aws:iam::111122223333:role/payments-api");
    assert_eq!(
        call.signed_by, NODE_ACCESS_KEY,
        "signed with the node's keys"
    );
    let expected: BTreeMap<String, String> = [
        ("eks-cluster-arn", cluster_arn()),
        ("eks-cluster-name", CLUSTER.to_owned()),
        ("kubernetes-namespace", "payments".to_owned()),
        ("kubernetes-service-account", "api".to_owned()),
        ("kubernetes-pod-name", "api-0".to_owned()),
        ("kubernetes-pod-uid", api.uid.clone()),
        ("team", "payments".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(
        call.tags, expected,
        "EKS's six session tags and the association's own"
    );
    let mut transitive = call.transitive_keys.clone();
    transitive.sort();
    let mut eks = EKS_KEYS.map(str::to_owned).to_vec();
    eks.sort();
    assert_eq!(
        transitive, eks,
        "the EKS tags are transitive, the association's own are not"
    );
    assert!(
        call.session_name
            .starts_with(&format!("eks-{CLUSTER}-api-0-"))
            && call.session_name.len() <= 64,
        "{}",
        call.session_name
    );

    // ES256 works the same.
    let api1 = c.pod("payments", "api-1", "api");
    let r = api1.curl(V4_URL, &c.issuer.mint(&api1.token_spec(), Alg::Es256));
    assert_eq!(r.status, 200, "{}\n{}", r.body, agent.log());

    // No association: 404 in EKS Auth's shape, and no STS call.
    let batch = c.pod("payments", "batch-0", "batch");
    let r = batch.curl(V4_URL, &c.issuer.mint(&batch.token_spec(), Alg::Rs256));
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(
        r.body.contains("ResourceNotFoundException") && r.body.contains("payments/batch"),
        "{}",
        r.body
    );
    assert_eq!(c.fake.sts_calls().len(), 2);
}

#[test]
fn forged_foreign_wrong_audience_and_expired_tokens_are_refused_without_an_sts_call() {
    let c = Cluster::new(PAYMENTS);
    let agent = c.agent(&[]);
    let api = c.pod("payments", "api-0", "api");
    let spec = api.token_spec();
    // Same key ids, other keys: a forgery.
    let forger = Issuer::new(ISSUER, "cluster");
    let other_kid = Issuer::new(ISSUER, "elsewhere");
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "forged RS256 signature",
            forger.mint(&spec, Alg::Rs256),
            400,
            "signature does not verify",
        ),
        (
            "forged ES256 signature",
            forger.mint(&spec, Alg::Es256),
            400,
            "signature does not verify",
        ),
        (
            "a key the issuer does not have",
            other_kid.mint(&spec, Alg::Rs256),
            400,
            "do not include",
        ),
        (
            "EKS-shaped token with a random signature",
            api.token(),
            400,
            "do not include",
        ),
        (
            "another issuer",
            c.issuer.mint_with(&spec, Alg::Rs256, |claims| {
                claims["iss"] = "https://other.example".into()
            }),
            400,
            "not by this cluster's issuer",
        ),
        (
            "another audience",
            c.issuer.mint_with(&spec, Alg::Es256, |claims| {
                claims["aud"] = serde_json::json!(["sts.amazonaws.com"])
            }),
            400,
            "audience",
        ),
        (
            "not valid yet",
            c.issuer.mint_with(&spec, Alg::Rs256, |claims| {
                claims["nbf"] = (pod_identity_e2e::jwt::now() + 3600).into()
            }),
            400,
            "not valid yet",
        ),
        (
            "expired",
            c.issuer.mint(
                &pod_identity_e2e::jwt::TokenSpec {
                    expires_in: -60,
                    ..spec.clone()
                },
                Alg::Rs256,
            ),
            400,
            "expired",
        ),
    ];
    for (what, token, status, says) in cases {
        let r = api.curl(V4_URL, &token);
        assert_eq!(r.status, status, "{what}: {}", r.body);
        assert!(
            r.body.contains(says),
            "{what}: the answer says why: {}",
            r.body
        );
    }
    // The alg "none" trick.
    let unsigned = {
        let good = c.issuer.mint(&spec, Alg::Rs256);
        let parts: Vec<&str> = good.split('.').collect();
        use base64::Engine as _;
        format!(
            "{}.{}.",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
            parts[1]
        )
    };
    let r = api.curl(V4_URL, &unsigned);
    assert_eq!(r.status, 400, "alg none: {}", r.body);
    assert_eq!(
        c.fake.sts_calls().len(),
        0,
        "every refusal was local: {:?}\n{}",
        c.fake.sts_calls(),
        agent.log()
    );
    // Refused before the node's budget: none of them counts as a call to STS.
    let upstream_calls = || {
        let metrics = agent.metrics();
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("pod_identity_agent_upstream_calls_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    assert_eq!(upstream_calls(), Some(0.0), "{}", agent.metrics());
    assert!(
        agent
            .log()
            .contains("token refused before any upstream call"),
        "{}",
        agent.log()
    );
    // And the genuine token still works.
    assert_eq!(
        api.curl(V4_URL, &c.issuer.mint(&spec, Alg::Rs256)).status,
        200,
        "{}",
        agent.log()
    );
    assert_eq!(upstream_calls(), Some(1.0));
}

#[test]
fn a_stolen_token_is_refused_by_the_kernel_binding() {
    let c = Cluster::new(PAYMENTS);
    let _agent = c.agent(&[]);
    let victim = c.pod("payments", "api-0", "api");
    let thief = c.pod("payments", "api-1", "api");
    let stolen = c.issuer.mint(&victim.token_spec(), Alg::Rs256);
    let r = thief.curl(V4_URL, &stolen);
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(
        r.body.contains("token belongs to pod payments/api-0"),
        "{}",
        r.body
    );
    assert_eq!(c.fake.sts_calls().len(), 0);
}

#[test]
fn a_target_role_is_chained_with_the_first_roles_credentials_and_carries_the_tags() {
    let target = role_arn("cross-account-reader");
    let c = Cluster::new(&format!(
        "associations:\n{}",
        association(
            "payments",
            "api",
            "payments-api",
            &format!("    targetRoleArn: {target}\n    tags: {{team: payments}}\n")
        )
    ));
    let agent = c.agent(&[]);
    // The target role's trust policy requires the external ID the agent derived (and logged).
    let derived = derived_external_id(&agent.log(), "payments/api");
    c.fake.require_external_id(&target, &derived);
    let api = c.pod("payments", "api-0", "api");
    let r = api.curl(V4_URL, &c.issuer.mint(&api.token_spec(), Alg::Rs256));
    assert_eq!(r.status, 200, "{}\n{}", r.body, agent.log());
    let calls = c.fake.sts_calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    let (first, second) = (&calls[0], &calls[1]);
    assert_eq!(second.external_id.as_deref(), Some(derived.as_str()));
    assert_eq!(
        (first.role_arn.as_str(), first.signed_by.as_str()),
        (role_arn("payments-api").as_str(), NODE_ACCESS_KEY)
    );
    assert_eq!(second.role_arn, target);
    assert!(
        second.signed_by.starts_with("ASIASTS") && second.signed_by != first.signed_by,
        "signed with the first hop's credentials: {second:?}"
    );
    assert_eq!(
        first.tags.get("team").map(String::as_str),
        Some("payments"),
        "{first:?}"
    );
    let own: Vec<(&str, &str)> = second
        .tags
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        own,
        [("team", "payments")],
        "only the association's own tags are set again: {second:?}"
    );
    assert_eq!(
        second.inherited.keys().cloned().collect::<Vec<_>>().len(),
        EKS_KEYS.len(),
        "the EKS tags come along: {second:?}"
    );
    assert_eq!(second.inherited["kubernetes-pod-name"], "api-0");
    assert_ne!(
        access_key(&r.body),
        first.signed_by,
        "the pod gets the target role's credentials"
    );
    assert_eq!(access_key(&r.body), format!("ASIASTS{:013}", 2));

    // A target role that does not trust the first one: the pod is told which hop failed.
    c.fake.deny_role(&target);
    let api1 = c.pod("payments", "api-1", "api");
    let token = c.issuer.mint(&api1.token_spec(), Alg::Rs256);
    let r = api1.curl(V4_URL, &token);
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(
        r.body.contains("AccessDenied") && r.body.contains("target role"),
        "{}",
        r.body
    );
    // STS's AccessDenied is final: the same token asked again is answered without calling STS.
    let calls = c.fake.sts_calls().len();
    assert_eq!(api1.curl(V4_URL, &token).status, 403);
    assert_eq!(
        c.fake.sts_calls().len(),
        calls,
        "a denied role is not asked again for the same token"
    );
}

#[test]
fn an_edited_association_file_takes_effect_without_a_restart() {
    let c = Cluster::new(PAYMENTS);
    let agent = c.agent(&[]);
    let worker = c.pod("payments", "worker-0", "worker");
    assert_eq!(
        worker
            .curl(V4_URL, &c.issuer.mint(&worker.token_spec(), Alg::Rs256))
            .status,
        404
    );
    c.write_associations(&format!(
        "{PAYMENTS}{}",
        association("payments", "worker", "payments-worker", "")
    ));
    wait_for("the worker's association", Duration::from_secs(10), || {
        worker
            .curl(V4_URL, &c.issuer.mint(&worker.token_spec(), Alg::Rs256))
            .status
            == 200
    });
    assert!(
        c.fake
            .sts_calls()
            .iter()
            .any(|call| call.role_arn == role_arn("payments-worker"))
    );
    assert!(
        agent.log().contains("associations reloaded"),
        "{}",
        agent.log()
    );
    // A broken edit is refused and what was in force stays.
    c.write_associations("associations: [broken");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        worker
            .curl(V4_URL, &c.issuer.mint(&worker.token_spec(), Alg::Rs256))
            .status,
        200
    );
    assert!(
        agent
            .log()
            .contains("not valid; the previous associations stay in force"),
        "{}",
        agent.log()
    );
    // Removed: new tokens get 404.
    c.write_associations(PAYMENTS);
    wait_for(
        "the worker's association to go",
        Duration::from_secs(10),
        || {
            worker
                .curl(V4_URL, &c.issuer.mint(&worker.token_spec(), Alg::Rs256))
                .status
                == 404
        },
    );
}

#[test]
fn a_token_the_source_refuses_does_not_evict_the_pods_credentials() {
    let c = Cluster::new(PAYMENTS);
    let _agent = c.agent(&[]);
    let api = c.pod("payments", "api-0", "api");
    let good = c.issuer.mint(&api.token_spec(), Alg::Rs256);
    let first = api.curl(V4_URL, &good);
    assert_eq!(first.status, 200, "{}", first.body);
    // Once, a token the source refuses: expired, and one signed by another issuer.
    let expired = c.issuer.mint_with(&api.token_spec(), Alg::Rs256, |claims| {
        claims["exp"] = serde_json::json!(pod_identity_e2e::jwt::now() - 60);
    });
    assert_eq!(api.curl(V4_URL, &expired).status, 400);
    assert_eq!(
        api.curl(V4_URL, &pod_identity_e2e::jwt::forge(&api.token_spec()))
            .status,
        400
    );
    // Then STS goes down: the good token is still served from the cache.
    c.fake.set_sts_fault(Some(Fault {
        status: 500,
        code: "InternalFailure".into(),
    }));
    let again = api.curl(V4_URL, &good);
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(access_key(&again.body), access_key(&first.body));
    assert_eq!(c.fake.sts_calls().len(), 1, "one call, for the good token");
}

#[test]
fn an_sts_outage_keeps_cached_credentials_serving_and_names_sts() {
    let c = Cluster::new(PAYMENTS);
    let agent = c.agent(&[]);
    let api = c.pod("payments", "api-0", "api");
    let token = c.issuer.mint(&api.token_spec(), Alg::Rs256);
    let first = api.curl(V4_URL, &token);
    assert_eq!(first.status, 200, "{}", first.body);
    c.fake.set_sts_fault(Some(Fault {
        status: 503,
        code: "ServiceUnavailable".into(),
    }));
    let again = api.curl(V4_URL, &token);
    assert_eq!(
        again.status, 200,
        "cached credentials keep serving: {}",
        again.body
    );
    assert_eq!(access_key(&again.body), access_key(&first.body));
    // A pod with nothing cached is told what failed.
    let api1 = c.pod("payments", "api-1", "api");
    let r = api1.curl(V4_URL, &c.issuer.mint(&api1.token_spec(), Alg::Rs256));
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("ServiceUnavailable"), "{}", r.body);
    assert!(
        agent.log().contains("upstream call failed") && agent.log().contains("upstream=\"STS\""),
        "{}",
        agent.log()
    );
    // STS throttles with a 400 and `Throttling`: retried like EKS Auth's 429, then named.
    c.fake.set_sts_fault(Some(Fault {
        status: 400,
        code: "Throttling".into(),
    }));
    let api2 = c.pod("payments", "api-2", "api");
    let calls = c.fake.sts_calls().len();
    let r = api2.curl(V4_URL, &c.issuer.mint(&api2.token_spec(), Alg::Rs256));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("Throttling"), "{}", r.body);
    assert!(
        c.fake.sts_calls().len() >= calls + 2,
        "a throttled call is retried: {} calls",
        c.fake.sts_calls().len() - calls
    );
    c.fake.set_sts_fault(None);
    wait_for("STS back", Duration::from_secs(10), || {
        api1.curl(V4_URL, &c.issuer.mint(&api1.token_spec(), Alg::Rs256))
            .status
            == 200
    });
}

/// The API server's `/openid/v1/jwks`: HTTPS with a certificate from the cluster's own CA,
/// serving the issuer's keys to callers presenting `bearer`.
struct ApiServer {
    fake: FakeAws,
    url: String,
    ca: String,
    _pki: pod_identity_e2e::pki::Pki,
}

impl ApiServer {
    fn start(c: &Cluster, jwks: serde_json::Value, bearer: &str) -> ApiServer {
        let pki = pod_identity_e2e::pki::Pki::new("apiserver", &["IP:127.0.0.1"]);
        let fake = FakeAws::start_tls_in(&c.node.netns, "127.0.0.1:0".parse().unwrap(), &pki);
        fake.serve_jwks(jwks, bearer);
        let url = format!("{}/openid/v1/jwks", fake.endpoint());
        ApiServer {
            fake,
            url,
            ca: pki.ca.to_str().unwrap().to_owned(),
            _pki: pki,
        }
    }
}

/// `token` as the agent's service-account token file.
fn token_file(c: &Cluster, token: &str) -> String {
    pod_identity_e2e::secrets::remember(token);
    std::fs::write(c.dir.join("sa-token"), token).unwrap();
    c.path("sa-token")
}

#[test]
fn keys_from_the_api_server_url_are_fetched_with_the_agents_token_and_a_rotation_is_followed() {
    let c = Cluster::new(PAYMENTS);
    let bearer = "agent-service-account-token";
    let apiserver = ApiServer::start(&c, c.issuer.jwks(), bearer);
    let token_file = token_file(&c, bearer);
    let agent = c.agent(&[
        "--jwks-url",
        &apiserver.url,
        "--jwks-token-file",
        &token_file,
        "--jwks-ca-file",
        &apiserver.ca,
    ]);
    let api = c.pod("payments", "api-0", "api");
    assert_eq!(
        api.curl(V4_URL, &c.issuer.mint(&api.token_spec(), Alg::Rs256))
            .status,
        200,
        "{}",
        agent.log()
    );
    let fetches = apiserver.fake.jwks_fetches();
    assert!(fetches >= 1);
    // The issuer rotates to new keys (new key ids): a token signed with them prompts a fetch.
    let rotated = Issuer::new(ISSUER, "rotated");
    apiserver.fake.serve_jwks(rotated.jwks(), bearer);
    let r = api.curl(V4_URL, &rotated.mint(&api.token_spec(), Alg::Es256));
    assert_eq!(r.status, 200, "{}\n{}", r.body, agent.log());
    assert_eq!(
        apiserver.fake.jwks_fetches(),
        fetches + 1,
        "one fetch for the unknown key id"
    );
    // Old keys are gone from the set: tokens they signed are refused.
    let r = api.curl(V4_URL, &c.issuer.mint(&api.token_spec(), Alg::Rs256));
    assert_eq!(r.status, 400, "{}", r.body);
}

#[test]
fn keys_the_url_refuses_are_named() {
    let c = Cluster::new(PAYMENTS);
    let apiserver = ApiServer::start(&c, c.issuer.jwks(), "the-right-token");
    let token_file = token_file(&c, "a-wrong-token");
    let agent = c.agent(&[
        "--jwks-url",
        &apiserver.url,
        "--jwks-token-file",
        &token_file,
        "--jwks-ca-file",
        &apiserver.ca,
    ]);
    let api = c.pod("payments", "api-0", "api");
    let r = api.curl(V4_URL, &c.issuer.mint(&api.token_spec(), Alg::Rs256));
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(
        r.body.contains("IssuerKeysUnavailable") && !r.body.contains("--jwks-token-file"),
        "the pod is told the keys are unavailable, not how the agent fetches them: {}",
        r.body
    );
    let log = agent.log();
    assert!(
        log.contains("401") && log.contains("--jwks-token-file"),
        "{log}"
    );
    assert!(
        agent.log().contains("cannot fetch the issuer's keys yet"),
        "{}",
        agent.log()
    );
    assert_eq!(c.fake.sts_calls().len(), 0);
}

#[test]
fn boto3_gets_role_credentials_through_the_whole_path() {
    let c = Cluster::new(PAYMENTS);
    let _agent = c.agent(&[]);
    let api = c.pod("payments", "api-0", "api");
    let token_file = api.write_token_file(&c.issuer.mint(&api.token_spec(), Alg::Es256));
    let [key, ..] = api
        .boto3(V4_URL, &token_file)
        .unwrap_or_else(|e| panic!("boto3: {e}"));
    assert!(key.starts_with("ASIASTS"), "{key}");
    assert_eq!(c.fake.sts_calls().len(), 1);
}

#[test]
fn sts_mode_refuses_to_start_without_what_it_needs() {
    let c = Cluster::new(PAYMENTS);
    let bad = |args: &[&str], says: &str| {
        let launch = Launch {
            endpoint: false,
            ..Launch::default()
        };
        let mut agent = Agent::launch(&c.node, &c.fake, args, &launch);
        let status = agent.wait_exit(Duration::from_secs(20));
        assert!(!status.success(), "{args:?} must not start");
        assert!(agent.log().contains(says), "{args:?}: {}", agent.log());
    };
    let (assoc, jwks) = (c.path("associations.yaml"), c.path("jwks.json"));
    bad(
        &[
            "--credential-source",
            "sts",
            "--jwks-file",
            &jwks,
            "--token-issuer",
            ISSUER,
        ],
        "needs --associations-file",
    );
    bad(
        &[
            "--credential-source",
            "sts",
            "--associations-file",
            &assoc,
            "--token-issuer",
            ISSUER,
        ],
        "--jwks-file or --jwks-url",
    );
    bad(
        &[
            "--credential-source",
            "sts",
            "--associations-file",
            &assoc,
            "--jwks-file",
            &jwks,
        ],
        "needs --token-issuer",
    );
    // Keys over plain HTTP could be swapped on the way, and the agent's token read.
    let http = format!("{}/openid/v1/jwks", c.fake.endpoint());
    bad(
        &[
            "--credential-source",
            "sts",
            "--associations-file",
            &assoc,
            "--jwks-url",
            &http,
            "--token-issuer",
            ISSUER,
        ],
        "an https URL is needed",
    );
    bad(
        &["--associations-file", &assoc],
        "applies only to --credential-source sts",
    );
    // EKS Auth mode may verify tokens with the issuer's keys, but an issuer alone is nothing
    // to verify with.
    bad(
        &["--token-issuer", ISSUER],
        "--token-issuer needs the issuer's keys",
    );
    std::fs::write(
        c.dir.join("broken.yaml"),
        "associations:\n  - namespace: a\n    serviceAccount: b\n    roleArn: not-an-arn\n",
    )
    .unwrap();
    let broken = c.path("broken.yaml");
    bad(
        &[
            "--credential-source",
            "sts",
            "--associations-file",
            &broken,
            "--jwks-file",
            &jwks,
            "--token-issuer",
            ISSUER,
        ],
        "not an IAM role ARN",
    );
    let missing = Path::new("/nonexistent/jwks.json").to_str().unwrap();
    bad(
        &[
            "--credential-source",
            "sts",
            "--associations-file",
            &assoc,
            "--jwks-file",
            missing,
            "--token-issuer",
            ISSUER,
        ],
        "--jwks-file /nonexistent/jwks.json",
    );
}

#[test]
fn keys_over_https_are_trusted_through_the_cluster_ca_only() {
    let c = Cluster::new(PAYMENTS);
    let apiserver = ApiServer::start(&c, c.issuer.jwks(), "sa-token");
    let token_file = token_file(&c, "sa-token");
    let api = c.pod("payments", "api-0", "api");
    {
        let agent = c.agent(&[
            "--jwks-url",
            &apiserver.url,
            "--jwks-token-file",
            &token_file,
            "--jwks-ca-file",
            &apiserver.ca,
        ]);
        let r = api.curl(V4_URL, &c.issuer.mint(&api.token_spec(), Alg::Rs256));
        assert_eq!(r.status, 200, "{}\n{}", r.body, agent.log());
    }
    // Without the CA, the certificate is not trusted, and the answer says so.
    let agent = c.agent(&[
        "--jwks-url",
        &apiserver.url,
        "--jwks-token-file",
        &token_file,
    ]);
    let r = api.curl(V4_URL, &c.issuer.mint(&api.token_spec(), Alg::Rs256));
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(r.body.contains("IssuerKeysUnavailable"), "{}", r.body);
    assert!(
        agent.log().to_lowercase().contains("certificate"),
        "{}",
        agent.log()
    );
}

#[test]
fn doctor_checks_sts_instead_of_eks_on_an_sts_node() {
    let c = Cluster::new(PAYMENTS);
    let _agent = c.agent(&[]);
    let host = c.node.host_cgroup("system.slice/doctor.scope");
    let out = pod_identity_e2e::agent::cli(
        &c.node,
        Some(&host),
        &c.fake,
        pod_identity_e2e::agent::Caller::Node,
        &["doctor"],
    );
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let sts = out
        .stdout
        .lines()
        .find(|l| l.contains("STS"))
        .unwrap_or_else(|| panic!("no STS check:\n{}", out.stdout));
    assert!(
        sts.starts_with("ok")
            && sts.contains(&format!(
                "arn:aws:sts::{ACCOUNT}:assumed-role/node-role/{NODE_ACCESS_KEY}"
            )),
        "{}",
        out.stdout
    );
    assert!(
        !out.stdout.contains("EKS Auth") && !out.stdout.contains("stock add-on"),
        "no EKS checks off EKS:\n{}",
        out.stdout
    );
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("ok") && l.contains("credentials from sts")),
        "{}",
        out.stdout
    );
}

/// The external ID the agent derived for `association` (`namespace/serviceAccount`), from its log.
fn derived_external_id(log: &str, association: &str) -> String {
    let id = log
        .lines()
        .find(|l| l.contains(&format!("association={association} ")) && l.contains("external_id="))
        .and_then(|l| l.split("external_id=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no derived external ID for {association} in the log:\n{log}"))
        .to_owned();
    assert!(id.starts_with("pia-") && id.len() == 36, "{id}");
    id
}

/// The association file's policy: only `s3:GetObject`, written as YAML.
const READ_ONLY: &str = "    policy:\n      Version: '2012-10-17'\n      Statement:\n        - {Effect: Allow, Action: 's3:GetObject', Resource: '*'}\n";

/// The pods' rows as `pods --json` prints them, by pod name.
fn pod_rows(agent: &Agent) -> BTreeMap<String, serde_json::Value> {
    let rows: Vec<serde_json::Value> = serde_json::from_str(&agent.pods_cli(&["--json"])).unwrap();
    rows.into_iter()
        .map(|r| (r["pod"].as_str().unwrap_or_default().to_owned(), r))
        .collect()
}

#[test]
fn sessions_with_tags_off_carry_none_and_a_session_policy_scopes_them() {
    let c = Cluster::new(&format!(
        "associations:\n{}{}",
        association(
            "payments",
            "api",
            "shared-reader",
            &format!("    disableSessionTags: true\n{READ_ONLY}")
        ),
        association(
            "batch",
            "report",
            "reporter",
            "    disableSessionTags: true\n"
        ),
    ));
    let agent = c.agent(&[]);
    let api = c.pod("payments", "api-0", "api");
    let r = api.curl(V4_URL, &c.issuer.mint(&api.token_spec(), Alg::Rs256));
    assert_eq!(r.status, 200, "{}\n{}", r.body, agent.log());
    let report = c.pod("batch", "report-0", "report");
    let r2 = report.curl(V4_URL, &c.issuer.mint(&report.token_spec(), Alg::Rs256));
    assert_eq!(r2.status, 200, "{}\n{}", r2.body, agent.log());

    let calls = c.fake.sts_calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    for call in &calls {
        assert!(
            call.tags.is_empty() && call.transitive_keys.is_empty(),
            "none of EKS's session tags: {call:?}"
        );
    }
    assert_eq!(
        calls[0].policy.as_deref(),
        Some(
            r#"{"Statement":[{"Action":"s3:GetObject","Effect":"Allow","Resource":"*"}],"Version":"2012-10-17"}"#
        ),
        "the policy as compact JSON"
    );
    assert_eq!(calls[1].policy, None);
    // The issued session is scoped by the policy it was given.
    let key = access_key(&r.body);
    assert!(c.fake.session_allows(&key, "s3:GetObject"));
    assert!(
        !c.fake.session_allows(&key, "s3:PutObject"),
        "the policy scopes the session down"
    );
    assert!(c.fake.session_allows(&access_key(&r2.body), "s3:PutObject"));
    assert!(c.fake.session(&key).unwrap().tags.is_empty());

    // The pods' rows say how each session is scoped; the doctor names them.
    let rows = pod_rows(&agent);
    assert_eq!(
        rows["api-0"]["session"],
        serde_json::json!({"tags": false, "policy": true})
    );
    assert_eq!(
        rows["report-0"]["session"],
        serde_json::json!({"tags": false, "policy": false})
    );
    let host = c.node.host_cgroup("system.slice/doctor.scope");
    let doctor = pod_identity_e2e::agent::cli(
        &c.node,
        Some(&host),
        &c.fake,
        pod_identity_e2e::agent::Caller::Node,
        &["doctor"],
    );
    let sessions = doctor
        .stdout
        .lines()
        .find(|l| l.contains("sessions"))
        .unwrap_or_else(|| panic!("no sessions check:\n{}", doctor.stdout));
    assert!(
        sessions.starts_with("ok")
            && sessions.contains("2 associations, 2 with session tags off")
            && sessions.contains("payments/api-0: tags off, scoped by a session policy")
            && sessions.contains("batch/report-0: tags off;")
            && sessions.contains("1 scoped by a session policy"),
        "{}",
        doctor.stdout
    );

    // EKS's rules, with what was in force kept: a policy with tags on, tags with tags off, a
    // policy that is not JSON, one over 2,048 characters.
    let in_force = c.fake.sts_calls().len();
    let long = format!(
        "    disableSessionTags: true\n    policy: {{Statement: [{{Effect: Allow, Action: '{}', Resource: '*'}}]}}\n",
        "s".repeat(2048)
    );
    for (broken, why) in [
        (
            READ_ONLY.to_owned(),
            "a policy needs disableSessionTags: true",
        ),
        (
            "    disableSessionTags: true\n    tags: {team: a}\n".to_owned(),
            "disableSessionTags turns them off",
        ),
        (
            "    disableSessionTags: true\n    policy: '{not json'\n".to_owned(),
            "not valid JSON",
        ),
        (long, "STS and EKS take at most 2048"),
        (
            "    externalId: payments-api\n".to_owned(),
            "give targetRoleArn, or drop externalId",
        ),
    ] {
        c.write_associations(&format!(
            "associations:\n{}",
            association("payments", "api", "shared-reader", &broken)
        ));
        // The file is looked at on lookups: a token to look up with.
        wait_for(why, Duration::from_secs(10), || {
            api.curl(V4_URL, &c.issuer.mint(&api.token_spec(), Alg::Rs256));
            agent.log().contains(why)
        });
        let again = c.pod(
            "payments",
            &format!("api-{}", c.fake.sts_calls().len() + 1),
            "api",
        );
        let r = again.curl(V4_URL, &c.issuer.mint(&again.token_spec(), Alg::Rs256));
        assert_eq!(
            r.status, 200,
            "{why}: what was in force still serves: {}",
            r.body
        );
    }
    let kept = c.fake.sts_calls();
    assert!(
        kept[in_force..]
            .iter()
            .all(|call| call.tags.is_empty() && call.policy == calls[0].policy),
        "the association in force (tags off, the policy) is the one used: {:?}",
        &kept[in_force..]
    );
    // The doctor reads the file as it is now, and says the agent kept the previous one.
    let doctor = pod_identity_e2e::agent::cli(
        &c.node,
        Some(&host),
        &c.fake,
        pod_identity_e2e::agent::Caller::Node,
        &["doctor"],
    );
    let sessions = doctor
        .stdout
        .lines()
        .find(|l| l.contains("sessions"))
        .unwrap_or_default();
    assert!(
        sessions.starts_with("warn")
            && sessions.contains("give targetRoleArn")
            && sessions.contains("the agent keeps the associations it last read"),
        "{}",
        doctor.stdout
    );
}

#[test]
fn a_target_role_is_assumed_with_the_external_id_its_trust_policy_requires() {
    let (first, target) = (role_arn("payments-api"), role_arn("cross-account-reader"));
    let c = Cluster::new(&format!(
        "associations:\n{}{}",
        association(
            "payments",
            "api",
            "payments-api",
            &format!("    targetRoleArn: {target}\n    disableSessionTags: true\n{READ_ONLY}")
        ),
        association(
            "search",
            "indexer",
            "search-indexer",
            &format!("    targetRoleArn: {target}\n    externalId: search-indexer:reader\n")
        ),
    ));
    let agent = c.agent(&[]);
    // The log names the external ID the agent derived, so the trust policy can require it.
    let log = agent.log();
    let derived = derived_external_id(&log, "payments/api");
    assert!(
        !log.contains("association=search/indexer"),
        "a given external ID is not announced as derived:\n{log}"
    );
    c.fake.require_external_id(&target, &derived);

    let api = c.pod("payments", "api-0", "api");
    let r = api.curl(V4_URL, &c.issuer.mint(&api.token_spec(), Alg::Rs256));
    assert_eq!(r.status, 200, "{}\n{}", r.body, agent.log());
    let calls = c.fake.sts_calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(
        (calls[0].role_arn.as_str(), calls[0].external_id.as_deref()),
        (first.as_str(), None)
    );
    assert_eq!(
        calls[0].policy, None,
        "the first role is not scoped, as in EKS"
    );
    assert_eq!(calls[1].role_arn, target);
    assert_eq!(calls[1].external_id.as_deref(), Some(derived.as_str()));
    assert!(
        calls[1].policy.is_some(),
        "the target role's session is scoped"
    );
    assert!(!c.fake.session_allows(&access_key(&r.body), "s3:PutObject"));

    // The same target role, another association: its own external ID, which this trust policy
    // does not name, so the chained hop is refused (the confused-deputy guard).
    let indexer = c.pod("search", "indexer-0", "indexer");
    let r = indexer.curl(V4_URL, &c.issuer.mint(&indexer.token_spec(), Alg::Rs256));
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(
        r.body.contains("AccessDenied") && r.body.contains("target role"),
        "{}",
        r.body
    );
    let last = c.fake.sts_calls().pop().unwrap();
    assert_eq!(last.external_id.as_deref(), Some("search-indexer:reader"));

    // The doctor shows both, and which one the agent derived.
    let host = c.node.host_cgroup("system.slice/doctor.scope");
    let doctor = pod_identity_e2e::agent::cli(
        &c.node,
        Some(&host),
        &c.fake,
        pod_identity_e2e::agent::Caller::Node,
        &["doctor"],
    );
    assert!(
        doctor.stdout.contains(&format!(
            "payments/api -> {target} requires sts:ExternalId {derived} (derived), search/indexer -> {target} requires sts:ExternalId search-indexer:reader;"
        )),
        "{}",
        doctor.stdout
    );
}
