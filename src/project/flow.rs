//! Compiling one flow: its trigger, steps, targets, delivery policy and reply, each part by
//! its own compiler, into a [`Flow`] that holds no unparsed strings.

use axum::http::{HeaderName, Method, StatusCode};
use serde_json::json;

use crate::compile::Ctx;
use crate::config::load::LoadedFlow;
use crate::config::{AfterDeliveryConfig, DeliveryMode, TriggerConfig};
use crate::diagnostic::Diagnostic;
use crate::flow::{
    AfterDelivery, DEFAULT_MAX_BODY, DeliveryPolicy, Flow, HttpTrigger, MllpTrigger, QueueTrigger,
    RateLimit, Reply, Trigger,
};
use crate::retry::RetryPolicy;
use crate::schema::Schemas;
use crate::steps::Step;
use crate::targets::Target;
use crate::template::{Escape, JsonTemplate, Templates};

/// Compiles a parsed flow, recording every problem in `diagnostics`.
pub(crate) fn compile(
    loaded: &LoadedFlow,
    links: &[super::links::Link<'_>],
    schemas: &mut Schemas,
    diagnostics: &mut Vec<Diagnostic>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<Flow> {
    let config = &loaded.config;
    let tables = config
        .tables
        .iter()
        .map(|(name, entries)| crate::template::Table {
            name: name.clone(),
            entries: entries.clone(),
        })
        .collect();
    let mut templates = Templates::with_tables(tables);
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
        env,
        body_schema: None,
    };
    let trigger = compile_trigger(config.trigger.as_ref(), &mut ctx);

    let mut targets = Vec::new();
    for (name, target) in &config.targets {
        ctx.part = format!("target \"{name}\"");
        targets.extend(Target::compile(name, target, &mut ctx));
    }
    // A route rule's `flow: NAME` is a flow target named after the flow.
    for rule in config.route_rules() {
        if let Some(flow) = &rule.flow
            && !ctx.targets.contains(&flow.value)
        {
            ctx.targets.push(flow.value.clone());
            targets.push(Target::Flow(crate::targets::FlowTarget::new(
                &flow.value,
                &flow.value,
            )));
        }
    }

    let mut steps = Vec::new();
    let mut step_locations = Vec::new();
    // The schema the body last passed, for `ferry check` to see what the steps read.
    let mut body_schema: Option<String> = None;
    // Where the flow routes, for what other flows' claims read there.
    let mut route_schema: Option<Option<String>> = None;
    for (index, step) in config.steps.iter().enumerate() {
        ctx.part = format!("step {} ({})", index + 1, step.value.kind());
        ctx.at = step.referenced;
        // What the step reads of the body is checked against the schema it last passed.
        ctx.body_schema = body_schema.clone();
        ctx.check_paths(&step.value);
        match &step.value {
            crate::config::StepConfig::Validate(v) => body_schema = Some(v.schema.value.clone()),
            crate::config::StepConfig::Transform(_) => body_schema = None,
            crate::config::StepConfig::Route(_) => {
                route_schema.get_or_insert(body_schema.clone());
            }
            _ => {}
        }
        if let Some(compiled) = Step::compile(&step.value, &mut ctx) {
            steps.push((ctx.part.clone(), compiled));
            step_locations.push(step.referenced);
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
    let default_target = (config.targets.len() == 1 && !routed).then_some(0);

    // Other flows' claims and subscriptions, checked against the body where they read it.
    ctx.part = "links".into();
    let route_schema = route_schema.unwrap_or_else(|| body_schema.clone());
    let linked = super::links::compile(
        links,
        &mut targets,
        route_schema.as_deref(),
        body_schema.as_deref(),
        &mut ctx,
    );
    let mut claims = crate::steps::Route::default();
    let mut subscribers = Vec::new();
    if let Some(linked) = linked {
        subscribers = linked.subscribers;
        let route = steps.iter_mut().find_map(|(_, step)| match step {
            Step::Route(route) => Some(route),
            _ => None,
        });
        match route {
            Some(route) => route.claim(linked.claims),
            None => claims.claim(linked.claims),
        }
    }

    // The reply and delivery outcomes read the body as the steps left it.
    ctx.body_schema = body_schema;
    ctx.part = "delivery".into();
    let delivery = compile_delivery(config.delivery.as_ref(), &mut ctx);
    if let (Some(DeliveryMode::Sync), Some(trigger)) =
        (delivery.as_ref().map(|d| d.mode), config.trigger.as_ref())
    {
        ctx.part = "trigger".into();
        warn_sync_idempotency_key(trigger, &mut ctx);
    }

    ctx.part = "reply".into();
    let reply = compile_reply(config.reply.as_ref(), &mut ctx);

    ctx.part = "sensitive".into();
    for pointer in &config.sensitive {
        if !pointer.value.starts_with('/') {
            ctx.error(
                pointer.referenced,
                format!(
                    "\"{}\" is not a JSON pointer into the body: write e.g. /customer/email",
                    pointer.value
                ),
            );
        }
    }
    let sensitive =
        crate::redact::Sensitive::new(config.sensitive.iter().map(|p| p.value.clone()).collect());

    let errors_after = ctx
        .diagnostics
        .iter()
        .filter(|d| d.severity == crate::diagnostic::Severity::Error)
        .count();
    if errors_after > errors_before {
        return None;
    }
    let meters = crate::observe::FlowMeters::new(steps.len(), targets.len());
    Some(Flow {
        name: config.name.value.clone(),
        description: config.description.clone(),
        file: loaded.file.clone(),
        trigger: trigger?,
        steps,
        step_locations,
        targets,
        default_target,
        claims,
        subscribers,
        delivery: delivery?,
        reply: reply?,
        templates,
        sensitive,
        meters,
    })
}

fn compile_trigger(config: Option<&TriggerConfig>, ctx: &mut Ctx<'_>) -> Option<Trigger> {
    match config {
        None => Some(Trigger::Called),
        Some(TriggerConfig::Http(http)) => compile_http_trigger(http, ctx).map(Trigger::Http),
        Some(TriggerConfig::Queue(queue)) => compile_queue_trigger(queue, ctx).map(Trigger::Queue),
        Some(TriggerConfig::Mllp(mllp)) => compile_mllp_trigger(mllp, ctx).map(Trigger::Mllp),
    }
}

fn compile_mllp_trigger(
    config: &crate::config::MllpTriggerConfig,
    ctx: &mut Ctx<'_>,
) -> Option<MllpTrigger> {
    let listen = &config.listen;
    let port = listen
        .value
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty())
        .and_then(|(_, port)| port.parse::<u16>().ok());
    if port.is_none() {
        ctx.error(
            listen.referenced,
            format!(
                "\"{}\" is not an address to listen on: write host:port, such as 0.0.0.0:2575",
                listen.value
            ),
        );
    }
    let max_message = match &config.max_message {
        None => Some(DEFAULT_MAX_BODY),
        Some(size) => ctx.size(&size.value, size.referenced),
    };
    let idle_timeout = match &config.idle_timeout {
        Some(idle) => ctx.duration(&idle.value, idle.referenced),
        None => Some(std::time::Duration::from_secs(300)),
    };
    let max_connections = config.max_connections.as_ref().map_or(64, |m| m.value);
    if let Some(m) = config.max_connections.as_ref().filter(|m| m.value == 0) {
        ctx.error(m.referenced, "max_connections must be at least 1");
    }
    let idempotency_key = match &config.idempotency_key {
        Some(path) => Some(ctx.message_path(&path.value, path.referenced)?),
        None => None,
    };
    let tls = match &config.tls {
        Some(tls) => {
            let cert = ctx.existing_project_file(&tls.cert_file.value, tls.cert_file.referenced);
            let key = ctx.existing_project_file(&tls.key_file.value, tls.key_file.referenced);
            match crate::tls::server_identity(&cert?, &key?) {
                Ok(identity) => Some(std::sync::Arc::new(identity)),
                Err(error) => {
                    ctx.error(tls.cert_file.referenced, format!("{error:#}"));
                    return None;
                }
            }
        }
        None => None,
    };
    port?;
    Some(MllpTrigger {
        listen: listen.value.clone(),
        max_message: usize::try_from(max_message?).unwrap_or(usize::MAX),
        idle_timeout: idle_timeout?,
        max_connections: max_connections.max(1),
        idempotency_key,
        tls,
    })
}

fn compile_queue_trigger(
    config: &crate::config::QueueTriggerConfig,
    ctx: &mut Ctx<'_>,
) -> Option<QueueTrigger> {
    let spec = crate::targets::queue_spec(config.driver, &config.name, config.url.as_ref(), ctx);
    let prefetch = config.prefetch.as_ref().map_or(16, |p| p.value);
    let attempts = config.attempts.as_ref().map_or(5, |a| a.value);
    if let Some(p) = config.prefetch.as_ref().filter(|p| p.value == 0) {
        ctx.error(p.referenced, "prefetch must be at least 1");
    }
    if let Some(a) = config.attempts.as_ref().filter(|a| a.value == 0) {
        ctx.error(a.referenced, "attempts must be at least 1");
    }
    let backoff = match &config.backoff {
        Some(b) => ctx.duration(&b.value, b.referenced)?,
        None => std::time::Duration::from_secs(1),
    };
    let idempotency_key = match &config.idempotency_key {
        Some(path) => Some(ctx.message_path(&path.value, path.referenced)?),
        None => None,
    };
    Some(QueueTrigger {
        spec: spec?,
        prefetch: prefetch.max(1),
        attempts: attempts.max(1),
        backoff,
        idempotency_key,
    })
}

fn compile_http_trigger(
    http: &crate::config::HttpTriggerConfig,
    ctx: &mut Ctx<'_>,
) -> Option<HttpTrigger> {
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
        Some(size) => ctx.size(&size.value, size.referenced),
    };
    let idempotency_key = match &http.idempotency_key {
        Some(path) => Some(ctx.message_path(&path.value, path.referenced)?),
        None => None,
    };
    let max_depth = match &http.max_depth {
        Some(depth) if depth.value == 0 || depth.value > crate::json::MAX_MAX_DEPTH => {
            ctx.error(
                depth.referenced,
                format!(
                    "max_depth must be between 1 and {}",
                    crate::json::MAX_MAX_DEPTH
                ),
            );
            None
        }
        Some(depth) => Some(depth.value),
        None => Some(crate::json::DEFAULT_MAX_DEPTH),
    };
    let rate_limit = match &http.rate_limit {
        Some(limit) => Some(compile_rate_limit(limit, ctx)?),
        None => None,
    };
    let auth = crate::auth::compile(http.auth.as_ref(), http.method.referenced, ctx);
    Some(HttpTrigger {
        method: method?,
        path: path.clone(),
        max_body: max_body?,
        max_depth: max_depth?,
        idempotency_key,
        auth: auth?,
        rate_limit,
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

fn compile_delivery(
    config: Option<&crate::config::DeliveryConfig>,
    ctx: &mut Ctx<'_>,
) -> Option<DeliveryPolicy> {
    let mut policy = DeliveryPolicy {
        mode: DeliveryMode::Durable,
        retry: RetryPolicy::default(),
        retry_declared: false,
        concurrency: 8,
        on_delivered: None,
        on_failed: None,
    };
    let Some(config) = config else {
        return Some(policy);
    };
    let mut ok = true;
    policy.mode = config.mode.unwrap_or(DeliveryMode::Durable);
    if let Some(retry) = &config.retry {
        policy.retry_declared = true;
        if let Some(attempts) = &retry.attempts {
            if attempts.value == 0 {
                ctx.error(attempts.referenced, "attempts must be at least 1");
                ok = false;
            }
            policy.retry.attempts = Some(attempts.value);
            // Attempts alone are a count budget; with `for`, whichever ends first.
            policy.retry.budget = None;
        }
        if let Some(text) = &retry.budget {
            match ctx.duration(&text.value, text.referenced) {
                Some(duration) => policy.retry.budget = Some(duration),
                None => ok = false,
            }
        }
        for (field, slot) in [
            (&retry.initial, &mut policy.retry.initial),
            (&retry.max, &mut policy.retry.max),
        ] {
            if let Some(text) = field {
                match ctx.duration(&text.value, text.referenced) {
                    Some(duration) => *slot = duration,
                    None => ok = false,
                }
            }
        }
        if let (Some(attempts), None, true) = (&retry.attempts, &retry.budget, ok) {
            warn_short_budget(&policy.retry, attempts.referenced, ctx);
        }
    }
    if let Some(concurrency) = &config.concurrency {
        if concurrency.value == 0 {
            ctx.error(concurrency.referenced, "concurrency must be at least 1");
            ok = false;
        }
        policy.concurrency = concurrency.value;
    }
    policy.on_delivered = compile_outcome(config.on_delivered.as_ref(), ctx, &mut ok);
    policy.on_failed = compile_outcome(config.on_failed.as_ref(), ctx, &mut ok);
    if let (DeliveryMode::Sync, Some(on_failed)) = (policy.mode, &config.on_failed) {
        warn_sync_on_failed(on_failed, ctx);
    }
    ok.then_some(policy)
}

/// Warns that a sync flow's `idempotency_key` stops no resubmission: a sync flow keeps no
/// message to answer one from.
fn warn_sync_idempotency_key(trigger: &TriggerConfig, ctx: &mut Ctx<'_>) {
    let key = match trigger {
        TriggerConfig::Http(http) => http.idempotency_key.as_ref(),
        TriggerConfig::Queue(queue) => queue.idempotency_key.as_ref(),
        TriggerConfig::Mllp(mllp) => mllp.idempotency_key.as_ref(),
    };
    if let Some(key) = key {
        ctx.warn_with(
            key.referenced,
            "sync-idempotency",
            "a sync flow keeps no messages, so `idempotency_key` does not stop a resubmission: it is delivered again (a durable flow answers it with the first reply)",
        );
    }
}

/// Warns that a sync flow's `on_failed` never applies: a failed target fails the request,
/// which changes nothing, and the caller sends it again.
fn warn_sync_on_failed(on_failed: &AfterDeliveryConfig, ctx: &mut Ctx<'_>) {
    let at = on_failed
        .state
        .as_ref()
        .map(|s| s.referenced)
        .or_else(|| on_failed.keys.first().map(|k| k.referenced))
        .or_else(|| on_failed.data.as_ref().map(|d| d.referenced));
    if let Some(at) = at {
        ctx.warn_with(
            at,
            "sync-on-failed",
            "`on_failed` never applies in a sync flow: a target that fails fails the request (502) and changes nothing, and the caller sends it again",
        );
    }
}

/// A count-only budget that ends within this after a partner goes down loses messages to
/// dead letters over an ordinary outage.
const SHORT_BUDGET: std::time::Duration = std::time::Duration::from_secs(3600);

/// Warns when a count-only retry budget runs out within [`SHORT_BUDGET`].
fn warn_short_budget(retry: &RetryPolicy, at: serde_saphyr::Location, ctx: &mut Ctx<'_>) {
    let span = retry.span();
    if span < SHORT_BUDGET {
        ctx.warn_with(
            at,
            "retry-budget",
            format!(
                "{} attempts end at most {} after the first failure: a partner down longer turns these messages into dead letters; give a time budget such as `for: 72h`",
                retry.attempts.unwrap_or_default(),
                humantime::format_duration(std::time::Duration::from_secs(span.as_secs().max(1)))
            ),
        );
    }
}

fn compile_outcome(
    config: Option<&AfterDeliveryConfig>,
    ctx: &mut Ctx<'_>,
    ok: &mut bool,
) -> Option<AfterDelivery> {
    let config = config?;
    let mut keys = Vec::new();
    for key in &config.keys {
        match ctx.text_template(&key.value, Escape::Plain, key.referenced) {
            Some(template) => keys.push(template),
            None => *ok = false,
        }
    }
    let data = config.data.as_ref().and_then(|d| {
        let compiled = ctx.json_template(&d.value, d.referenced);
        *ok &= compiled.is_some();
        compiled
    });
    Some(AfterDelivery {
        state: config.state.as_ref().map(|s| s.value.clone()),
        keys,
        data,
    })
}

fn compile_reply(config: Option<&crate::config::ReplyConfig>, ctx: &mut Ctx<'_>) -> Option<Reply> {
    let Some(config) = config else {
        let body_source = json!({"id": "{{meta.id}}"});
        let body = ctx.templates.compile_json(&body_source).ok()?;
        return Some(Reply {
            declared: false,
            status: StatusCode::OK,
            headers: Vec::new(),
            body,
            body_source,
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
                ctx.header_template(&value.value, value.referenced)
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
        declared: true,
        status: status?,
        headers,
        body: body?,
        body_source: config
            .body
            .as_ref()
            .map_or_else(|| json!({}), |b| b.value.clone()),
    })
}

/// A trigger's `rate_limit`, compiled.
fn compile_rate_limit(
    config: &crate::config::RateLimitConfig,
    ctx: &mut Ctx<'_>,
) -> Option<RateLimit> {
    let per_second = std::num::NonZeroU32::new(config.per_second.value);
    let burst = config
        .burst
        .as_ref()
        .map_or(per_second, |b| std::num::NonZeroU32::new(b.value));
    let (Some(per_second), Some(burst)) = (per_second, burst) else {
        ctx.error(
            config.per_second.referenced,
            "a rate limit must be at least 1",
        );
        return None;
    };
    Some(RateLimit::new(
        governor::Quota::per_second(per_second).allow_burst(burst),
    ))
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
