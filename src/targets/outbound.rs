//! What an HTTP target adds for safety on the way out: credentials, a Standard Webhooks
//! signature, its own TLS trust, and the guard that keeps message data from choosing where
//! ferry connects (SSRF).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderName, HeaderValue, header};
use base64::Engine as _;

use super::OutboundRequest;
use crate::compile::Ctx;
use crate::config::{HttpTargetConfig, OAuth2Config, TargetAuthConfig};

/// Credentials a target presents.
#[derive(Debug)]
pub(crate) enum Credentials {
    /// A fixed `Authorization` value (bearer or basic).
    Fixed(HeaderValue),
    /// An OAuth 2.0 client-credentials token.
    OAuth2(Box<OAuth2>),
}

impl Credentials {
    pub(crate) fn compile(config: &TargetAuthConfig, ctx: &mut Ctx<'_>) -> Option<Self> {
        let fixed = |value: String, ctx: &mut Ctx<'_>, at| match HeaderValue::from_str(&value) {
            Ok(mut value) => {
                value.set_sensitive(true);
                Some(Self::Fixed(value))
            }
            Err(_) => {
                ctx.error(at, "the credential holds characters a header cannot");
                None
            }
        };
        match config {
            TargetAuthConfig::Bearer { token_from_env } => {
                let token = ctx.secret(token_from_env);
                fixed(format!("Bearer {token}"), ctx, token_from_env.referenced)
            }
            TargetAuthConfig::Basic {
                username,
                password_from_env,
            } => {
                let password = ctx.secret(password_from_env);
                let encoded = base64::engine::general_purpose::STANDARD
                    .encode(format!("{username}:{password}"));
                fixed(
                    format!("Basic {encoded}"),
                    ctx,
                    password_from_env.referenced,
                )
            }
            TargetAuthConfig::Oauth2(oauth) => {
                OAuth2::compile(oauth, ctx.secret(&oauth.client_secret_from_env), ctx)
                    .map(|o| Self::OAuth2(Box::new(o)))
            }
        }
    }

    /// Adds the `Authorization` header; `fresh` fetches a new OAuth token first.
    pub(crate) async fn apply(
        &self,
        request: &mut OutboundRequest,
        client: &reqwest::Client,
        fresh: bool,
    ) -> Result<(), String> {
        let value = match self {
            Self::Fixed(value) => value.clone(),
            Self::OAuth2(oauth) => oauth.authorization(client, fresh).await?,
        };
        request.headers.retain(|(n, _)| n != header::AUTHORIZATION);
        request.headers.push((header::AUTHORIZATION, value));
        Ok(())
    }

    /// Whether a 401 is worth one more try with a new token.
    pub(crate) fn refreshes(&self) -> bool {
        matches!(self, Self::OAuth2(_))
    }
}

/// OAuth 2.0 client credentials, with the token cached until shortly before it expires.
pub(crate) struct OAuth2 {
    token_url: reqwest::Url,
    client_id: String,
    client_secret: String,
    scope: Option<String>,
    /// The token and until when it is used. Held only to read or replace it, never across
    /// a fetch: deliveries with a good token never wait for a slow token endpoint.
    cached: std::sync::Mutex<Option<(HeaderValue, Instant)>>,
    /// One fetch at a time: deliveries that need a new token wait for it rather than each
    /// fetching one.
    fetching: tokio::sync::Mutex<()>,
}

/// How long a token endpoint may take to answer.
const TOKEN_TIMEOUT: Duration = Duration::from_secs(10);

