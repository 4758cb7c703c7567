//! Inbound authentication: who may call an HTTP trigger.
//!
//! Every check compares secrets in constant time and answers only "unauthenticated" (401)
//! or "forbidden" (403), never which part was wrong.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::compile::Ctx;
use crate::config::{AuthConfig, SignatureEncoding, Spanned};

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// Credentials missing or wrong (401).
    Unauthenticated,
    /// Valid credentials, not allowed here (403).
    Forbidden,
}

impl From<Denied> for crate::error::ServeError {
    fn from(denied: Denied) -> Self {
        match denied {
            Denied::Unauthenticated => Self::Unauthorized,
            Denied::Forbidden => Self::Forbidden,
        }
    }
}

/// A trigger's compiled `auth`.
#[derive(Debug)]
pub enum Auth {
    /// `auth: none`.
    Open,
    /// A key in a header.
    ApiKey {
        /// The header.
        header: HeaderName,
        /// The valid keys.
        keys: Vec<Vec<u8>>,
    },
    /// An HMAC signature.
    Signature(Signature),
    /// A bearer JWT.
    Jwt(Box<Jwt>),
}

impl Auth {
    /// Checks a request's credentials; `body` is the raw body the signature covers.
    ///
    /// # Errors
    ///
    /// [`Denied`] when the caller may not pass.
    pub fn check(&self, headers: &HeaderMap, body: &[u8]) -> Result<Option<WebhookId>, Denied> {
        match self {
            Self::Open => Ok(None),
            Self::ApiKey { header, keys } => {
                let given = headers
                    .get(header)
                    .ok_or(Denied::Unauthenticated)?
                    .as_bytes();
                // Compare with every key, so the time taken says nothing about which matched.
                let matched = keys.iter().fold(subtle::Choice::from(0), |found, key| {
                    found | key.ct_eq(given)
                });
                if bool::from(matched) {
                    Ok(None)
                } else {
                    Err(Denied::Unauthenticated)
                }
            }
            Self::Signature(signature) => signature.check(headers, body),
            Self::Jwt(jwt) => jwt.check(headers).map(|()| None),
        }
    }

    /// Whether the flow is open to anyone.
    pub fn is_open(&self) -> bool {
        matches!(self, Self::Open)
    }

    /// The header carrying this check's secret, besides the usual credential headers.
    pub fn secret_header(&self) -> Option<&HeaderName> {
        match self {
            Self::ApiKey { header, .. } => Some(header),
            Self::Signature(Signature {
                form: SignatureForm::Generic { header, .. },
                ..
            }) => Some(header),
            _ => None,
        }
    }
}

/// A Standard Webhooks id that passed its signature check. The caller takes it in the store
/// ([`crate::store::Store::first_sight`]): a replay is refused by every process sharing the
/// store, and the id survives restarts and reloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookId {
    /// The `webhook-id` header.
    pub id: String,
    /// When its signature stops being accepted anyway (unix milliseconds).
    pub expires_at: i64,
}

/// An HMAC-SHA256 signature check.
#[derive(Debug)]
pub struct Signature {
    secrets: Vec<Vec<u8>>,
    form: SignatureForm,
}

#[derive(Debug)]
enum SignatureForm {
    /// Standard Webhooks, fresh within the tolerance window.
    Standard { tolerance: Duration },
    /// One header over the body alone.
    Generic {
        header: HeaderName,
        prefix: String,
        encoding: SignatureEncoding,
    },
}

