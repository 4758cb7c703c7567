//! The security part of the flow format: who may call a trigger, how fast, and the
//! credentials ferry presents to targets. Secrets are never written here: every secret is
//! named by the environment variable that holds it.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;

use super::Spanned;

/// Who may call an HTTP trigger. Every HTTP trigger says so; `none` must be explicit.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum AuthConfig {
    /// Anyone may call (say, a health-style endpoint behind another gateway).
    None,
    /// A shared key in a header.
    ApiKey(ApiKeyConfig),
    /// An HMAC-SHA256 signature over the request (Standard Webhooks, or a generic header).
    WebhookSignature(WebhookSignatureConfig),
    /// A bearer JSON Web Token.
    Jwt(JwtConfig),
}

/// `auth: {api_key: ...}`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// The header carrying the key (default `X-Api-Key`).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub header: Option<Spanned<String>>,
    /// Environment variables holding the valid keys; several at once allow rotation. Unset
    /// or empty variables are skipped.
    #[schemars(with = "Vec<String>")]
    pub from_env: Vec<Spanned<String>>,
}

/// `auth: {webhook_signature: ...}`. Without `header`, the Standard Webhooks scheme:
/// `webhook-id`, `webhook-timestamp` and `webhook-signature` headers over
/// `id.timestamp.body`. With `header`, a generic signature over the body alone, such as
/// GitHub's `X-Hub-Signature-256: sha256=<hex>`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookSignatureConfig {
    /// Environment variables holding the signing secrets (several allow rotation). A secret
    /// starting `whsec_` is base64 after the prefix, as Standard Webhooks issues them.
    #[schemars(with = "Vec<String>")]
    pub from_env: Vec<Spanned<String>>,
    /// How far a `webhook-timestamp` may be from now, such as `5m` (default 5m).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub tolerance: Option<Spanned<String>>,
    /// Generic form: the header holding the signature, such as `X-Hub-Signature-256`.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub header: Option<Spanned<String>>,
    /// Generic form: text before the signature, such as `sha256=`.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Generic form: how the signature is written (default `hex`).
    #[serde(default)]
    pub encoding: Option<SignatureEncoding>,
}

/// How a signature is written in its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SignatureEncoding {
    /// Lowercase or uppercase hexadecimal.
    Hex,
    /// Standard base64.
    Base64,
}

/// `auth: {jwt: ...}`: a bearer token in `Authorization`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Accepted algorithms, such as `[RS256]` or `[HS256]`; `none` is never accepted.
    #[schemars(with = "Vec<String>")]
    pub algorithms: Vec<Spanned<String>>,
    /// A PEM public key file (RSA, EC or Ed25519), relative to the flow file.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub key_file: Option<Spanned<String>>,
    /// A JWKS file (`{"keys": [...]}`), relative to the flow file; the token's `kid` picks
    /// the key.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub jwks_file: Option<Spanned<String>>,
    /// For HMAC algorithms: the environment variable holding the shared secret.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub secret_from_env: Option<Spanned<String>>,
    /// Required `iss`: a token without it, or with another, is refused.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Required `aud` (one of the token's audiences): a token without it, or for another
    /// audience, is refused.
    #[serde(default)]
    pub audience: Option<String>,
    /// How far clocks may disagree when `exp` and `nbf` are checked, such as `30s`
    /// (default 30s, at most 5m).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub leeway: Option<Spanned<String>>,
    /// Claims a valid token must also carry to be allowed (else 403): `scope: lab:write`.
    /// A space-separated claim (such as `scope`) matches when it holds the word.
    #[serde(default)]
    pub require: BTreeMap<String, String>,
}

/// `rate_limit`: a token bucket per client address.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests per second a client may sustain.
    #[schemars(with = "u32")]
    pub per_second: Spanned<u32>,
    /// Requests a client may send at once above the rate (default: `per_second`).
    #[serde(default)]
    #[schemars(with = "Option<u32>")]
    pub burst: Option<Spanned<u32>>,
}

/// Credentials an HTTP target presents.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum TargetAuthConfig {
    /// `Authorization: Bearer <token>`.
    Bearer {
        /// The environment variable holding the token.
        #[schemars(with = "String")]
        token_from_env: Spanned<String>,
    },
    /// `Authorization: Basic ...`.
    Basic {
        /// The user name.
        username: String,
        /// The environment variable holding the password.
        #[schemars(with = "String")]
        password_from_env: Spanned<String>,
    },
    /// OAuth 2.0 client credentials: a token fetched from `token_url`, cached until shortly
    /// before it expires, and fetched again once when the target answers 401.
    Oauth2(OAuth2Config),
}

/// `auth: {oauth2: ...}` on a target.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Config {
    /// The token endpoint.
    #[schemars(with = "String")]
    pub token_url: Spanned<String>,
    /// The client id.
    pub client_id: String,
    /// The environment variable holding the client secret.
    #[schemars(with = "String")]
    pub client_secret_from_env: Spanned<String>,
    /// Scopes to ask for, space-separated.
    #[serde(default)]
    pub scope: Option<String>,
}

/// `sign`: sign outgoing requests the Standard Webhooks way, so the receiver can verify
/// ferry (`webhook-id`, `webhook-timestamp`, `webhook-signature`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SignConfig {
    /// The environment variable holding the signing secret.
    #[schemars(with = "String")]
    pub secret_from_env: Spanned<String>,
}

/// `tls` on a target: whom to trust.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TargetTlsConfig {
    /// A PEM bundle of CA certificates to trust besides the system's, relative to the flow
    /// file.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub ca_file: Option<Spanned<String>>,
    /// Accept any certificate. Only for tests against self-signed partners; ferry logs a
    /// warning for every flow that sets it.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}
