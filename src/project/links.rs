//! Links a flow declares to another flow's messages: `takes` (a share of them, delivered
//! instead of that flow's own target: another lab joining `portal-to-lab`) and `subscribes`
//! (all or some of them, received besides that flow's targets: a billing system). The flow
//! joined is compiled with its links: each becomes a `flow` target named after the joining
//! flow, and a rule saying which messages go there.
//!
//! `ferry check` reports, at the joining flow's file and line: a link to a flow that does
//! not exist, a claim that can never match (it reads a field the body does not have where
//! the joined flow routes, or wants a value its schema does not allow), and two claims — or
//! a claim and the flow's own route rule — that take the same messages.

use std::collections::HashMap;

use serde_json::Value;

use crate::compile::Ctx;
use crate::config::load::LoadedFlow;
use crate::config::{ConditionConfig, Spanned};
use crate::diagnostic::Diagnostic;
use crate::steps::{Condition, Rule};
use crate::targets::{FlowTarget, Target};

/// What a link asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkKind {
    /// `takes`: these messages go to the joining flow instead.
    Takes,
    /// `subscribes`: these messages go to the joining flow too.
    Subscribes,
}

/// One link, as the joining flow writes it.
pub(crate) struct Link<'a> {
    pub(crate) kind: LinkKind,
    /// The flow that declares it.
    pub(crate) partner: &'a LoadedFlow,
    /// The name of the flow it joins, where it is written.
    pub(crate) joins: &'a Spanned<String>,
    pub(crate) when: Option<&'a ConditionConfig>,
}

impl Link<'_> {
    fn partner_name(&self) -> &str {
        &self.partner.config.name.value
    }

    fn verb(&self) -> &'static str {
        match self.kind {
            LinkKind::Takes => "takes",
            LinkKind::Subscribes => "subscribes",
        }
    }
}

/// Every link, by the name of the flow it joins. A link to a flow that does not exist, or to
/// the flow itself, is reported.
pub(crate) fn collect<'a>(
    flows: &'a [LoadedFlow],
    diagnostics: &mut Vec<Diagnostic>,
) -> HashMap<&'a str, Vec<Link<'a>>> {
    let names: Vec<&str> = flows.iter().map(|f| f.config.name.value.as_str()).collect();
    let mut links: HashMap<&str, Vec<Link<'a>>> = HashMap::new();
    for flow in flows {
        let takes = flow.config.takes.iter().map(|t| Link {
            kind: LinkKind::Takes,
            partner: flow,
            joins: &t.from,
            when: Some(&t.when),
        });
        let subscribes = flow.config.subscribes.iter().map(|s| Link {
            kind: LinkKind::Subscribes,
            partner: flow,
            joins: &s.to,
            when: s.when.as_ref(),
        });
        for link in takes.chain(subscribes) {
            let joined = link.joins.value.as_str();
            let problem = if joined == flow.config.name.value {
                Some(format!("a flow cannot {} its own messages", link.verb()))
            } else if !names.contains(&joined) {
                Some(format!("unknown flow \"{joined}\""))
            } else {
                None
            };
            if let Some(problem) = problem {
                diagnostics.push(
                    Diagnostic::error(&flow.file, problem)
                        .with_code("unknown-flow")
                        .with_hint(super::known_flows(joined, &names))
                        .in_flow(&flow.config.name.value)
                        .in_context(link.verb())
                        .at_location(link.joins.referenced),
                );
                continue;
            }
            let joined = names[names.iter().position(|n| *n == joined).expect("known")];
            links.entry(joined).or_default().push(link);
        }
    }
    links
}

/// The rules the joined flow gets from its links.
#[derive(Default)]
pub(crate) struct Linked {
    /// Claims, to try before the flow's own route rules.
    pub(crate) claims: Vec<Rule>,
    /// Subscriptions, each for one target.
    pub(crate) subscribers: Vec<Rule>,
}

