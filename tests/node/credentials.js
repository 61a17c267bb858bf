// Resolves credentials the way the AWS SDK for JavaScript v3 does in an EKS pod
// (AWS_CONTAINER_CREDENTIALS_FULL_URI + AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE) and prints the
// access key id; on failure prints the SDK's error and exits 1.
const { fromHttp } = require("@aws-sdk/credential-provider-http");

fromHttp({ timeout: 5000, maxRetries: 1 })()
  .then((c) => console.log(c.accessKeyId))
  .catch((e) => {
    console.error(`${e.name}: ${e.message}`);
    process.exit(1);
  });
