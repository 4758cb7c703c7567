//! `http` target: an HTTP call with a templated URL and headers.

use std::time::Duration;

use axum::http::{HeaderName, HeaderValue, Method, header};
use bytes::Bytes;

use super::outbound::{self, Credentials, HostGuard, Signer};
use super::{OutboundRequest, TargetResponse};
use crate::compile::Ctx;
use crate::config::HttpTargetConfig;
use crate::error::FlowError;
use crate::jsonpath::JsonPath;
use crate::message::Message;
use crate::template::{Escape, Templates, TextTemplate};

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a target sends.
#[derive(Debug)]
enum Address {
    /// A URL nothing in the message changes, parsed once when the flow loads.
    Fixed(reqwest::Url),
    /// A URL rendered for each message.
    Rendered(TextTemplate),
}

/// A compiled `http` target.
#[derive(Debug)]
pub struct HttpTarget {
    name: String,
    method: Method,
    url: Address,
    headers: Vec<(HeaderName, TextTemplate)>,
    timeout: Duration,
    capture: Vec<(String, JsonPath)>,
    pub(super) credentials: Option<Credentials>,
    pub(super) signer: Option<Signer>,
    /// Set when the URL's host comes from the message.
    guard: Option<HostGuard>,
    /// The target's own client, when its TLS trust or guard differ from the shared one.
    pub(super) client: Option<reqwest::Client>,
}

impl HttpTarget {
    pub(crate) fn compile(
        name: &str,
        config: &HttpTargetConfig,
        ctx: &mut Ctx<'_>,
    ) -> Option<Self> {
        let mut ok = true;
        let method = match &config.method {
            None => Method::POST,
            Some(m) => match Method::from_bytes(m.value.to_ascii_uppercase().as_bytes()) {
                Ok(method) => method,
                Err(_) => {
                    ctx.error(m.referenced, format!("invalid HTTP method \"{}\"", m.value));
                    ok = false;
                    Method::POST
                }
            },
        };
        // Values after the host are percent-encoded, so they cannot add path segments. A host
        // from the message is another matter: it must be one `allow_hosts` lists.
        let fixed = config.url.value.split("{{").next().unwrap_or_default();
        let host_fixed = fixed
            .find("://")
            .is_some_and(|at| fixed[at + 3..].contains('/'));
        let templated = config.url.value.contains("{{");
        let guard = if templated && !host_fixed {
            let guard = outbound::host_guard(config, ctx);
            ok &= guard.is_some();
            guard
        } else {
            None
        };
        let escape = if guard.is_some() {
            Escape::Plain
        } else {
            Escape::Url
        };
        let url = ctx.text_template(&config.url.value, escape, config.url.referenced);
        let url = match url {
            Some(TextTemplate::Literal(literal)) => {
                check_url(&literal, config.url.referenced, ctx).map(Address::Fixed)
            }
            rendered => rendered.map(Address::Rendered),
        };
        let credentials = match &config.auth {
            Some(auth) => {
                let credentials = Credentials::compile(auth, ctx);
                ok &= credentials.is_some();
                credentials
            }
            None => None,
        };
        let signer = match &config.sign {
            Some(sign) => {
                let signer = Signer::compile(sign, ctx);
                ok &= signer.is_some();
                signer
            }
            None => None,
        };
        let client = outbound::client(config, guard.as_ref(), ctx);
        ok &= client.is_some();
        let mut headers = Vec::new();
        for (name, value) in &config.headers {
            let Ok(header_name) = HeaderName::from_bytes(name.as_bytes()) else {
                ctx.error(value.referenced, format!("invalid header name \"{name}\""));
                ok = false;
                continue;
            };
            match ctx.header_template(&value.value, value.referenced) {
                Some(template) => headers.push((header_name, template)),
                None => ok = false,
            }
        }
        let timeout = match &config.timeout {
            Some(t) => ctx.duration(&t.value, t.referenced),
            None => Some(DEFAULT_TIMEOUT),
        };
        let capture = super::compile_captures(&config.capture, ctx);
        ok &= capture.is_some();
        let capture = capture.unwrap_or_default();
        let (url, timeout) = (url?, timeout?);
        ok.then(|| Self {
            name: name.to_owned(),
            method,
            url,
            headers,
            timeout,
            capture,
            credentials,
            signer,
            guard,
            client: client.flatten(),
        })
    }

