//! The operator's tools. `associations` against the fake EKS control plane (pagination,
//! table, JSON, the join with a node's pods and the fix it prints, create, update and delete with
//! session policies, session tags off and target roles' external IDs), and every `doctor` check
//! in its passing and its failing state.

use std::time::Duration;

use pod_identity_e2e::{
    Agent, CgroupShape, FakeAws, NODE_ACCESS_KEY, NODE_SECRET, Node, OPERATOR_ACCESS_KEY,
    agent::{Caller, CliOutput, cli, cli_with_stdin, cli_wrapped},
    fake_aws::role_arn,
};

use super::{Setup, V4_URL};

fn associations(s: &Setup, args: &[&str]) -> CliOutput {
    let mut argv = vec!["associations"];
    argv.extend_from_slice(args);
    cli(&s.node, None, &s.fake, Caller::Operator, &argv)
}

/// Lines of a table, without its header.
fn rows(table: &str) -> Vec<&str> {
    table
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .collect()
}

#[test]
fn associations_lists_every_page_as_a_table_and_as_json() {
    let s = Setup::new();
    // 2 from the setup, 148 more: two pages of 100.
    for i in 0..148 {
        s.fake.associate(
            &format!("team-{}", i % 10),
            &format!("app-{i}"),
            &format!("role-{i}"),
        );
    }
    let json = associations(&s, &["--json"]).ok();
    let listed: Vec<serde_json::Value> = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(listed.len(), 150);
    let api = s.fake.api_calls();
    let count = |op: &str| api.iter().filter(|c| c.operation == op).count();
    assert_eq!(
        count("ListPodIdentityAssociations"),
        2,
        "pagination: {api:?}"
    );
    assert_eq!(count("DescribePodIdentityAssociation"), 150);
    assert!(
        api.iter()
            .all(|c| c.signed_by == OPERATOR_ACCESS_KEY && c.status == 200),
        "{api:?}"
    );
    let payments = listed
        .iter()
        .find(|a| a["namespace"] == "payments")
        .unwrap();
    assert_eq!(payments["serviceAccount"], "api");
    assert_eq!(payments["roleArn"], role_arn("payments-api-role"));
    assert!(
        payments["associationId"]
            .as_str()
            .unwrap()
            .starts_with("a-")
    );

    let table = associations(&s, &[]).ok().stdout;
    assert!(table.starts_with("ASSOCIATION"), "{table}");
    assert_eq!(rows(&table).len(), 150);

    let one_namespace = associations(&s, &["--namespace", "team-3"]).ok().stdout;
    assert_eq!(rows(&one_namespace).len(), 15, "{one_namespace}");
    assert!(rows(&one_namespace).iter().all(|r| r.contains(" team-3 ")));
    let one_account = associations(
        &s,
        &[
            "--namespace",
            "search",
            "--service-account",
            "indexer",
            "--json",
        ],
    )
    .ok()
    .stdout;
    let one: Vec<serde_json::Value> = serde_json::from_str(&one_account).unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0]["roleArn"], role_arn("search-indexer-role"));
}