impl Signature {
    fn check(&self, headers: &HeaderMap, body: &[u8]) -> Result<Option<WebhookId>, Denied> {
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .ok_or(Denied::Unauthenticated)
        };
        match &self.form {
            SignatureForm::Generic {
                header,
                prefix,
                encoding,
            } => {
                let given = text(header.as_str())?
                    .strip_prefix(prefix.as_str())
                    .ok_or(Denied::Unauthenticated)?;
                let given = match encoding {
                    SignatureEncoding::Hex => hex::decode(given.trim()).ok(),
                    SignatureEncoding::Base64 => BASE64.decode(given.trim()).ok(),
                }
                .ok_or(Denied::Unauthenticated)?;
                self.verify(&[body], &[given]).map(|()| None)
            }
            SignatureForm::Standard { tolerance } => {
                let id = text("webhook-id")?;
                let timestamp = text("webhook-timestamp")?;
                let signed_at: i64 = timestamp.parse().map_err(|_| Denied::Unauthenticated)?;
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                let window = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
                if (now - signed_at).abs() > window {
                    return Err(Denied::Unauthenticated);
                }
                // `v1,<base64>` entries separated by spaces; any one valid signature passes.
                let given: Vec<Vec<u8>> = text("webhook-signature")?
                    .split(' ')
                    .filter_map(|s| s.strip_prefix("v1,"))
                    .filter_map(|s| BASE64.decode(s).ok())
                    .collect();
                self.verify(
                    &[id.as_bytes(), b".", timestamp.as_bytes(), b".", body],
                    &given,
                )?;
                Ok(Some(WebhookId {
                    id: id.to_owned(),
                    expires_at: signed_at.saturating_add(window).saturating_mul(1000),
                }))
            }
        }
    }

    fn verify(&self, content: &[&[u8]], given: &[Vec<u8>]) -> Result<(), Denied> {
        for secret in &self.secrets {
            let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key");
            content.iter().for_each(|part| mac.update(part));
            for signature in given {
                if mac.clone().verify_slice(signature).is_ok() {
                    return Ok(());
                }
            }
        }
        Err(Denied::Unauthenticated)
    }
}

/// Signs `id.timestamp.body` with `secret` the Standard Webhooks way: `v1,<base64>`.
pub fn standard_signature(secret: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
}

/// The three Standard Webhooks headers for `body` sent as `id` at `timestamp` (Unix seconds),
/// signed with `key`: `webhook-id`, `webhook-timestamp`, `webhook-signature`.
pub fn webhook_headers(
    key: &[u8],
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> [(&'static str, String); 3] {
    [
        ("webhook-id", id.to_owned()),
        ("webhook-timestamp", timestamp.to_string()),
        (
            "webhook-signature",
            standard_signature(key, id, timestamp, body),
        ),
    ]
}

/// The key a Standard Webhooks secret stands for: base64 after `whsec_`, else its bytes.
///
/// # Errors
///
/// When a `whsec_` secret is not base64 after its prefix (cut short or mangled on its way
/// into the environment): taken as raw bytes, it would match no signature its issuer makes.
/// The error does not quote the secret.
pub fn webhook_key(secret: &str) -> Result<Vec<u8>, &'static str> {
    match secret.strip_prefix("whsec_") {
        Some(encoded) => BASE64
            .decode(encoded)
            .map_err(|_| "a secret starting with whsec_ must be base64 after the prefix"),
        None => Ok(secret.as_bytes().to_vec()),
    }
}

/// The signing key a webhook secret stands for ([`webhook_key`]), reporting a malformed one
/// at `at`; inbound checks and outbound signatures both read their secrets so.
pub(crate) fn compile_webhook_key(
    secret: &str,
    at: serde_saphyr::Location,
    ctx: &mut Ctx<'_>,
) -> Option<Vec<u8>> {
    webhook_key(secret)
        .map_err(|reason| ctx.error_with(at, "secret-invalid", reason, None))
        .ok()
}

/// A bearer JWT check.
#[derive(Debug)]
pub struct Jwt {
    validation: Validation,
    keys: JwtKeys,
    require: Vec<(String, String)>,
}

enum JwtKeys {
    One(DecodingKey),
    /// By `kid`.
    Set(Vec<(Option<String>, DecodingKey)>),
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtKeys")
    }
}

impl Jwt {
    fn check(&self, headers: &HeaderMap) -> Result<(), Denied> {
        let token = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .ok_or(Denied::Unauthenticated)?
            .trim();
        let key = match &self.keys {
            JwtKeys::One(key) => key,
            JwtKeys::Set(keys) => {
                let kid = jsonwebtoken::decode_header(token)
                    .map_err(|_| Denied::Unauthenticated)?
                    .kid;
                keys.iter()
                    .find(|(id, _)| kid.is_none() || *id == kid)
                    .map(|(_, key)| key)
                    .ok_or(Denied::Unauthenticated)?
            }
        };
        let claims = jsonwebtoken::decode::<Value>(token, key, &self.validation)
            .map_err(|_| Denied::Unauthenticated)?
            .claims;
        for (name, wanted) in &self.require {
            let allowed = match &claims[name] {
                Value::String(s) => s == wanted || s.split(' ').any(|w| w == wanted),
                Value::Array(items) => items.iter().any(|i| i == wanted),
                // `admin: true`, `level: 3`: the claim equals the value read as JSON.
                other => serde_json::from_str::<Value>(wanted).is_ok_and(|w| w == *other),
            };
            if !allowed {
                return Err(Denied::Forbidden);
            }
        }
        Ok(())
    }
}

