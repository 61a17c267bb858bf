//! The path an EKS node takes around the data path. Node credentials from IMDSv2 (which
//! rotate, and may answer late or refuse the token), hybrid nodes' credentials file and
//! `credential_process`, TLS to EKS Auth with a CA of the test's own, a real proxy, and the FIPS
//! endpoint. Every fake AWS call is verified against the keys the node was really given.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use pod_identity_e2e::{
    Agent, CgroupShape, FakeAws, Node, Pod,
    agent::{Launch, NodeAws},
    fake_imds::{FakeImds, Mode},
    pki::Pki,
    proxy::Proxy,
};

use super::{V4_URL, wait_for};

fn node() -> (Node, FakeAws) {
    let node = Node::new();
    let fake = FakeAws::start_in(&node.netns);
    fake.associate("payments", "api", "payments-api-role");
    (node, fake)
}

fn start(node: &Node, fake: &FakeAws, extra: &[&str], launch: Launch<'_>) -> Agent {
    let mut agent = Agent::launch(node, fake, extra, &launch);
    agent.wait_ready(node);
    agent
}

/// A request with a token the agent has not seen: it needs an EKS Auth call.
fn fresh_request(pod: &Pod) -> pod_identity_e2e::node::HttpResult {
    pod.curl(V4_URL, &pod.token())
}