#[test]
fn associations_create_and_delete_round_trip_and_the_new_association_serves_pods() {
    let s = Setup::with_args(&["--negative-ttl", "200ms"]);
    let pod = s.pod(
        "reports",
        "gen-0",
        "generator",
        CgroupShape::SystemdBurstable,
    );
    let token = pod.token();
    let before = pod.curl(V4_URL, &token);
    assert_eq!(before.status, 404, "no association yet: {}", before.body);

    let role = role_arn("reports-role");
    let target = "arn:aws:iam::210987654321:role/reports-reader";
    let created = associations(
        &s,
        &[
            "create",
            "--namespace",
            "reports",
            "--service-account",
            "generator",
            "--role-arn",
            &role,
            "--target-role-arn",
            target,
            "--tag",
            "team=reports",
            "--tag",
            "cost-center=42",
        ],
    )
    .ok();
    let id = created.stdout.trim().to_owned();
    assert!(
        id.starts_with("a-") && !id.contains(' '),
        "stdout is the ID alone: {:?}",
        created.stdout
    );
    assert!(
        created
            .stderr
            .contains(&format!("created association {id}")),
        "{}",
        created.stderr
    );
    let stored = s
        .fake
        .associations()
        .into_iter()
        .find(|a| a.id == id)
        .expect("created in the fake");
    assert_eq!(
        (
            stored.namespace.as_str(),
            stored.service_account.as_str(),
            stored.role_arn.as_str()
        ),
        ("reports", "generator", role.as_str())
    );
    assert_eq!(stored.target_role_arn.as_deref(), Some(target));
    assert_eq!(stored.tags.get("team").map(String::as_str), Some("reports"));
    assert_eq!(
        stored.tags.get("cost-center").map(String::as_str),
        Some("42")
    );

    // Described with everything it was created with.
    let listed: Vec<serde_json::Value> = serde_json::from_str(
        &associations(&s, &["--namespace", "reports", "--json"])
            .ok()
            .stdout,
    )
    .unwrap();
    assert_eq!(listed[0]["targetRoleArn"], target);
    assert_eq!(listed[0]["tags"]["team"], "reports");

    // EKS Auth now serves the pod under the new association (once the 404 is forgotten).
    std::thread::sleep(Duration::from_millis(300));
    let after = pod.curl(V4_URL, &token);
    assert_eq!(after.status, 200, "{}", after.body);
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&s.agent.pods_cli(&["--json"])).unwrap();
    assert_eq!(rows[0]["association_id"], id.as_str());

    // EKS refuses a second association for the same service account.
    let duplicate = associations(
        &s,
        &[
            "create",
            "--namespace",
            "reports",
            "--service-account",
            "generator",
            "--role-arn",
            &role,
        ],
    );
    assert_ne!(duplicate.code, 0);
    assert!(
        duplicate.stderr.contains("ResourceInUseException") && duplicate.stderr.contains(&id),
        "{}",
        duplicate.stderr
    );

    let deleted = associations(&s, &["delete", &id]).ok();
    assert!(
        deleted
            .stdout
            .contains(&format!("deleted association {id}"))
            && deleted.stdout.contains("reports/generator"),
        "{}",
        deleted.stdout
    );
    assert!(s.fake.associations().iter().all(|a| a.id != id));
    let again = associations(&s, &["delete", &id]);
    assert_ne!(again.code, 0);
    assert!(
        again.stderr.contains("ResourceNotFoundException"),
        "{}",
        again.stderr
    );

    // A tag that is not KEY=VALUE is refused before any call.
    let bad = associations(
        &s,
        &[
            "create",
            "--namespace",
            "x",
            "--service-account",
            "y",
            "--role-arn",
            &role,
            "--tag",
            "novalue",
        ],
    );
    assert_ne!(bad.code, 0);
    assert!(bad.stderr.contains("is not KEY=VALUE"), "{}", bad.stderr);
}