/// Compiles a trigger's `auth`; a missing one is an error unless the flow says `none`.
pub(crate) fn compile(
    config: Option<&Spanned<AuthConfig>>,
    trigger_at: serde_saphyr::Location,
    ctx: &mut Ctx<'_>,
) -> Option<Auth> {
    let Some(config) = config else {
        ctx.error_with(
            trigger_at,
            "auth-missing",
            "an http trigger must say who may call it",
            Some("add `auth:` with `api_key`, `webhook_signature` or `jwt`; write `auth: none` for an endpoint open to anyone".into()),
        );
        return None;
    };
    let at = config.referenced;
    match &config.value {
        AuthConfig::None => Some(Auth::Open),
        AuthConfig::ApiKey(api_key) => {
            let header = match &api_key.header {
                Some(name) => ctx.header_name(&name.value, name.referenced)?,
                None => HeaderName::from_static("x-api-key"),
            };
            let keys = secrets(&api_key.from_env, at, ctx)
                .into_iter()
                .map(String::into_bytes)
                .collect();
            Some(Auth::ApiKey { header, keys })
        }
        AuthConfig::WebhookSignature(signature) => {
            let secrets = secrets(&signature.from_env, at, ctx)
                .iter()
                .filter_map(|s| compile_webhook_key(s, at, ctx))
                .collect();
            let form = match &signature.header {
                Some(name) => SignatureForm::Generic {
                    header: ctx.header_name(&name.value, name.referenced)?,
                    prefix: signature.prefix.clone().unwrap_or_default(),
                    encoding: signature.encoding.unwrap_or(SignatureEncoding::Hex),
                },
                None => SignatureForm::Standard {
                    tolerance: match &signature.tolerance {
                        Some(t) => ctx.duration(&t.value, t.referenced)?,
                        None => Duration::from_secs(300),
                    },
                },
            };
            Some(Auth::Signature(Signature { secrets, form }))
        }
        AuthConfig::Jwt(jwt) => compile_jwt(jwt, at, ctx).map(|j| Auth::Jwt(Box::new(j))),
    }
}

fn compile_jwt(
    config: &crate::config::JwtConfig,
    at: serde_saphyr::Location,
    ctx: &mut Ctx<'_>,
) -> Option<Jwt> {
    let mut algorithms = Vec::new();
    for name in &config.algorithms {
        match name.value.parse::<Algorithm>() {
            Ok(algorithm) => algorithms.push(algorithm),
            Err(_) => ctx.error_with(
                name.referenced,
                "jwt",
                format!("unknown JWT algorithm \"{}\"", name.value),
                Some("use one of HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA; `none` is never accepted".into()),
            ),
        }
    }
    if config.algorithms.is_empty() {
        ctx.error_with(at, "jwt", "jwt needs `algorithms`", None);
    }
    let sources = [
        config.key_file.is_some(),
        config.jwks_file.is_some(),
        config.secret_from_env.is_some(),
    ];
    if sources.iter().filter(|s| **s).count() != 1 {
        ctx.error_with(
            at,
            "jwt",
            "jwt needs exactly one of `key_file`, `jwks_file` and `secret_from_env`",
            None,
        );
        return None;
    }
    let first = *algorithms.first()?;
    let keys = if let Some(file) = &config.key_file {
        let pem = ctx.read_project_file(&file.value, file.referenced)?;
        let key = match first {
            Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&pem),
            Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
            _ => DecodingKey::from_rsa_pem(&pem),
        };
        JwtKeys::One(
            key.map_err(|e| {
                ctx.error_with(file.referenced, "jwt", format!("{}: {e}", file.value), None)
            })
            .ok()?,
        )
    } else if let Some(file) = &config.jwks_file {
        let text = ctx.read_project_file(&file.value, file.referenced)?;
        let set: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(&text)
            .map_err(|e| {
                ctx.error_with(
                    file.referenced,
                    "jwt",
                    format!("{} is not a JWKS: {e}", file.value),
                    None,
                )
            })
            .ok()?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            match DecodingKey::from_jwk(jwk) {
                Ok(key) => keys.push((jwk.common.key_id.clone(), key)),
                Err(e) => ctx.error_with(
                    file.referenced,
                    "jwt",
                    format!("a key of {}: {e}", file.value),
                    None,
                ),
            }
        }
        JwtKeys::Set(keys)
    } else {
        let secret = ctx.secret(config.secret_from_env.as_ref()?);
        JwtKeys::One(DecodingKey::from_secret(secret.as_bytes()).ok()?)
    };
    let leeway = match &config.leeway {
        Some(text) => {
            let leeway = ctx.duration(&text.value, text.referenced)?;
            if leeway > MAX_JWT_LEEWAY {
                ctx.error(
                    text.referenced,
                    "a JWT leeway above 5m would accept stale tokens",
                );
                return None;
            }
            leeway
        }
        None => DEFAULT_JWT_LEEWAY,
    };
    Some(Jwt {
        validation: validation(algorithms, config, leeway),
        keys,
        require: config.require.clone().into_iter().collect(),
    })
}