#[test]
fn imds_credentials_and_region_sign_every_call_and_a_rotation_is_invisible_to_pods() {
    let (node, fake) = node();
    let imds = FakeImds::start_in(&node.netns, &fake);
    let agent = start(
        &node,
        &fake,
        &[],
        Launch {
            aws: NodeAws::Imds,
            ..Launch::default()
        },
    );
    let pod = node.add_pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    let r = fresh_request(&pod);
    assert_eq!(r.status, 200, "{}\n{}", r.body, agent.log());
    let first_key = imds.access_key();
    // The fake checks each signature against the key and session token IMDS issued, and the
    // region in its scope: no --region, no AWS_REGION; it came from IMDS.
    assert!(
        fake.calls().iter().all(|c| c.signed_by == first_key),
        "{:?}",
        fake.calls()
    );
    let (_, info) = node
        .http_get(
            pod_identity_e2e::agent::PROBE_ADDR.parse().unwrap(),
            "/v1/agent",
        )
        .unwrap();
    assert!(info.contains(r#""region":"us-west-2""#), "{info}");

    // IMDS rotates the node's keys and the old ones stop working: the next calls are refused
    // once, the agent reloads, and every pod request still succeeds.
    imds.rotate(&fake);
    let fetches = imds.fetches();
    for _ in 0..3 {
        let r = fresh_request(&pod);
        assert_eq!(r.status, 200, "{}\n{}", r.body, agent.log());
    }
    let new_key = imds.access_key();
    assert!(imds.fetches() > fetches, "the agent fetched the new keys");
    let last = fake.calls();
    assert_eq!(last.last().unwrap().signed_by, new_key);
    assert!(
        agent.log().contains("NodeCredentialsRejected"),
        "the refused attempt is logged: {}",
        agent.log()
    );
}

#[test]
fn imds_down_at_start_names_the_node_credentials_and_serving_resumes_without_a_restart() {
    let (node, fake) = node();
    let imds = FakeImds::start_in(&node.netns, &fake);
    imds.set_mode(Mode::Down);
    // Region known (as with AWS_REGION on the DaemonSet): the credentials are what is missing.
    let agent = start(
        &node,
        &fake,
        &["--region", "us-west-2"],
        Launch {
            aws: NodeAws::Imds,
            ..Launch::default()
        },
    );
    let pod = node.add_pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    let r = fresh_request(&pod);
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(
        r.body.contains("NodeCredentialsUnavailable")
            && r.body.contains("node's own AWS credentials"),
        "{}",
        r.body
    );
    imds.set_mode(Mode::Up);
    wait_for(
        "serving after IMDS came back",
        Duration::from_secs(20),
        || fresh_request(&pod).status == 200,
    );
    drop(agent);

    // Without a region either: the sentence says so, and both come back with IMDS.
    imds.set_mode(Mode::Down);
    let agent = start(
        &node,
        &fake,
        &[],
        Launch {
            aws: NodeAws::Imds,
            ..Launch::default()
        },
    );
    let r = fresh_request(&pod);
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(
        r.body.contains("NodeRegionUnavailable") && r.body.contains("IMDS"),
        "{}",
        r.body
    );
    imds.set_mode(Mode::Up);
    wait_for(
        "serving after IMDS came back",
        Duration::from_secs(20),
        || fresh_request(&pod).status == 200,
    );
    assert!(agent.log().contains("AWS region found"), "{}", agent.log());
}

#[test]
fn an_imds_token_refused_with_403_is_a_clear_log_line() {
    let (node, fake) = node();
    let imds = FakeImds::start_in(&node.netns, &fake);
    imds.set_mode(Mode::TokenForbidden);
    let agent = start(
        &node,
        &fake,
        &["--region", "us-west-2"],
        Launch {
            aws: NodeAws::Imds,
            ..Launch::default()
        },
    );
    let pod = node.add_pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    let r = fresh_request(&pod);
    assert_eq!(r.status, 502, "{}", r.body);
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("NodeCredentialsUnavailable"))
        .unwrap_or_else(|| panic!("no credentials line:\n{log}"));
    assert!(
        line.contains("403") || line.to_lowercase().contains("forbidden"),
        "the line names the refused token: {line}"
    );
}

/// A hybrid node's directory of AWS files.
fn aws_dir(node: &Node) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{}-aws", node.netns));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_credentials(path: &Path, akid: &str, secret: &str) {
    // As SSM and the Roles Anywhere helper write it: replaced whole.
    let tmp = path.with_extension("new");
    std::fs::write(
        &tmp,
        format!("[default]\naws_access_key_id = {akid}\naws_secret_access_key = {secret}\n"),
    )
    .unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn a_hybrid_nodes_credentials_file_replaced_mid_run_is_picked_up() {
    let (node, fake) = node();
    let dir = aws_dir(&node);
    let file = dir.join("credentials");
    let secrets = [
        "hybrid-secret-one-0123456789abcdef",
        "hybrid-secret-two-0123456789abcdef",
    ];
    for s in secrets {
        pod_identity_e2e::secrets::remember(s);
    }
    fake.allow_key("AKIDHYBRIDONE", secrets[0], None);
    write_credentials(&file, "AKIDHYBRIDONE", secrets[0]);
    let agent = start(
        &node,
        &fake,
        &[],
        Launch {
            aws: NodeAws::Files {
                credentials: Some(file.clone()),
                config: None,
            },
            ..Launch::default()
        },
    );
    let pod = node.add_pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    assert_eq!(fresh_request(&pod).status, 200, "{}", agent.log());
    assert_eq!(fake.calls().last().unwrap().signed_by, "AKIDHYBRIDONE");

    // The node's agent rotates the keys: the file is replaced and the old key stops working.
    fake.allow_key("AKIDHYBRIDTWO", secrets[1], None);
    write_credentials(&file, "AKIDHYBRIDTWO", secrets[1]);
    fake.revoke_key("AKIDHYBRIDONE");
    for _ in 0..3 {
        let r = fresh_request(&pod);
        assert_eq!(r.status, 200, "{}\n{}", r.body, agent.log());
    }
    assert_eq!(fake.calls().last().unwrap().signed_by, "AKIDHYBRIDTWO");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_credential_process_is_called_again_before_its_credentials_expire() {
    let (node, fake) = node();
    let dir = aws_dir(&node);
    // The stand-in for IAM Roles Anywhere's signing helper: each run issues the next key, valid
    // for 5 minutes and 3 seconds (the agent reloads 5 minutes ahead of expiry).
    let counter = dir.join("calls");
    let script = dir.join("signing-helper.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nn=$(( $(cat {c} 2>/dev/null || echo 0) + 1 ))\necho $n > {c}\nsleep 1\nexp=$(date -u -d @$(( $(date +%s) + 303 )) +%Y-%m-%dT%H:%M:%SZ)\nprintf '{{\"Version\": 1, \"AccessKeyId\": \"AKIDPROCESS%d\", \"SecretAccessKey\": \"process-secret-%d-0123456789\", \"SessionToken\": \"process-session-%d-0123456789\", \"Expiration\": \"%s\"}}' $n $n $n $exp\n",
            c = counter.display()
        ),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();
    for n in 1..=6 {
        let (secret, session) = (
            format!("process-secret-{n}-0123456789"),
            format!("process-session-{n}-0123456789"),
        );
        pod_identity_e2e::secrets::remember(&secret);
        pod_identity_e2e::secrets::remember(&session);
        fake.allow_key(&format!("AKIDPROCESS{n}"), &secret, Some(&session));
    }
    let config = dir.join("config");
    std::fs::write(
        &config,
        format!("[default]\ncredential_process = {}\n", script.display()),
    )
    .unwrap();
    let agent = start(
        &node,
        &fake,
        &[],
        Launch {
            aws: NodeAws::Files {
                credentials: None,
                config: Some(config),
            },
            ..Launch::default()
        },
    );
    let pod = node.add_pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    assert_eq!(fresh_request(&pod).status, 200, "{}", agent.log());
    let calls = || {
        std::fs::read_to_string(&counter)
            .unwrap_or_default()
            .trim()
            .parse::<u32>()
            .unwrap_or(0)
    };
    assert_eq!(calls(), 1);
    assert_eq!(fake.calls().last().unwrap().signed_by, "AKIDPROCESS1");
    // Less than 5 minutes from expiry (and loaded more than 5 s ago): new credentials from the
    // helper first. Four pods asking at once wait for one run of the helper (it takes a second).
    let pods: Vec<_> = (1..=4)
        .map(|i| {
            node.add_pod(
                "payments",
                &format!("api-{i}"),
                "api",
                CgroupShape::SystemdBurstable,
            )
        })
        .collect();
    std::thread::sleep(Duration::from_secs(6));
    std::thread::scope(|s| {
        for pod in &pods {
            s.spawn(move || assert_eq!(fresh_request(pod).status, 200));
        }
    });
    assert_eq!(
        calls(),
        2,
        "the helper ran again before the credentials expired, once for the burst"
    );
    assert!(
        fake.calls()
            .iter()
            .rev()
            .take(4)
            .all(|c| c.signed_by == "AKIDPROCESS2"),
        "{:?}",
        fake.calls()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The fake over HTTPS on 127.0.0.1 with a certificate of `pki`.
fn tls_node(pki: &Pki) -> (Node, FakeAws) {
    let node = Node::new();
    let fake = FakeAws::start_tls_in(&node.netns, "127.0.0.1:0".parse().unwrap(), pki);
    fake.associate("payments", "api", "payments-api-role");
    (node, fake)
}

fn env(vars: &[(&str, &Path)]) -> Vec<(String, String)> {
    vars.iter()
        .map(|(k, v)| (k.to_string(), v.display().to_string()))
        .collect()
}

#[test]
fn tls_to_eks_auth_trusts_the_configured_ca_and_nothing_else() {
    let pki = Pki::new("trusted", &["IP:127.0.0.1"]);
    let (node, fake) = tls_node(&pki);
    assert!(fake.endpoint().starts_with("https://"));
    let pod = node.add_pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    // The test CA through AWS_CA_BUNDLE (added to the system's), then through SSL_CERT_FILE
    // (instead of the system's).
    for var in ["AWS_CA_BUNDLE", "SSL_CERT_FILE"] {
        let agent = start(
            &node,
            &fake,
            &[],
            Launch {
                env: env(&[(var, &pki.ca)]),
                ..Launch::default()
            },
        );
        let r = fresh_request(&pod);
        assert_eq!(r.status, 200, "{var}: {}\n{}", r.body, agent.log());
    }
    let served = fake.calls().len();

    // A certificate from a CA the agent was not told about: refused, and said why.
    let other = Pki::new("untrusted", &["IP:127.0.0.1"]);
    let (node2, fake2) = tls_node(&other);
    let pod2 = node2.add_pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    let agent2 = start(
        &node2,
        &fake2,
        &[],
        Launch {
            env: env(&[("AWS_CA_BUNDLE", &pki.ca)]),
            ..Launch::default()
        },
    );
    let r = fresh_request(&pod2);
    assert_eq!(r.status, 502, "{}", r.body);
    // The pod is told that EKS Auth could not be reached; the log, why.
    assert!(
        r.body.contains("UpstreamUnreachable") && !r.body.contains("certificate"),
        "{}",
        r.body
    );
    wait_for(
        "the log names the certificate",
        Duration::from_secs(5),
        || agent2.log().contains("UnknownIssuer"),
    );
    assert!(
        fake2.calls().is_empty(),
        "nothing reached the untrusted endpoint, over TLS or plain HTTP"
    );

    // A trusted CA, but a certificate for another name.
    let wrong_name = Pki::new("other-name", &["DNS:somewhere-else.example"]);
    let (node3, fake3) = tls_node(&wrong_name);
    let pod3 = node3.add_pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    let agent3 = start(
        &node3,
        &fake3,
        &[],
        Launch {
            env: env(&[("AWS_CA_BUNDLE", &wrong_name.ca)]),
            ..Launch::default()
        },
    );
    let r = fresh_request(&pod3);
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(!r.body.contains("certificate"), "{}", r.body);
    wait_for(
        "the log names the certificate's name",
        Duration::from_secs(5),
        || agent3.log().contains("certificate not valid for name"),
    );
    assert!(fake3.calls().is_empty());
    assert_eq!(fake.calls().len(), served);
}

#[test]
fn a_real_proxy_carries_eks_auth_calls_no_proxy_bypasses_it_and_a_dead_one_is_named() {
    let pki = Pki::new("proxied", &["IP:127.0.0.1"]);
    let (node, fake) = tls_node(&pki);
    let proxy = Proxy::start(&node, 3128);
    let pod = node.add_pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    let target = fake.addr.to_string();
    let through = |no_proxy: Option<&str>, proxy_url: &str| {
        let mut vars = env(&[("AWS_CA_BUNDLE", &pki.ca)]);
        vars.push(("HTTPS_PROXY".into(), proxy_url.into()));
        if let Some(np) = no_proxy {
            vars.push(("NO_PROXY".into(), np.into()));
        }
        start(
            &node,
            &fake,
            &[],
            Launch {
                env: vars,
                ..Launch::default()
            },
        )
    };
    let agent = through(None, &proxy.url());
    let r = fresh_request(&pod);
    assert_eq!(r.status, 200, "{}\n{}", r.body, agent.log());
    assert!(
        proxy.connects_to(&target) >= 1,
        "the proxy's log shows the CONNECT to EKS Auth:\n{}",
        proxy.log()
    );
    drop(agent);

    let before = proxy.connects_to(&target);
    let agent = through(Some("127.0.0.1"), &proxy.url());
    let r = fresh_request(&pod);
    assert_eq!(r.status, 200, "{}\n{}", r.body, agent.log());
    assert_eq!(
        proxy.connects_to(&target),
        before,
        "NO_PROXY bypasses the proxy"
    );
    drop(agent);

    let agent = through(None, "http://127.0.0.1:1");
    let r = fresh_request(&pod);
    assert_eq!(r.status, 502, "{}\n{}", r.body, agent.log());
    // The pod learns nothing of the node's network; the log names the proxy.
    assert!(
        r.body.contains("UpstreamUnreachable") && !r.body.contains("127.0.0.1:1"),
        "{}",
        r.body
    );
    wait_for("the log names the proxy", Duration::from_secs(5), || {
        agent.log().contains("through the proxy http://127.0.0.1:1")
    });
}

#[test]
fn fips_resolves_the_fips_endpoint_and_signs_for_eks_auth_in_the_region() {
    const FIPS_HOST: &str = "eks-auth-fips.us-west-2.api.aws";
    let pki = Pki::new("fips", &[&format!("DNS:{FIPS_HOST}")]);
    let node = Node::new();
    // Listening where the FIPS name leads inside the agent's mount namespace (its own
    // /etc/hosts): 127.0.0.1:443 of the node.
    let fake = FakeAws::start_tls_in(&node.netns, "127.0.0.1:443".parse().unwrap(), &pki);
    fake.associate("payments", "api", "payments-api-role");
    let hosts = std::env::temp_dir().join(format!("{}-hosts", node.netns));
    std::fs::write(
        &hosts,
        format!("127.0.0.1 localhost\n127.0.0.1 {FIPS_HOST}\n"),
    )
    .unwrap();
    let script = format!(
        "mount --bind {} /etc/hosts && exec \"$0\" \"$@\"",
        hosts.display()
    );
    let wrapper = [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        script.as_str(),
    ];
    let agent = start(
        &node,
        &fake,
        &["--fips"],
        Launch {
            wrapper: &wrapper,
            endpoint: false,
            env: env(&[("AWS_CA_BUNDLE", &pki.ca)]),
            ..Launch::default()
        },
    );
    let pod = node.add_pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    let r = fresh_request(&pod);
    assert_eq!(r.status, 200, "{}\n{}", r.body, agent.log());
    let call = fake.calls().pop().unwrap();
    // The fake verified the SigV4 scope (region us-west-2, service eks-auth); the Host is the
    // FIPS endpoint's name, as the SDK resolved it.
    assert_eq!(call.host, FIPS_HOST);
    let _ = std::fs::remove_file(&hosts);
}