    /// How long an attempt may take, response included.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Refuses, before it is accepted, a message this target could never send: its data
    /// points the URL somewhere `allow_hosts` does not allow, or puts into the URL or a
    /// header what they cannot hold (a line break, say). Only what the message fills in is
    /// rendered; fixed parts were checked when the flow loaded.
    ///
    /// # Errors
    ///
    /// [`FlowError::Unprocessable`] saying why.
    pub fn check_request(&self, message: &Message, templates: &Templates) -> Result<(), FlowError> {
        if let Address::Rendered(_) = self.url {
            self.url(message, templates)?;
        }
        for (name, template) in &self.headers {
            if !matches!(template, TextTemplate::Literal(_)) {
                self.header_value(name, template, message, templates)?;
            }
        }
        Ok(())
    }

    /// Renders header `name` for `message`.
    fn header_value(
        &self,
        name: &HeaderName,
        template: &TextTemplate,
        message: &Message,
        templates: &Templates,
    ) -> Result<HeaderValue, FlowError> {
        let value = templates
            .render_text(template, message)
            .map_err(|reason| self.unprocessable(reason))?;
        HeaderValue::from_str(&value).map_err(|_| {
            self.unprocessable(format!(
                "header {name} would hold characters a header cannot (a line break or another control character)"
            ))
        })
    }

    fn unprocessable(&self, reason: String) -> FlowError {
        FlowError::Unprocessable {
            context: format!("target \"{}\"", self.name),
            reason,
        }
    }

    /// Renders the URL for `message` and holds it to `allow_hosts` when the host is templated.
    fn url(&self, message: &Message, templates: &Templates) -> Result<reqwest::Url, FlowError> {
        let template = match &self.url {
            Address::Fixed(url) => return Ok(url.clone()),
            Address::Rendered(template) => template,
        };
        let url = templates
            .render_text(template, message)
            .map_err(|reason| self.unprocessable(reason))?;
        if holds_control(&url) {
            return Err(self.unprocessable(
                "the URL would hold characters a URL cannot (a line break or another control character)".into(),
            ));
        }
        let url = reqwest::Url::parse(&url)
            .map_err(|e| self.unprocessable(format!("invalid URL \"{url}\": {e}")))?;
        if let Some(guard) = &self.guard {
            guard.check(&url).map_err(|reason| {
                self.unprocessable(format!(
                    "refused to call {}: {reason}",
                    crate::redact::url(&url)
                ))
            })?;
        }
        Ok(url)
    }

    /// Renders the request for `message`.
    ///
    /// # Errors
    ///
    /// [`FlowError::Unprocessable`] when a template cannot render from this message.
    pub fn prepare(
        &self,
        message: &Message,
        templates: &Templates,
    ) -> Result<OutboundRequest, FlowError> {
        let unprocessable = |reason: String| self.unprocessable(reason);
        let url = self.url(message, templates)?;
        let (body, content_type) = match message.content_type() {
            None => (
                Bytes::from(crate::json::text(message.body())),
                "application/json",
            ),
            Some(content_type) => (
                Bytes::from(message.body().as_str().unwrap_or_default().to_owned()),
                content_type,
            ),
        };
        let mut headers = Vec::with_capacity(self.headers.len() + 2);
        headers.push((
            header::CONTENT_TYPE,
            HeaderValue::from_str(content_type).map_err(|e| unprocessable(e.to_string()))?,
        ));
        // Receivers drop duplicates by this key; it is the same for every attempt of a message.
        let key = format!("{}:{}", message.id(), self.name);
        headers.push((
            HeaderName::from_static("idempotency-key"),
            HeaderValue::from_str(&key).map_err(|e| unprocessable(e.to_string()))?,
        ));
        // W3C trace context: the caller's trace goes on, with ferry's hop as the parent.
        if let Some(traceparent) = crate::message::child_traceparent(message)
            && let Ok(value) = HeaderValue::from_str(&traceparent)
        {
            headers.push((HeaderName::from_static("traceparent"), value));
        }
        for (name, template) in &self.headers {
            let value = self.header_value(name, template, message, templates)?;
            headers.retain(|(n, _)| n != name);
            headers.push((name.clone(), value));
        }
        Ok(OutboundRequest {
            target: self.name.clone(),
            method: self.method.clone(),
            url,
            headers,
            body,
            timeout: self.timeout,
        })
    }

    pub(crate) fn capture(&self, response: &TargetResponse, message: &mut Message) {
        if self.capture.is_empty() {
            return;
        }
        let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap_or_default();
        for (var, path) in &self.capture {
            message.set_var(var, path.extract(&body));
        }
    }
}

/// Whether `url` holds a tab, a line break or another control character. A URL parser drops
/// them silently, so such a URL is refused rather than sent as another one.
fn holds_control(url: &str) -> bool {
    url.contains(|c: char| c.is_ascii_control())
}