/// How far clocks may disagree on `exp` and `nbf` unless a flow says otherwise.
pub const DEFAULT_JWT_LEEWAY: Duration = Duration::from_secs(30);
/// The most leeway a flow may give.
const MAX_JWT_LEEWAY: Duration = Duration::from_secs(300);

/// The strict rules every token meets: a signature by one of `algorithms`, `exp` present
/// and not past, `nbf` (when present) not in the future, both within `leeway`; and `iss` and
/// `aud` present and right whenever the flow names them. The library checks a configured
/// issuer or audience only when the token carries the claim, so configured ones are made
/// required here.
fn validation(
    algorithms: Vec<Algorithm>,
    config: &crate::config::JwtConfig,
    leeway: Duration,
) -> Validation {
    let mut validation = Validation::new(algorithms[0]);
    validation.algorithms = algorithms;
    validation.leeway = leeway.as_secs();
    validation.validate_exp = true;
    validation.validate_nbf = true;
    let mut required = vec!["exp"];
    if let Some(issuer) = &config.issuer {
        validation.set_issuer(&[issuer]);
        required.push("iss");
    }
    match &config.audience {
        Some(audience) => {
            validation.set_audience(&[audience]);
            required.push("aud");
        }
        None => validation.validate_aud = false,
    }
    validation.set_required_spec_claims(&required);
    validation
}

/// The values of the environment variables `names` that are set. None set is a warning
/// (`ferry check` runs without secrets), on which `ferry serve` refuses to start.
fn secrets(
    names: &[Spanned<String>],
    at: serde_saphyr::Location,
    ctx: &mut Ctx<'_>,
) -> Vec<String> {
    if names.is_empty() {
        ctx.error_with(
            at,
            "secret-unset",
            "no environment variable is named for the secret",
            None,
        );
    }
    let values: Vec<String> = names
        .iter()
        .filter_map(|name| ctx.env(&name.value).filter(|v| !v.is_empty()))
        .collect();
    if values.is_empty() && !names.is_empty() {
        let names: Vec<&str> = names.iter().map(|n| n.value.as_str()).collect();
        ctx.warn_with(
            at,
            "secret-unset",
            format!(
                "no secret is set ({}): every request would be refused",
                names.join(", ")
            ),
        );
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_the_standard_webhooks_reference() {
        // The example of the Standard Webhooks specification.
        let key = webhook_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let signature = standard_signature(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn a_whsec_secret_that_is_not_base64_is_refused_without_quoting_it() {
        let error = webhook_key("whsec_not*base64!").unwrap_err();
        assert!(!error.contains("not*base64"), "{error}");
        assert_eq!(webhook_key("plain-secret").unwrap(), b"plain-secret");
    }

    #[test]
    fn any_of_several_keys_opens_and_nothing_else_does() {
        let auth = Auth::ApiKey {
            header: HeaderName::from_static("x-api-key"),
            keys: vec![b"new-key".to_vec(), b"old-key".to_vec()],
        };
        let with = |key: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("x-api-key", key.parse().unwrap());
            auth.check(&headers, b"")
        };
        assert_eq!(with("new-key"), Ok(None));
        assert_eq!(with("old-key"), Ok(None));
        for wrong in ["", "new-ke", "new-key ", "NEW-KEY", "new-keyy"] {
            assert_eq!(with(wrong), Err(Denied::Unauthenticated), "{wrong:?}");
        }
        assert_eq!(
            auth.check(&HeaderMap::new(), b""),
            Err(Denied::Unauthenticated)
        );
    }
}
