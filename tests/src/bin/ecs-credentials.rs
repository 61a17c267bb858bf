//! Resolves credentials with aws-config's ECS container provider, the Rust SDK's path in an EKS
//! pod (AWS_CONTAINER_CREDENTIALS_FULL_URI + AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE), and prints
//! the access key id; on failure prints the SDK's error and exits 1.

use aws_credential_types::provider::ProvideCredentials as _;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let provider = aws_config::ecs::EcsCredentialsProvider::builder().build();
    match provider.provide_credentials().await {
        Ok(creds) => {
            println!("{}", creds.access_key_id());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                message.push_str(": ");
                message.push_str(&s.to_string());
                source = s.source();
            }
            eprintln!("{message}");
            std::process::ExitCode::FAILURE
        }
    }
}