/// Checks a URL that nothing in the message changes; returns it parsed when it is good.
fn check_url(url: &str, at: serde_saphyr::Location, ctx: &mut Ctx<'_>) -> Option<reqwest::Url> {
    if holds_control(url) {
        ctx.error(
            at,
            "the URL holds a character a URL cannot (a tab, a line break or another control character)",
        );
        return None;
    }
    match reqwest::Url::parse(url) {
        Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => return Some(parsed),
        Ok(parsed) => ctx.error(
            at,
            format!("URL scheme \"{}\" is not http or https", parsed.scheme()),
        ),
        Err(error) => ctx.error(at, format!("invalid URL \"{url}\": {error}")),
    }
    None
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::HttpTarget;
    use crate::compile::bench::{Bench, message};
    use crate::config::HttpTargetConfig;
    use crate::error::FlowError;
    use crate::retry::RetryAction;

    fn compile(bench: &mut Bench, yaml: &str) -> Result<HttpTarget, String> {
        bench.compile(yaml, |config: &HttpTargetConfig, ctx| {
            HttpTarget::compile("lab", config, ctx)
        })
    }

    #[test]
    fn the_request_is_rendered_from_the_message_with_values_escaped() {
        let mut bench = Bench::new();
        let target = compile(
            &mut bench,
            r#"
url: "https://lab.example/orders/{{body.ref}}?from={{meta.flow}}"
method: put
headers:
  x-priority: "{{body.priority}}"
  idempotency-key: "{{body.ref}}"
"#,
        )
        .unwrap();
        let message = message(json!({"ref": "R 1/../x", "priority": "urgent"}));
        let request = target.prepare(&message, &bench.templates).unwrap();
        assert_eq!(request.method, "PUT");
        assert_eq!(
            request.url.as_str(),
            "https://lab.example/orders/R%201%2F..%2Fx?from=bench"
        );
        let header = |name: &str| {
            let found: Vec<_> = request.headers.iter().filter(|(n, _)| n == name).collect();
            assert_eq!(found.len(), 1, "{name} once");
            found[0].1.to_str().unwrap().to_owned()
        };
        assert_eq!(header("content-type"), "application/json");
        assert_eq!(header("x-priority"), "urgent");
        // A header the flow sets replaces ferry's own.
        assert_eq!(header("idempotency-key"), "R 1/../x");
        assert_eq!(request.timeout, Duration::from_secs(30));
        let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        assert_eq!(&body, message.body());
    }

    #[test]
    fn the_idempotency_key_is_the_same_on_every_attempt() {
        let mut bench = Bench::new();
        let target = compile(&mut bench, "url: https://lab.example/orders").unwrap();
        let message = message(json!({}));
        let key = |request: super::OutboundRequest| {
            request
                .headers
                .into_iter()
                .find(|(n, _)| n == "idempotency-key")
                .map(|(_, v)| v.to_str().unwrap().to_owned())
                .unwrap()
        };
        let first = key(target.prepare(&message, &bench.templates).unwrap());
        assert_eq!(first, format!("{}:lab", message.id()));
        assert_eq!(
            key(target.prepare(&message, &bench.templates).unwrap()),
            first
        );
    }

    #[test]
    fn a_host_from_the_message_must_be_allowed_before_the_message_is() {
        let mut bench = Bench::new();
        let error = compile(&mut bench, "url: \"{{body.callback_url}}\"").unwrap_err();
        assert!(error.contains("allow_hosts"), "{error}");

        let target = compile(
            &mut bench,
            "url: \"{{body.callback_url}}\"\nallow_hosts: [portal.example]",
        )
        .unwrap();
        let allowed = message(json!({"callback_url": "https://portal.example/results"}));
        target.check_request(&allowed, &bench.templates).unwrap();

        let elsewhere = message(json!({"callback_url": "https://evil.example/x"}));
        let refused = target.check_request(&elsewhere, &bench.templates);
        let Err(FlowError::Unprocessable { context, reason }) = refused else {
            panic!("{refused:?}");
        };
        assert_eq!(context, "target \"lab\"");
        assert!(
            reason.contains("\"evil.example\" is not in allow_hosts"),
            "{reason}"
        );
    }

    #[test]
    fn line_breaks_never_reach_a_header_or_the_url() {
        let mut bench = Bench::new();
        let target = compile(
            &mut bench,
            "url: \"https://lab.example/{{body.path}}\"\nheaders: {x-ref: \"{{body.ref}}\"}",
        )
        .unwrap();
        let split = message(json!({"path": "a", "ref": "R\r\nx-evil: 1"}));
        let error = target.check_request(&split, &bench.templates).unwrap_err();
        assert!(error.to_string().contains("header x-ref"), "{error}");

        // Percent-encoded in the path; but a host from the message is taken as written.
        let target = compile(
            &mut bench,
            "url: \"{{body.url}}\"\nallow_hosts: [lab.example]",
        )
        .unwrap();
        let broken = message(json!({"url": "https://lab.example/a\nb"}));
        let error = target.check_request(&broken, &bench.templates).unwrap_err();
        assert!(error.to_string().contains("the URL would hold"), "{error}");

        // A literal URL holding a tab (which a URL parser would drop) is refused when the
        // flow loads.
        let error = compile(&mut bench, "url: \"https://lab.example/a\\tb\"").unwrap_err();
        assert!(error.contains("a character a URL cannot"), "{error}");
    }

    #[test]
    fn fixed_parts_are_checked_when_the_flow_loads() {
        let mut bench = Bench::new();
        for (yaml, says) in [
            (
                "url: ftp://lab.example/x",
                "scheme \"ftp\" is not http or https",
            ),
            (
                "url: https://lab.example\nmethod: \"GE T\"",
                "invalid HTTP method",
            ),
            (
                "url: https://lab.example\ntimeout: soon",
                "invalid duration \"soon\"",
            ),
            (
                "url: https://lab.example\ncapture: {id: \"$.[\"}",
                "invalid JSONPath",
            ),
            (
                "url: https://lab.example\nheaders: {\"bad header\": x}",
                "invalid header name",
            ),
        ] {
            let error = compile(&mut bench, yaml).unwrap_err();
            assert!(error.contains(says), "{yaml}: {error}");
        }
    }

    /// A lab on loopback: `/ok` takes the order, `/busy` asks to wait, `/gone` refuses.
    async fn lab() -> String {
        use axum::http::{HeaderMap, StatusCode};
        use axum::routing::post;
        let app = axum::Router::new()
            .route(
                "/ok",
                post(|headers: HeaderMap| async move {
                    let text = |name: &str| headers[name].to_str().unwrap().to_owned();
                    let (key, token) = (text("idempotency-key"), text("authorization"));
                    axum::Json(json!({"lab_id": "L-7", "key": key, "token": token}))
                }),
            )
            .route(
                "/busy",
                post(|| async {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        [("retry-after", "7")],
                        "later",
                    )
                }),
            )
            .route(
                "/gone",
                post(|| async { (StatusCode::NOT_FOUND, "no such order") }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{address}")
    }

    #[tokio::test]
    async fn an_attempt_is_classified_by_the_answer_and_captures_what_it_names() {
        let lab = lab().await;
        let client = crate::targets::http_client().unwrap();
        let mut bench = Bench::new().env("LAB_TOKEN", "t0k3n");
        let target = |bench: &mut Bench, path: &str| {
            let yaml = format!(
                "url: {lab}{path}\nauth: {{bearer: {{token_from_env: LAB_TOKEN}}}}\n\
                 capture: {{lab_id: $.lab_id, key: $.key, token: $.token}}"
            );
            compile(bench, &yaml).unwrap()
        };

        let ok = target(&mut bench, "/ok");
        let mut message = message(json!({"ref": "R-1"}));
        let attempt = ok.attempt(&mut message, &bench.templates, &client).await;
        assert_eq!(
            (attempt.action, attempt.status),
            (RetryAction::Done, Some(200))
        );
        let id = message.id().to_owned();
        let vars = json!({"lab_id": "L-7", "key": format!("{id}:lab"), "token": "Bearer t0k3n"});
        assert_eq!(message.root()["vars"], vars);

        let busy = target(&mut bench, "/busy");
        let attempt = busy.attempt(&mut message, &bench.templates, &client).await;
        assert_eq!(
            (attempt.action, attempt.status),
            (RetryAction::Retry, Some(503))
        );
        assert_eq!(attempt.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(attempt.error.as_deref(), Some("answered 503: later"));

        let gone = target(&mut bench, "/gone");
        let attempt = gone.attempt(&mut message, &bench.templates, &client).await;
        assert_eq!(
            (attempt.action, attempt.status),
            (RetryAction::Drop, Some(404))
        );

        // Nothing listens on a closed port: no answer is worth another try.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let nobody = compile(&mut bench, &format!("url: http://{closed}/x")).unwrap();
        let attempt = nobody
            .attempt(&mut message, &bench.templates, &client)
            .await;
        assert_eq!((attempt.action, attempt.status), (RetryAction::Retry, None));
        assert!(attempt.error.is_some());
    }
}
