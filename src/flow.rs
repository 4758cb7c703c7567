//! A compiled flow: its trigger, steps, targets and reply, ready to run messages.

use std::path::PathBuf;

use axum::http::{HeaderName, Method, StatusCode};
use serde_json::{Value, json};

use crate::compile::Ctx;
use crate::config::TriggerConfig;
use crate::config::load::LoadedFlow;
use crate::diagnostic::Diagnostic;
use crate::error::FlowError;
use crate::message::Message;
use crate::schema::Schemas;
use crate::steps::{Step, StepState};
use crate::targets::{self, OutboundRequest, RetryAction, Target, TargetResponse};
use crate::template::{Escape, JsonTemplate, Templates, TextTemplate};

/// Request bodies are capped at 1 MiB unless a trigger says otherwise.
pub const DEFAULT_MAX_BODY: u64 = 1024 * 1024;

/// A flow ready to run.
#[derive(Debug)]
pub struct Flow {
    /// The flow's name.
    pub name: String,
    /// The file it was loaded from.
    pub file: PathBuf,
    /// The HTTP endpoint that starts it.
    pub trigger: HttpTrigger,
    steps: Vec<(String, Step)>,
    targets: Vec<Target>,
    default_target: Option<usize>,
    reply: Reply,
    templates: Templates,
}

/// A compiled HTTP trigger.
#[derive(Debug, Clone)]
pub struct HttpTrigger {
    /// The method it answers.
    pub method: Method,
    /// The axum route path, such as `/orders/{id}`.
    pub path: String,
    /// The largest body accepted, in bytes.
    pub max_body: u64,
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: Vec<(HeaderName, TextTemplate)>,
    body: JsonTemplate,
}

/// The reply rendered for one message.
#[derive(Debug, Clone)]
pub struct RenderedReply {
    /// HTTP status.
    pub status: StatusCode,
    /// Response headers.
    pub headers: Vec<(HeaderName, String)>,
    /// JSON body.
    pub body: Value,
}

impl Flow {
    /// Compiles a parsed flow, recording every problem in `diagnostics`.
    pub(crate) fn compile(
        loaded: &LoadedFlow,
        schemas: &mut Schemas,
        diagnostics: &mut Vec<Diagnostic>,
    ) -> Option<Self> {
        let config = &loaded.config;
        let mut templates = Templates::new();
        let errors_before = diagnostics
            .iter()
            .filter(|d| d.severity == crate::diagnostic::Severity::Error)
            .count();
        let mut ctx = Ctx {
            file: &loaded.file,
            flow: &config.name.value,
            part: "trigger".into(),
            at: config.name.referenced,
            templates: &mut templates,
            schemas,
            diagnostics,
            targets: config.targets.keys().cloned().collect(),
        };
        let trigger = compile_trigger(&config.trigger, &mut ctx);

        let mut targets = Vec::new();
        for (name, target) in &config.targets {
            ctx.part = format!("target \"{name}\"");
            targets.extend(Target::compile(name, target, &mut ctx));
        }

        let mut steps = Vec::new();
        for (index, step) in config.steps.iter().enumerate() {
            ctx.part = format!("step {} ({})", index + 1, step.value.kind());
            ctx.at = step.referenced;
            if let Some(compiled) = Step::compile(&step.value, &mut ctx) {
                steps.push((ctx.part.clone(), compiled));
            }
        }
        let routed = config
            .steps
            .iter()
            .any(|s| matches!(s.value, crate::config::StepConfig::Route(_)));
        if config.targets.len() > 1 && !routed {
            ctx.part = "targets".into();
            ctx.error(
                config.name.referenced,
                format!(
                    "{} targets but no `route` step to choose between them",
                    config.targets.len()
                ),
            );
        }
        let default_target = (config.targets.len() == 1).then_some(0);

        ctx.part = "reply".into();
        let reply = compile_reply(config.reply.as_ref(), &mut ctx);

        let errors_after = ctx
            .diagnostics
            .iter()
            .filter(|d| d.severity == crate::diagnostic::Severity::Error)
            .count();
        if errors_after > errors_before {
            return None;
        }
        Some(Self {
            name: config.name.value.clone(),
            file: loaded.file.clone(),
            trigger: trigger?,
            steps,
            targets,
            default_target,
            reply: reply?,
            templates,
        })
    }

    /// Runs every step on `message` and returns the target it goes to, if any.
    ///
    /// # Errors
    ///
    /// The first step that refuses the message.
    pub fn run_steps(&self, message: &mut Message) -> Result<Option<&Target>, FlowError> {
        let mut state = StepState::default();
        for (label, step) in &self.steps {
            step.apply(message, &self.templates, &mut state, label)?;
        }
        Ok(state
            .target
            .or(self.default_target)
            .map(|i| &self.targets[i]))
    }

    /// Renders the request `target` would get for `message`.
    ///
    /// # Errors
    ///
    /// [`FlowError::Unprocessable`] when a template cannot render from this message.
    pub fn prepare(
        &self,
        target: &Target,
        message: &Message,
    ) -> Result<OutboundRequest, FlowError> {
        target.prepare(message, &self.templates)
    }