#[test]
fn associations_join_flags_pods_without_an_association_with_the_fix() {
    let s = Setup::new();
    let served = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    let orphan = s.pod(
        "search",
        "crawler-0",
        "crawler",
        CgroupShape::CgroupfsBestEffort,
    );
    let orphan_twin = s.pod(
        "search",
        "crawler-1",
        "crawler",
        CgroupShape::SystemdGuaranteed,
    );
    assert_eq!(served.curl(V4_URL, &served.token()).status, 200);
    for p in [&orphan, &orphan_twin] {
        let r = p.curl(V4_URL, &p.token());
        assert_eq!(r.status, 404, "{}", r.body);
    }
    let pods_json = s.agent.pods_cli(&["--json"]);
    let table = s.agent.pods_cli(&[]);
    assert!(
        table.contains("ResourceNotFoundException (404,"),
        "the pods table shows the last error:\n{table}"
    );
    let file = std::env::temp_dir().join(format!("{}-pods.json", s.node.netns));
    std::fs::write(&file, &pods_json).unwrap();

    let joined = associations(&s, &["--pods", file.to_str().unwrap()])
        .ok()
        .stdout;
    let _ = std::fs::remove_file(&file);
    let line = |pod: &str| {
        joined
            .lines()
            .find(|l| l.contains(pod))
            .unwrap_or_else(|| panic!("no row for {pod}:\n{joined}"))
    };
    let payments_id = s
        .fake
        .associations()
        .into_iter()
        .find(|a| a.namespace == "payments")
        .unwrap()
        .id;
    assert!(
        line("api-0").contains("served") && line("api-0").contains(&payments_id),
        "{joined}"
    );
    assert!(line("crawler-0").contains("no association"), "{joined}");
    assert!(line("crawler-1").contains("no association"), "{joined}");
    let fix = "aws eks create-pod-identity-association --cluster-name e2e-cluster --region us-west-2 --namespace search --service-account crawler --role-arn arn:aws:iam::123456789012:role/ROLE_NAME";
    assert_eq!(
        joined.matches(fix).count(),
        1,
        "one fix per service account:\n{joined}"
    );

    // The same from standard input, as JSON.
    let out = cli_with_stdin(
        &s.node,
        &s.fake,
        Caller::Operator,
        &["associations", "--pods", "-", "--json"],
        &pods_json,
    )
    .ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let states: Vec<(&str, &str)> = v["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["pod"].as_str().unwrap(), p["state"].as_str().unwrap()))
        .collect();
    assert!(
        states.contains(&("api-0", "served")) && states.contains(&("crawler-0", "no-association")),
        "{states:?}"
    );
    assert_eq!(v["fixes"][0]["command"], fix);
}

/// Only `s3:GetObject`, as an operator would write the file (indented).
const READ_ONLY_POLICY: &str = "{\n  \"Version\": \"2012-10-17\",\n  \"Statement\": [\n    {\"Effect\": \"Allow\", \"Action\": \"s3:GetObject\", \"Resource\": \"*\"}\n  ]\n}\n";
const READ_ONLY_COMPACT: &str = r#"{"Statement":[{"Action":"s3:GetObject","Effect":"Allow","Resource":"*"}],"Version":"2012-10-17"}"#;

#[test]
fn associations_with_a_session_policy_tags_off_and_a_target_role_scope_the_pods_session() {
    let s = Setup::new();
    let pod = s.pod(
        "reports",
        "gen-0",
        "generator",
        CgroupShape::SystemdBurstable,
    );
    let policy = std::env::temp_dir().join(format!("{}-policy.json", s.node.netns));
    std::fs::write(&policy, READ_ONLY_POLICY).unwrap();
    let policy = policy.to_str().unwrap().to_owned();
    let (role, target) = (role_arn("reports-role"), role_arn("reports-reader"));
    let create = |extra: &[&str]| {
        let mut argv = vec![
            "create",
            "--namespace",
            "reports",
            "--service-account",
            "generator",
            "--role-arn",
            &role,
        ];
        argv.extend_from_slice(extra);
        associations(&s, &argv)
    };

    // EKS's rules, answered by EKS and passed on whole: a policy needs session tags off, and
    // is at most 2,048 characters.
    let refused = create(&["--policy", &policy]);
    assert_ne!(refused.code, 0);
    assert!(
        refused.stderr.contains("InvalidParameterException")
            && refused.stderr.contains("Session tags must be disabled"),
        "{}",
        refused.stderr
    );
    let long = std::env::temp_dir().join(format!("{}-long.json", s.node.netns));
    let action = "s".repeat(2048);
    std::fs::write(
        &long,
        format!(r#"{{"Statement":[{{"Effect":"Allow","Action":"{action}"}}]}}"#),
    )
    .unwrap();
    let refused = create(&["--policy", long.to_str().unwrap(), "--disable-session-tags"]);
    let _ = std::fs::remove_file(&long);
    assert!(
        refused.code != 0 && refused.stderr.contains("less than or equal to 2048"),
        "{}",
        refused.stderr
    );
    let yaml = std::env::temp_dir().join(format!("{}-policy.yaml", s.node.netns));
    std::fs::write(&yaml, "Statement: []\n").unwrap();
    let not_json = create(&["--policy", yaml.to_str().unwrap(), "--disable-session-tags"]);
    let _ = std::fs::remove_file(&yaml);
    assert!(
        not_json.code != 0 && not_json.stderr.contains("not a JSON policy document"),
        "refused before EKS is asked: {}",
        not_json.stderr
    );
    assert!(
        s.fake
            .associations()
            .iter()
            .all(|a| a.namespace != "reports")
    );

    // Created: the policy compacted, tags off, and the trust statement for the target role.
    let created = create(&[
        "--policy",
        &policy,
        "--disable-session-tags",
        "--target-role-arn",
        &target,
    ])
    .ok();
    let id = created.stdout.trim().to_owned();
    let stored = s
        .fake
        .associations()
        .into_iter()
        .find(|a| a.id == id)
        .unwrap();
    assert_eq!(stored.policy.as_deref(), Some(READ_ONLY_COMPACT));
    assert!(stored.disable_session_tags);
    let external_id = stored
        .external_id
        .clone()
        .expect("EKS generated an external ID");
    assert!(
        created
            .stderr
            .contains("session tags off, scoped by a session policy")
            && created
                .stderr
                .contains(&format!("the target role {target} must trust {role}"))
            && created
                .stderr
                .contains(&format!(r#""sts:ExternalId": "{external_id}""#))
            && !created.stderr.contains("sts:TagSession"),
        "{}",
        created.stderr
    );

    // Listed: abbreviated in the table, whole in JSON.
    let table = associations(&s, &["--namespace", "reports"]).ok().stdout;
    assert!(
        table.lines().next().unwrap().contains("EXTERNAL-ID"),
        "{table}"
    );
    let row = rows(&table)[0];
    assert!(
        row.contains(&external_id)
            && row.contains(" off ")
            && row.contains(r#"{"Statement":[{"Action":"s3:GetObject..."#),
        "{table}"
    );
    let json: Vec<serde_json::Value> = serde_json::from_str(
        &associations(&s, &["--namespace", "reports", "--json"])
            .ok()
            .stdout,
    )
    .unwrap();
    assert_eq!(json[0]["policy"], READ_ONLY_COMPACT);
    assert_eq!(json[0]["disableSessionTags"], true);
    assert_eq!(json[0]["externalId"], external_id.as_str());

    // The pod's session is the scoped one (EKS Auth's to scope: what this shows is that the
    // agent hands the pod the credentials EKS Auth scoped), and the join and the doctor say so.
    let r = pod.curl(V4_URL, &pod.token());
    assert_eq!(r.status, 200, "{}", r.body);
    let key = serde_json::from_str::<serde_json::Value>(&r.body).unwrap()["AccessKeyId"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(s.fake.session_allows(&key, "s3:GetObject"));
    assert!(!s.fake.session_allows(&key, "s3:PutObject"));
    assert!(
        s.fake.session(&key).unwrap().tags.is_empty(),
        "no session tags"
    );
    let pods_json = s.agent.pods_cli(&["--json"]);
    let joined = cli_with_stdin(
        &s.node,
        &s.fake,
        Caller::Operator,
        &["associations", "--pods", "-"],
        &pods_json,
    )
    .ok();
    let line = joined
        .stdout
        .lines()
        .find(|l| l.contains("gen-0"))
        .unwrap()
        .to_owned();
    assert!(line.contains("policy, no tags"), "{}", joined.stdout);
    let joined = cli_with_stdin(
        &s.node,
        &s.fake,
        Caller::Operator,
        &["associations", "--pods", "-", "--json"],
        &pods_json,
    )
    .ok();
    let v: serde_json::Value = serde_json::from_str(&joined.stdout).unwrap();
    let row = v["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pod"] == "gen-0")
        .unwrap();
    assert_eq!(
        row["session"],
        serde_json::json!({"tags": false, "policy": true})
    );
    let checks = doctor_checks(&doctor(&s, None, Caller::Node, &[]));
    let (status, text) = check(&checks, "sessions");
    assert!(
        status == "ok" && text.contains("reports/gen-0: tags off, scoped by a session policy"),
        "{text}"
    );

    // Updated: EKS refuses tags on while a policy is set, and nothing changes.
    let refused = associations(&s, &["update", &id, "--enable-session-tags"]);
    assert!(
        refused.code != 0 && refused.stderr.contains("Session tags must be disabled"),
        "{}",
        refused.stderr
    );
    assert_eq!(
        s.fake
            .associations()
            .into_iter()
            .find(|a| a.id == id)
            .unwrap()
            .policy
            .as_deref(),
        Some(READ_ONLY_COMPACT)
    );
    let nothing = associations(&s, &["update", &id]);
    assert!(
        nothing.code != 0 && nothing.stderr.contains("nothing to change"),
        "{}",
        nothing.stderr
    );
    let missing = associations(&s, &["update", "a-nope", "--no-policy"]);
    assert!(
        missing.code != 0 && missing.stderr.contains("ResourceNotFoundException"),
        "{}",
        missing.stderr
    );
    // Policy off, tags on, the target role gone, another role: one call.
    let other = role_arn("reports-role-2");
    let updated = associations(
        &s,
        &[
            "update",
            &id,
            "--no-policy",
            "--enable-session-tags",
            "--no-target-role",
            "--role-arn",
            &other,
        ],
    )
    .ok();
    assert!(
        updated
            .stdout
            .contains(&format!("updated association {id}"))
            && updated.stdout.contains("EKS session tags on"),
        "{}",
        updated.stdout
    );
    let stored = s
        .fake
        .associations()
        .into_iter()
        .find(|a| a.id == id)
        .unwrap();
    assert_eq!(
        (
            stored.policy,
            stored.disable_session_tags,
            stored.target_role_arn,
            stored.external_id,
            stored.role_arn
        ),
        (None, false, None, None, other)
    );
    // A policy from standard input, with tags off again.
    let updated = cli_with_stdin(
        &s.node,
        &s.fake,
        Caller::Operator,
        &[
            "associations",
            "update",
            &id,
            "--policy",
            "-",
            "--disable-session-tags",
        ],
        READ_ONLY_POLICY,
    )
    .ok();
    assert!(
        updated.stdout.contains("scoped by a session policy"),
        "{}",
        updated.stdout
    );
    let api = s.fake.api_calls();
    assert!(
        api.iter()
            .filter(|c| c.operation == "UpdatePodIdentityAssociation")
            .count()
            >= 4,
        "{api:?}"
    );
}

/// The checks of one doctor run: name -> (status, whole text of the check).
fn doctor_checks(out: &CliOutput) -> Vec<(String, String, String)> {
    let mut checks: Vec<(String, String, String)> = Vec::new();
    for line in out.stdout.lines() {
        let status = line.split_whitespace().next().unwrap_or("");
        if ["ok", "warn", "fail"].contains(&status) {
            let name = line[5..].get(..17).unwrap_or("").trim().to_owned();
            checks.push((name, status.to_owned(), line.to_owned()));
        } else if let Some(last) = checks.last_mut() {
            last.2.push('\n');
            last.2.push_str(line);
        }
    }
    checks
}

fn check(checks: &[(String, String, String)], name: &str) -> (String, String) {
    checks
        .iter()
        .find(|(n, _, _)| n == name)
        .map(|(_, status, text)| (status.clone(), text.clone()))
        .unwrap_or_else(|| panic!("no {name} check in {checks:?}"))
}

fn doctor(s: &Setup, cgroup: Option<&std::path::Path>, caller: Caller, args: &[&str]) -> CliOutput {
    let mut argv = vec!["doctor"];
    argv.extend_from_slice(args);
    cli(&s.node, cgroup, &s.fake, caller, &argv)
}

const ALL_CHECKS: [&str; 12] = [
    "cgroup root",
    "kernel programs",
    "agent",
    "listeners",
    "redirect",
    "metrics",
    "region",
    "node credentials",
    "EKS Auth",
    "cluster",
    "stock add-on",
    "sessions",
];

#[test]
fn doctor_fails_each_check_with_how_to_fix_it() {
    let s = Setup::new();
    let host = s.node.host_cgroup("system.slice/doctor.scope");

    // The node role lacks eks-auth:AssumeRoleForPodIdentity; the cluster is still being created;
    // the stock add-on is installed too.
    s.fake.deny_eks_auth(NODE_ACCESS_KEY);
    s.fake.set_cluster_status(Some("CREATING"));
    s.fake.set_addon("eks-pod-identity-agent", Some("ACTIVE"));
    let out = doctor(&s, Some(&host), Caller::Node, &[]);
    assert_ne!(out.code, 0);
    let checks = doctor_checks(&out);
    let (status, text) = check(&checks, "EKS Auth");
    assert_eq!(status, "fail");
    assert!(
        text.contains("AccessDeniedException")
            && text.contains("fix: grant the node role eks-auth:AssumeRoleForPodIdentity"),
        "{text}"
    );
    let (status, text) = check(&checks, "cluster");
    assert_eq!(status, "fail");
    assert!(text.contains("is CREATING"), "{text}");
    let (status, text) = check(&checks, "stock add-on");
    assert_eq!(status, "fail");
    assert!(text.contains("fix: remove it: aws eks delete-addon --cluster-name e2e-cluster --addon-name eks-pod-identity-agent"), "{text}");

    // The node's key is unknown to AWS (rotated away, a stale credentials file): the doctor names
    // the credentials, not the network.
    s.fake.revoke_key(NODE_ACCESS_KEY);
    let out = doctor(&s, Some(&host), Caller::Node, &[]);
    let (status, text) = check(&doctor_checks(&out), "EKS Auth");
    assert_eq!(status, "fail");
    assert!(
        text.contains("rejected the node's credentials")
            && text.contains("UnrecognizedClientException"),
        "{text}"
    );
    assert!(
        text.contains("fix: the node credentials are invalid or expired")
            && !text.contains("cannot reach"),
        "{text}"
    );
    s.fake.allow_key(NODE_ACCESS_KEY, NODE_SECRET, None);

    // No such cluster; EKS Auth unreachable.
    s.fake.set_cluster_status(None);
    let out = doctor(
        &s,
        Some(&host),
        Caller::Node,
        &["--eks-auth-endpoint", "http://127.0.0.1:9"],
    );
    let checks = doctor_checks(&out);
    let (status, text) = check(&checks, "EKS Auth");
    assert_eq!(status, "fail");
    assert!(
        text.contains("cannot reach http://127.0.0.1:9")
            && text.contains("fix: check DNS, the proxy"),
        "{text}"
    );
    let (status, text) = check(&checks, "cluster");
    assert_eq!(status, "fail");
    assert!(
        text.contains("no cluster e2e-cluster") && text.contains("fix: check CLUSTER_NAME"),
        "{text}"
    );

    // Outside the cgroup root the programs cover, a connect is not redirected.
    let out = doctor(&s, None, Caller::Node, &[]);
    let (status, text) = check(&doctor_checks(&out), "redirect");
    assert_eq!(status, "fail");
    assert!(
        text.contains("did not reach the agent")
            && text.contains("fix: check that the programs are attached"),
        "{text}"
    );

    // No credentials on the node: no region-independent signing, so EKS Auth is not tried.
    let out = doctor(&s, Some(&host), Caller::Nobody, &[]);
    let checks = doctor_checks(&out);
    let (status, text) = check(&checks, "node credentials");
    assert_eq!(status, "fail");
    assert!(
        text.contains("none found") && text.contains("fix: give the node an instance role"),
        "{text}"
    );
    assert_eq!(check(&checks, "EKS Auth").0, "fail");

    // Without capabilities the programs cannot load.
    let weak = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--bounding-set",
        "-all",
    ];
    let out = cli_wrapped(
        &s.node,
        Some(&host),
        &s.fake,
        Caller::Node,
        &weak,
        &["doctor"],
    );
    let (status, text) = check(&doctor_checks(&out), "kernel programs");
    assert_eq!(status, "fail", "{}", out.stdout);
    assert!(
        text.contains("permission denied") && text.contains("fix: run the agent with CAP_BPF"),
        "{text}"
    );

    // An unreadable cgroup root, and no agent.
    let out = doctor(
        &s,
        Some(&host),
        Caller::Node,
        &[
            "--cgroup-root",
            "/nonexistent/cgroup",
            "--probe-addr",
            "127.0.0.1:9",
        ],
    );
    let checks = doctor_checks(&out);
    let (status, text) = check(&checks, "cgroup root");
    assert_eq!(status, "fail");
    assert!(
        text.contains("cannot read /nonexistent/cgroup")
            && text.contains("fix: mount the host's /sys/fs/cgroup"),
        "{text}"
    );
    let (status, text) = check(&checks, "agent");
    assert_eq!(status, "fail");
    assert!(
        text.contains("no agent answers on 127.0.0.1:9") && text.contains("fix: start the agent"),
        "{text}"
    );
}

#[test]
fn doctor_names_an_agent_that_is_not_ready_and_listeners_that_are_gone() {
    let node = Node::new();
    let fake = FakeAws::start_in(&node.netns);
    let host = node.host_cgroup("system.slice/doctor.scope");
    // Waiting for a cgroup root kubelet has not made yet: alive, not ready.
    let missing = node.cgroup_root.join("never-created.slice");
    let _waiting = Agent::spawn(
        &node,
        &fake,
        &["--cgroup-root", missing.to_str().unwrap(), "--mode", "ebpf"],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let out = loop {
        let out = cli(&node, Some(&host), &fake, Caller::Node, &["doctor"]);
        if out.stdout.contains("alive but") || std::time::Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let (status, text) = check(&doctor_checks(&out), "agent");
    assert_eq!(status, "fail", "{}", out.stdout);
    assert!(
        text.contains("not ready: waiting for cgroup root")
            && text.contains("fix: read the agent's log"),
        "{text}"
    );
    drop(_waiting);

    // An agent whose listen address and metrics address left the node (an address removed
    // from the interface): nothing answers there any more.
    let [listen4, _] = node.listen_addrs(pod_identity_e2e::agent::PORT);
    let metrics = format!("{}:2705", listen4.ip());
    let _agent = Agent::start(
        &node,
        &fake,
        &["--listen", &listen4.to_string(), "--metrics-addr", &metrics],
    );
    pod_identity_e2e::node::sh(
        "ip",
        &[
            "-n",
            &node.netns,
            "addr",
            "del",
            &format!("{}/32", listen4.ip()),
            "dev",
            "lo",
        ],
    );
    let out = cli(&node, Some(&host), &fake, Caller::Node, &["doctor"]);
    assert_ne!(out.code, 0);
    let checks = doctor_checks(&out);
    for name in ["listeners", "metrics"] {
        let (status, text) = check(&checks, name);
        assert_eq!(status, "fail", "{text}");
        assert!(text.contains("fix: "), "{text}");
    }
    assert!(
        check(&checks, "listeners").1.contains(&format!(
            "{listen4}, where pods' connects are redirected, is not an address of this node"
        )),
        "{}",
        out.stdout
    );
    assert_eq!(check(&checks, "agent").0, "ok");
}

/// The tests that run on every kernel of the matrix (`cargo xtask matrix`), inside a VM per
/// kernel, as well as on the host: each touches the kernel programs.
mod matrix {
    use super::*;

    #[test]
    fn doctor_passes_every_check_on_a_healthy_node() {
        let s = Setup::new();
        let host = s.node.host_cgroup("system.slice/doctor.scope");
        let out = doctor(&s, Some(&host), Caller::Node, &[]);
        let checks = doctor_checks(&out);
        assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
        for name in ALL_CHECKS {
            let (status, text) = check(&checks, name);
            assert_eq!(status, "ok", "{text}");
        }
        assert!(check(&checks, "kernel programs").1.contains("detached"));
        assert!(
            check(&checks, "redirect")
                .1
                .contains("reached the agent (403"),
            "{}",
            out.stdout
        );
        assert!(
            check(&checks, "node credentials")
                .1
                .contains("environment variables")
                && check(&checks, "node credentials").1.contains("****MPLE")
        );
        assert!(
            check(&checks, "EKS Auth")
                .1
                .contains(&format!("{} is reachable", s.fake.endpoint())),
            "{}",
            out.stdout
        );
        assert!(check(&checks, "cluster").1.contains("ACTIVE"));
        // The EKS Auth probe and the control-plane checks were signed with the node's key.
        assert!(
            s.fake
                .calls()
                .iter()
                .all(|c| c.signed_by == NODE_ACCESS_KEY)
        );
        assert!(
            s.fake
                .api_calls()
                .iter()
                .all(|c| c.signed_by == NODE_ACCESS_KEY)
        );
        // The scratch cgroup is gone.
        assert!(
            std::fs::read_dir(&s.node.cgroup_root)
                .unwrap()
                .flatten()
                .all(|e| !e
                    .file_name()
                    .to_string_lossy()
                    .starts_with("pod-identity-doctor"))
        );

        // In the agent's own cgroup (kubectl exec) a connect proves nothing (its connects are
        // not redirected): the kernel's attachments of the agent's programs stand in.
        let inside = doctor(&s, Some(&s.node.agent_cgroup), Caller::Node, &[]);
        assert_eq!(inside.code, 0, "{}", inside.stdout);
        let (status, text) = check(&doctor_checks(&inside), "redirect");
        assert_eq!(status, "ok", "{text}");
        assert!(
            text.contains("connect4 and connect6 are attached at")
                && text.contains("steer at this network namespace")
                && text.contains("shares the agent's cgroup"),
            "{text}"
        );
    }
}