impl std::fmt::Debug for OAuth2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuth2")
            .field("token_url", &self.token_url.as_str())
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl OAuth2 {
    fn compile(config: &OAuth2Config, client_secret: String, ctx: &mut Ctx<'_>) -> Option<Self> {
        let token_url = match reqwest::Url::parse(&config.token_url.value) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => url,
            _ => {
                ctx.error(
                    config.token_url.referenced,
                    format!("invalid token URL \"{}\"", config.token_url.value),
                );
                return None;
            }
        };
        Some(Self {
            token_url,
            client_id: config.client_id.clone(),
            client_secret,
            scope: config.scope.clone(),
            cached: std::sync::Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    /// The cached token, when there is one.
    fn cached(&self) -> Option<(HeaderValue, Instant)> {
        self.cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The `Authorization` value to send; `fresh` when the target refused the cached token.
    async fn authorization(
        &self,
        client: &reqwest::Client,
        fresh: bool,
    ) -> Result<HeaderValue, String> {
        let before = self.cached();
        let usable = |cached: &Option<(HeaderValue, Instant)>| {
            cached
                .as_ref()
                .filter(|(_, until)| Instant::now() < *until)
                .map(|(value, _)| value.clone())
        };
        if !fresh && let Some(value) = usable(&before) {
            return Ok(value);
        }
        let _fetching = self.fetching.lock().await;
        // Another delivery may have fetched a new token while this one waited.
        let now = self.cached();
        let renewed = now.as_ref().map(|(v, _)| v) != before.as_ref().map(|(v, _)| v);
        if (!fresh || renewed)
            && let Some(value) = usable(&now)
        {
            return Ok(value);
        }
        let (value, until) = self.fetch(client).await?;
        *self
            .cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((value.clone(), until));
        Ok(value)
    }

    /// Asks the token endpoint for a token. The client authenticates with HTTP Basic, its id
    /// and secret form-encoded first (RFC 6749 §2.3.1), so a `:` or `%` in them survives.
    async fn fetch(&self, client: &reqwest::Client) -> Result<(HeaderValue, Instant), String> {
        let encode =
            |text: &str| form_urlencoded::byte_serialize(text.as_bytes()).collect::<String>();
        let mut form = vec![("grant_type", "client_credentials")];
        if let Some(scope) = &self.scope {
            form.push(("scope", scope));
        }
        let response = client
            .post(self.token_url.clone())
            .basic_auth(encode(&self.client_id), Some(encode(&self.client_secret)))
            .form(&form)
            .timeout(TOKEN_TIMEOUT)
            .send()
            .await
            .map_err(|e| format!("fetching an OAuth token: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("the token endpoint answered {}", response.status()));
        }
        #[derive(serde::Deserialize)]
        struct Token {
            access_token: String,
            expires_in: Option<u64>,
        }
        let token: Token = response
            .json()
            .await
            .map_err(|e| format!("the token endpoint's answer: {e}"))?;
        let mut value = HeaderValue::from_str(&format!("Bearer {}", token.access_token))
            .map_err(|_| "the token holds characters a header cannot".to_owned())?;
        value.set_sensitive(true);
        // Renew a minute early (or at half its life, for short-lived tokens).
        let lifetime = Duration::from_secs(token.expires_in.unwrap_or(300));
        let until = Instant::now()
            + lifetime
                .saturating_sub(Duration::from_secs(60))
                .max(lifetime / 2);
        Ok((value, until))
    }
}

/// Signs outgoing requests the Standard Webhooks way.
#[derive(Debug)]
pub(crate) struct Signer {
    key: Vec<u8>,
}

impl Signer {
    pub(crate) fn compile(config: &crate::config::SignConfig, ctx: &mut Ctx<'_>) -> Option<Self> {
        let secret = ctx.secret(&config.secret_from_env);
        let key =
            crate::auth::compile_webhook_key(&secret, config.secret_from_env.referenced, ctx)?;
        Some(Self { key })
    }

    /// Adds `webhook-id` (the delivery's idempotency key, the same on every attempt),
    /// `webhook-timestamp` and `webhook-signature`.
    pub(crate) fn sign(&self, request: &mut OutboundRequest) {
        let id = request
            .headers
            .iter()
            .find(|(n, _)| n == "idempotency-key")
            .and_then(|(_, v)| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let timestamp = time::OffsetDateTime::now_utc().unix_timestamp();
        for (name, value) in crate::auth::webhook_headers(&self.key, &id, timestamp, &request.body)
        {
            if let Ok(value) = HeaderValue::from_str(&value) {
                request.headers.push((HeaderName::from_static(name), value));
            }
        }
    }
}

/// Where a URL whose host comes from the message may point.
#[derive(Debug)]
pub(crate) struct HostGuard {
    /// `host` or `*.domain` (any subdomain of `domain`).
    allow: Vec<String>,
    allow_private: bool,
}

impl HostGuard {
    /// Checks the rendered URL's scheme, host and (for an address) its kind.
    pub(crate) fn check(&self, url: &reqwest::Url) -> Result<(), String> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("scheme \"{}\" is not allowed", url.scheme()));
        }
        let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let listed = self
            .allow
            .iter()
            .any(|allowed| match allowed.strip_prefix("*.") {
                Some(domain) => host.ends_with(&format!(".{domain}")),
                None => host == allowed,
            });
        if !listed {
            return Err(format!("host \"{host}\" is not in allow_hosts"));
        }
        if let Ok(ip) = host.parse::<IpAddr>()
            && !self.allow_private
            && is_private(ip)
        {
            return Err(format!("address {ip} is private, loopback or link-local"));
        }
        Ok(())
    }

    /// A client for the guarded target: it connects only to public addresses, whatever a
    /// name resolves to at the time (so DNS cannot be turned against the check).
    pub(crate) fn client_builder(&self, builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        if self.allow_private {
            builder
        } else {
            builder.dns_resolver(Arc::new(PublicOnly))
        }
    }
}

/// Compiles the guard for a URL whose host is templated: it needs `allow_hosts`.
pub(crate) fn host_guard(config: &HttpTargetConfig, ctx: &mut Ctx<'_>) -> Option<HostGuard> {
    if config.allow_hosts.is_empty() {
        ctx.error_with(
            config.url.referenced,
            "ssrf",
            "the URL's host comes from the message, but the target has no `allow_hosts`",
            Some("list the hosts it may name: `allow_hosts: [\"portal.example\", \"*.portal.example\"]`".into()),
        );
        return None;
    }
    Some(HostGuard {
        allow: config
            .allow_hosts
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
        allow_private: config.allow_private_addresses,
    })
}

/// IPv4 ranges that are no partner on the internet: "this network", private, carrier-grade
/// NAT, loopback, link-local, IETF protocol assignments, documentation, the 6to4 relay,
/// benchmarking, multicast, reserved and broadcast (IANA's special-purpose registry).
const NOT_PUBLIC_V4: [(u32, u32); 15] = [
    (0x0000_0000, 8),  // 0.0.0.0/8
    (0x0a00_0000, 8),  // 10.0.0.0/8
    (0x6440_0000, 10), // 100.64.0.0/10
    (0x7f00_0000, 8),  // 127.0.0.0/8
    (0xa9fe_0000, 16), // 169.254.0.0/16
    (0xac10_0000, 12), // 172.16.0.0/12
    (0xc000_0000, 24), // 192.0.0.0/24
    (0xc000_0200, 24), // 192.0.2.0/24
    (0xc058_6300, 24), // 192.88.99.0/24
    (0xc0a8_0000, 16), // 192.168.0.0/16
    (0xc612_0000, 15), // 198.18.0.0/15
    (0xc633_6400, 24), // 198.51.100.0/24
    (0xcb00_7100, 24), // 203.0.113.0/24
    (0xe000_0000, 4),  // 224.0.0.0/4
    (0xf000_0000, 4),  // 240.0.0.0/4, with 255.255.255.255
];

/// IPv6 ranges that are no partner on the internet, or that lead to IPv4 addresses a guard
/// would not see: unspecified, loopback and IPv4-compatible (`::/96`), IPv4-mapped, NAT64
/// (well-known and local), discard, Teredo, ORCHID, documentation, 6to4, unique-local,
/// link-local, site-local and multicast.
const NOT_PUBLIC_V6: [(u128, u32); 15] = [
    (0, 96),                                         // ::/96
    (0xffff_0000_0000, 96),                          // ::ffff:0:0/96
    (0x0064_ff9b_0000_0000_0000_0000_0000_0000, 96), // 64:ff9b::/96
    (0x0064_ff9b_0001_0000_0000_0000_0000_0000, 48), // 64:ff9b:1::/48
    (0x0100_0000_0000_0000_0000_0000_0000_0000, 64), // 100::/64
    (0x2001_0000_0000_0000_0000_0000_0000_0000, 32), // 2001::/32 (Teredo)
    (0x2001_0010_0000_0000_0000_0000_0000_0000, 28), // 2001:10::/28
    (0x2001_0020_0000_0000_0000_0000_0000_0000, 28), // 2001:20::/28
    (0x2001_0db8_0000_0000_0000_0000_0000_0000, 32), // 2001:db8::/32
    (0x2002_0000_0000_0000_0000_0000_0000_0000, 16), // 2002::/16 (6to4)
    (0x3fff_0000_0000_0000_0000_0000_0000_0000, 20), // 3fff::/20
    (0xfc00_0000_0000_0000_0000_0000_0000_0000, 7),  // fc00::/7
    (0xfe80_0000_0000_0000_0000_0000_0000_0000, 10), // fe80::/10
    (0xfec0_0000_0000_0000_0000_0000_0000_0000, 10), // fec0::/10
    (0xff00_0000_0000_0000_0000_0000_0000_0000, 8),  // ff00::/8
];

/// Whether `ip` is anything but a public unicast address on the internet (see
/// `NOT_PUBLIC_V4` and `NOT_PUBLIC_V6`): private, loopback, link-local, reserved, or a
/// translation prefix that could carry a private IPv4 address.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            NOT_PUBLIC_V4
                .iter()
                .any(|(net, len)| bits >> (32 - len) == net >> (32 - len))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            NOT_PUBLIC_V6
                .iter()
                .any(|(net, len)| bits >> (128 - len) == net >> (128 - len))
        }
    }
}