/// Compiles `links` into the flow `ctx` compiles: a `flow` target for each partner (added to
/// `targets` and `ctx.targets`), and its rule. `route_schema` is the schema the body last
/// passed where the flow routes, `end_schema` where its steps end: what claims and
/// subscriptions read is checked against them.
pub(crate) fn compile<'a>(
    links: &'a [Link<'a>],
    targets: &mut Vec<Target>,
    route_schema: Option<&str>,
    end_schema: Option<&str>,
    ctx: &mut Ctx<'a>,
) -> Option<Linked> {
    let mut linked = Linked::default();
    let mut ok = true;
    let (file, flow, part, body_schema) = (
        ctx.file,
        ctx.flow,
        ctx.part.clone(),
        ctx.body_schema.clone(),
    );
    for link in links {
        // Problems are the partner's: shown in its file.
        ctx.file = &link.partner.file;
        ctx.flow = link.partner_name();
        ctx.part = format!("{} {}", link.verb(), link.joins.value);
        ctx.body_schema = match link.kind {
            LinkKind::Takes => route_schema.map(str::to_owned),
            LinkKind::Subscribes => end_schema.map(str::to_owned),
        };
        let Some(index) = partner_target(link, targets, ctx) else {
            ok = false;
            continue;
        };
        let condition = match link.when {
            Some(when) => {
                if let Some(never) = never_matches(when, ctx) {
                    ctx.error_with(condition_at(when, link), "never-matches", never, None);
                    ok = false;
                    continue;
                }
                match Condition::compile(when, ctx) {
                    Some(condition) => Some(condition),
                    None => {
                        ok = false;
                        continue;
                    }
                }
            }
            None => None,
        };
        let rule = Rule {
            condition,
            targets: vec![index],
        };
        match link.kind {
            LinkKind::Takes => linked.claims.push(rule),
            LinkKind::Subscribes => linked.subscribers.push(rule),
        }
    }
    ctx.file = file;
    ctx.flow = flow;
    ctx.part = part;
    ctx.body_schema = body_schema;
    ok.then_some(linked)
}

/// The index of the partner's target in the joined flow, added unless a `flow` target to
/// the partner (a route line written before `takes` existed) is there already.
fn partner_target(link: &Link<'_>, targets: &mut Vec<Target>, ctx: &mut Ctx<'_>) -> Option<usize> {
    let name = link.partner_name();
    let subscribes = link.kind == LinkKind::Subscribes;
    if let Some(index) = ctx.targets.iter().position(|t| t == name) {
        return match targets.get(index) {
            Some(Target::Flow(call)) if call.flow == name && call.subscribed == subscribes => {
                Some(index)
            }
            _ => {
                ctx.error(
                    link.joins.referenced,
                    format!(
                        "flow \"{}\" already has a target named \"{name}\", or {name} both takes and subscribes to it",
                        link.joins.value
                    ),
                );
                None
            }
        };
    }
    let target = if subscribes {
        FlowTarget::subscription(name)
    } else {
        FlowTarget::new(name, name)
    };
    targets.push(Target::Flow(target));
    ctx.targets.push(name.to_owned());
    Some(targets.len() - 1)
}

/// Where a condition is written, for its problems.
fn condition_at(when: &ConditionConfig, link: &Link<'_>) -> serde_saphyr::Location {
    when.path
        .as_ref()
        .or(when.test.as_ref())
        .map_or(link.joins.referenced, |s| s.referenced)
}

/// Why a path condition can never hold where it is read, if the body's schema there says
/// so: the field is not declared, or none of the values it wants is allowed.
fn never_matches(when: &ConditionConfig, ctx: &Ctx<'_>) -> Option<String> {
    let schema = ctx.body_schema.as_deref()?;
    let path = when.path.as_ref()?;
    let segments = crate::jsonpath::JsonPath::parse(&path.value)
        .ok()?
        .segments()?;
    let ("body", rest) = segments.split_first().map(|(r, rest)| (r.as_str(), rest))? else {
        return None;
    };
    if let crate::schema::Declared::No { field, known, .. } = ctx.schemas.declares(schema, rest) {
        let hint = match crate::diagnostic::closest(&field, known.iter().map(String::as_str)) {
            Some(best) => format!(" (did you mean `{best}`?)"),
            None => String::new(),
        };
        return Some(format!(
            "this can never match: where the message is read, its body is {schema}, which declares no `{field}`{hint}"
        ));
    }
    let wanted: Vec<&Value> = match (&when.equals, &when.one_of) {
        (Some(value), _) => vec![value],
        (None, Some(values)) => values.iter().collect(),
        _ => return None,
    };
    let refused = wanted
        .iter()
        .all(|v| ctx.schemas.admits(schema, rest, v) == Some(false));
    refused.then(|| {
        let shown: Vec<String> = wanted.iter().map(|v| v.to_string()).collect();
        format!(
            "this can never match: {schema} does not allow {} at {}",
            shown.join(" or "),
            path.value
        )
    })
}