    /// Handles one message synchronously: steps, delivery to the chosen target, and reply.
    ///
    /// # Errors
    ///
    /// A [`FlowError`] when a step refuses the message or the target does not take it.
    pub async fn handle(
        &self,
        mut message: Message,
        client: &reqwest::Client,
    ) -> Result<RenderedReply, FlowError> {
        if let Some(target) = self.run_steps(&mut message)? {
            let request = self.prepare(target, &message)?;
            let outcome = targets::send(client, &request).await;
            let failed = |status: Option<u16>, reason: String| FlowError::Target {
                target: target.name().to_owned(),
                status,
                reason,
            };
            match (targets::classify(&outcome), outcome) {
                (RetryAction::Done, Ok(response)) => target.capture(&response, &mut message),
                (_, Ok(TargetResponse { status, body, .. })) => {
                    let excerpt =
                        String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
                    return Err(failed(
                        Some(status),
                        format!("answered {status}: {excerpt}"),
                    ));
                }
                (_, Err(error)) => return Err(failed(None, error.to_string())),
            }
        }
        self.render_reply(&message)
    }

    /// Renders the reply for a handled message.
    ///
    /// # Errors
    ///
    /// [`FlowError::Unprocessable`] when a reply template cannot render.
    pub fn render_reply(&self, message: &Message) -> Result<RenderedReply, FlowError> {
        let unprocessable = |reason| FlowError::Unprocessable {
            context: "reply".into(),
            reason,
        };
        let body = self
            .templates
            .render_json(&self.reply.body, message)
            .map_err(unprocessable)?;
        let mut headers = Vec::with_capacity(self.reply.headers.len());
        for (name, template) in &self.reply.headers {
            headers.push((
                name.clone(),
                self.templates
                    .render_text(template, message)
                    .map_err(unprocessable)?,
            ));
        }
        Ok(RenderedReply {
            status: self.reply.status,
            headers,
            body,
        })
    }
}

fn compile_trigger(config: &TriggerConfig, ctx: &mut Ctx<'_>) -> Option<HttpTrigger> {
    let TriggerConfig::Http(http) = config;
    let method = match Method::from_bytes(http.method.value.to_ascii_uppercase().as_bytes()) {
        Ok(method) => Some(method),
        Err(_) => {
            ctx.error(
                http.method.referenced,
                format!("invalid HTTP method \"{}\"", http.method.value),
            );
            None
        }
    };
    let path = &http.path.value;
    if let Err(reason) = check_route_path(path) {
        ctx.error(http.path.referenced, reason);
    }
    let max_body = match &http.max_body {
        None => Some(DEFAULT_MAX_BODY),
        Some(size) => match size.value.parse::<bytesize::ByteSize>() {
            Ok(size) => Some(size.as_u64()),
            Err(_) => {
                ctx.error(
                    size.referenced,
                    format!("invalid size \"{}\"; write e.g. 64KiB or 1MiB", size.value),
                );
                None
            }
        },
    };
    Some(HttpTrigger {
        method: method?,
        path: path.clone(),
        max_body: max_body?,
    })
}

/// Paths start with `/`, and a `{name}` or `{*rest}` parameter fills a whole segment.
fn check_route_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("path \"{path}\" must start with /"));
    }
    for segment in path.split('/').skip(1) {
        if let Some(name) = segment.strip_prefix(':') {
            return Err(format!(
                "\"{segment}\": write path parameters as {{{name}}}"
            ));
        }
        let braces = segment.contains(['{', '}']);
        let name = segment
            .strip_prefix("{*")
            .or_else(|| segment.strip_prefix('{'))
            .and_then(|s| s.strip_suffix('}'));
        match name {
            Some(name)
                if !name.is_empty() && name.chars().all(|c| c.is_alphanumeric() || c == '_') => {}
            _ if braces => {
                return Err(format!(
                    "\"{segment}\": a path parameter is a whole segment like {{id}}"
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

fn compile_reply(config: Option<&crate::config::ReplyConfig>, ctx: &mut Ctx<'_>) -> Option<Reply> {
    let Some(config) = config else {
        let body = ctx
            .templates
            .compile_json(&json!({"id": "{{meta.id}}"}))
            .ok()?;
        return Some(Reply {
            status: StatusCode::OK,
            headers: Vec::new(),
            body,
        });
    };
    let status = match &config.status {
        None => Some(StatusCode::OK),
        Some(s) => match StatusCode::from_u16(s.value) {
            Ok(status) if (100..600).contains(&s.value) => Some(status),
            _ => {
                ctx.error(s.referenced, format!("invalid HTTP status {}", s.value));
                None
            }
        },
    };
    let mut headers = Vec::new();
    for (name, value) in &config.headers {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(header) => headers.extend(
                ctx.text_template(&value.value, Escape::Plain, value.referenced)
                    .map(|t| (header, t)),
            ),
            Err(_) => ctx.error(value.referenced, format!("invalid header name \"{name}\"")),
        }
    }
    let body = match &config.body {
        Some(body) => ctx.json_template(&body.value, body.referenced),
        None => Some(JsonTemplate::Literal(json!({}))),
    };
    Some(Reply {
        status: status?,
        headers,
        body: body?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_paths_use_braces_for_whole_segments() {
        assert!(check_route_path("/orders/{id}/items/{*rest}").is_ok());
        assert!(check_route_path("orders").is_err());
        assert!(
            check_route_path("/orders/:id")
                .unwrap_err()
                .contains("{id}")
        );
        assert!(check_route_path("/orders/x{id}").is_err());
    }
}
