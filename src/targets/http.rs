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

/// A compiled `http` target.
#[derive(Debug)]
pub struct HttpTarget {
    name: String,
    method: Method,
    url: TextTemplate,
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
        if let Some(TextTemplate::Literal(literal)) = &url {
            check_url(literal, config.url.referenced, ctx);
        }
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
        let mut capture = Vec::new();
        for (var, path) in &config.capture {
            match JsonPath::parse(&path.value) {
                Ok(compiled) => capture.push((var.clone(), compiled)),
                Err(reason) => {
                    ctx.error(
                        path.referenced,
                        format!("invalid JSONPath \"{}\": {reason}", path.value),
                    );
                    ok = false;
                }
            }
        }
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
        if !matches!(self.url, TextTemplate::Literal(_)) {
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
        let url = templates
            .render_text(&self.url, message)
            .map_err(|reason| self.unprocessable(reason))?;
        // A URL parser drops tabs and line breaks silently: a value holding them is refused,
        // not quietly changed.
        if url.contains(|c: char| c.is_ascii_control()) {
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
            None => (Bytes::from(message.body().to_string()), "application/json"),
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

fn check_url(url: &str, at: serde_saphyr::Location, ctx: &mut Ctx<'_>) {
    match reqwest::Url::parse(url) {
        Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => {}
        Ok(parsed) => ctx.error(
            at,
            format!("URL scheme \"{}\" is not http or https", parsed.scheme()),
        ),
        Err(error) => ctx.error(at, format!("invalid URL \"{url}\": {error}")),
    }
}
