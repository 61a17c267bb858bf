//! Real AWS SDK clients fetch credentials through the redirect, and handle a 404 (no pod identity
//! association) as they should: an error, not credentials.

use pod_identity_e2e::{CgroupShape, fake_aws::access_key_for};

use super::{Setup, V4_URL, V6_URL};

#[test]
fn every_sdk_gets_credentials_and_reports_a_404() {
    let s = Setup::new();
    let pod = s.pod("payments", "api-0", "api", CgroupShape::SystemdBurstable);
    let token_file = pod.write_token_file(&pod.token());
    let key = access_key_for("payments", "api");
    let unassociated = s.pod(
        "payments",
        "batch-0",
        "batch",
        CgroupShape::SystemdBurstable,
    );
    let no_association = unassociated.write_token_file(&unassociated.token());

    let [boto_key, ..] = pod
        .boto3(V4_URL, &token_file)
        .unwrap_or_else(|e| panic!("boto3: {e}"));
    assert_eq!(boto_key, key);
    let e = unassociated
        .boto3(V4_URL, &no_association)
        .expect_err("boto3 must fail without an association");
    assert!(
        e.contains("404") || e.contains("ResourceNotFound"),
        "boto3: {e}"
    );

    let cli = pod
        .aws_cli(V4_URL, &token_file)
        .unwrap_or_else(|e| panic!("aws cli: {e}"));
    assert!(key.ends_with(&cli), "aws cli showed {cli}, key {key}");
    let e = unassociated
        .aws_cli(V4_URL, &no_association)
        .expect_err("aws cli must fail without an association");
    assert!(
        e.contains("404") && e.contains("ResourceNotFoundException"),
        "aws cli: {e}"
    );

    let rust = pod
        .rust_sdk(V6_URL, &token_file)
        .unwrap_or_else(|e| panic!("aws-config: {e}"));
    assert_eq!(rust, key);
    let e = unassociated
        .rust_sdk(V4_URL, &no_association)
        .expect_err("aws-config must fail without an association");
    assert!(
        e.contains("404") || e.contains("ResourceNotFound"),
        "aws-config: {e}"
    );

    let node = pod
        .node_sdk(V4_URL, &token_file)
        .unwrap_or_else(|e| panic!("node: {e}"));
    assert_eq!(node, key);
    let e = unassociated
        .node_sdk(V4_URL, &no_association)
        .expect_err("node must fail without an association");
    assert!(
        e.contains("404")
            || e.contains("ResourceNotFound")
            || e.contains("CredentialsProviderError"),
        "node: {e}"
    );
}