/// A resolver that keeps only public addresses.
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| !is_private(a.ip()))
                .collect();
            if addresses.is_empty() {
                return Err(format!("{host} resolves to no public address").into());
            }
            Ok(Box::new(addresses.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// A client with the target's own TLS trust and SSRF guard, when it needs one.
pub(crate) fn client(
    config: &HttpTargetConfig,
    guard: Option<&HostGuard>,
    ctx: &mut Ctx<'_>,
) -> Option<Option<reqwest::Client>> {
    if config.tls.is_none() && guard.is_none_or(|g| g.allow_private) {
        return Some(None);
    }
    let mut builder = super::http_client_builder();
    if let Some(guard) = guard {
        builder = guard.client_builder(builder);
    }
    if let Some(tls) = &config.tls {
        if let Some(file) = &tls.ca_file {
            let pem = ctx.read_project_file(&file.value, file.referenced)?;
            match reqwest::Certificate::from_pem_bundle(&pem) {
                Ok(certificates) => {
                    for certificate in certificates {
                        builder = builder.add_root_certificate(certificate);
                    }
                }
                Err(e) => {
                    ctx.error(file.referenced, format!("{}: {e}", file.value));
                    return None;
                }
            }
        }
        if tls.insecure_skip_verify {
            tracing::warn!(
                flow = ctx.flow,
                "tls.insecure_skip_verify is set: this flow accepts ANY certificate from its target"
            );
            builder = builder.danger_accept_invalid_certs(true);
        }
    }
    match builder.build() {
        Ok(client) => Some(Some(client)),
        Err(e) => {
            ctx.error(
                config.url.referenced,
                format!("building the target's HTTP client: {e}"),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_addresses_are_recognised() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "64:ff9b:1::1",
            "2002:7f00:1::1",
            "2001:0:4136:e378::1",
            "2001:db8::1",
            "3fff::1",
            "198.18.0.1",
            "198.19.255.255",
            "240.0.0.1",
            "255.255.255.255",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "192.0.0.8",
            "224.0.0.1",
            "ff02::1",
            "fec0::1",
        ] {
            assert!(is_private(private.parse().unwrap()), "{private}");
        }
        for public in [
            "93.184.216.34",
            "8.8.8.8",
            "198.20.0.1",
            "223.255.255.255",
            "2606:4700::1111",
            "2001:4860:4860::8888",
        ] {
            assert!(!is_private(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn the_guard_allows_listed_hosts_only() {
        let guard = HostGuard {
            allow: vec!["portal.example".into(), "*.labs.example".into()],
            allow_private: false,
        };
        let check = |url: &str| guard.check(&reqwest::Url::parse(url).unwrap());
        assert!(check("https://portal.example/x").is_ok());
        assert!(check("https://a.labs.example/x").is_ok());
        assert!(check("https://labs.example/x").is_err());
        assert!(check("https://portal.example.evil.test/x").is_err());
        assert!(check("https://evil.test/?portal.example").is_err());
        assert!(check("file:///etc/passwd").is_err());
        let open = HostGuard {
            allow: vec!["127.0.0.1".into(), "169.254.169.254".into()],
            allow_private: false,
        };
        assert!(
            open.check(&reqwest::Url::parse("http://127.0.0.1/").unwrap())
                .is_err()
        );
        assert!(
            open.check(&reqwest::Url::parse("http://169.254.169.254/latest").unwrap())
                .is_err()
        );
    }
}