/// Reports claims that take the same messages as another claim or as one of the joined
/// flow's own route rules. Only what can be told from the conditions is found: the same
/// path with a value in common (or `exists`), or the same `test` expression.
pub(crate) fn check_overlaps(
    joined: &LoadedFlow,
    links: &[Link<'_>],
    diagnostics: &mut Vec<Diagnostic>,
) {
    let own: Vec<(&ConditionConfig, String)> = joined
        .config
        .route_rules()
        .filter_map(|rule| {
            let when = rule.when.as_ref()?;
            let to = match (&rule.to, &rule.flow) {
                (Some(to), _) => to.value.0.join(", "),
                (None, Some(flow)) => flow.value.clone(),
                (None, None) => return None,
            };
            Some((when, to))
        })
        .collect();
    let claims: Vec<&Link<'_>> = links.iter().filter(|l| l.kind == LinkKind::Takes).collect();
    for (i, claim) in claims.iter().enumerate() {
        let Some(when) = claim.when else { continue };
        let earlier = claims[..i]
            .iter()
            .filter_map(|other| Some((other, other.when?)))
            .find(|(_, other)| overlap(when, other));
        let problem = if let Some((other, _)) = earlier {
            Some(format!(
                "{} takes the same messages of {} as {} ({}:{})",
                claim.partner_name(),
                joined.config.name.value,
                other.partner_name(),
                other.partner.file.display(),
                other.joins.referenced.line()
            ))
        } else {
            own.iter()
                .find(|(rule, _)| overlap(when, rule))
                .map(|(_, to)| {
                    format!(
                        "{} already routes these messages to {to} in {}",
                        joined.config.name.value,
                        joined.file.display()
                    )
                })
        };
        if let Some(problem) = problem {
            diagnostics.push(
                Diagnostic::error(&claim.partner.file, problem)
                    .with_code("claim-conflict")
                    .with_hint("each message goes to one partner: make the conditions exclusive")
                    .in_flow(claim.partner_name())
                    .in_context(format!("takes {}", claim.joins.value))
                    .at_location(condition_at(when, claim)),
            );
        }
    }
}

/// Whether one message could meet both conditions, as far as their text tells.
fn overlap(a: &ConditionConfig, b: &ConditionConfig) -> bool {
    if let (Some(x), Some(y)) = (&a.test, &b.test) {
        return x.value.trim() == y.value.trim();
    }
    let (Some(x), Some(y)) = (&a.path, &b.path) else {
        return false;
    };
    if x.value.trim() != y.value.trim() {
        return false;
    }
    match (wanted(a), wanted(b)) {
        (Wanted::Values(x), Wanted::Values(y)) => x
            .iter()
            .any(|v| y.iter().any(|w| crate::template::helpers::same(v, w))),
        (Wanted::Exists(true), Wanted::Values(_) | Wanted::Exists(true))
        | (Wanted::Values(_), Wanted::Exists(true))
        | (Wanted::Exists(false), Wanted::Exists(false)) => true,
        _ => false,
    }
}

enum Wanted<'a> {
    Values(Vec<&'a Value>),
    Exists(bool),
}

fn wanted(condition: &ConditionConfig) -> Wanted<'_> {
    match (&condition.equals, &condition.one_of) {
        (Some(value), _) => Wanted::Values(vec![value]),
        (None, Some(values)) => Wanted::Values(values.iter().collect()),
        (None, None) => Wanted::Exists(condition.exists.unwrap_or(true)),
    }
}
