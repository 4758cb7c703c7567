//! `route`: chooses the target of a message by the first rule whose condition holds.

use serde_json::Value;

use crate::compile::Ctx;
use crate::config::{ConditionConfig, RouteRuleConfig};
use crate::error::FlowError;
use crate::jsonpath::JsonPath;
use crate::message::Message;

/// A compiled `route` step.
#[derive(Debug)]
pub struct Route {
    rules: Vec<(Option<Condition>, usize)>,
}

/// A condition on the message.
#[derive(Debug)]
pub(crate) struct Condition {
    path: JsonPath,
    test: Test,
}

#[derive(Debug)]
enum Test {
    Exists(bool),
    OneOf(Vec<Value>),
}

impl Route {
    pub(crate) fn compile(config: &[RouteRuleConfig], ctx: &mut Ctx<'_>) -> Option<Self> {
        let mut rules = Vec::new();
        let mut ok = true;
        let mut catch_all: Option<u64> = None;
        for rule in config {
            let to = match (&rule.to, &rule.flow) {
                (Some(to), None) | (None, Some(to)) => to,
                (Some(to), Some(_)) => {
                    ctx.error(
                        to.referenced,
                        "a rule goes `to` a target or to a `flow`, not both",
                    );
                    ok = false;
                    continue;
                }
                (None, None) => {
                    ctx.error(
                        ctx.at,
                        "every route rule needs `to: TARGET` or `flow: NAME`",
                    );
                    ok = false;
                    continue;
                }
            };
            if let Some(earlier) = catch_all {
                ctx.warn_with(
                    to.referenced,
                    "unreachable-route",
                    format!("this rule can never match: the rule at line {earlier} has no `when` and matches first"),
                );
            }
            let target = ctx.targets.iter().position(|t| *t == to.value);
            if target.is_none() {
                let hint = match crate::diagnostic::closest(
                    &to.value,
                    ctx.targets.iter().map(String::as_str),
                ) {
                    Some(best) => format!(
                        "did you mean `{best}`? known targets: {}",
                        ctx.targets.join(", ")
                    ),
                    None if ctx.targets.is_empty() => "the flow declares no targets".to_owned(),
                    None => format!("known targets: {}", ctx.targets.join(", ")),
                };
                ctx.error_with(
                    to.referenced,
                    "unknown-target",
                    format!("unknown target \"{}\"", to.value),
                    Some(hint),
                );
                ok = false;
            }
            let condition = match &rule.when {
                Some(when) => match Condition::compile(when, ctx) {
                    Some(condition) => Some(condition),
                    None => {
                        ok = false;
                        None
                    }
                },
                None => {
                    catch_all.get_or_insert(to.referenced.line());
                    None
                }
            };
            if let Some(target) = target {
                rules.push((condition, target));
            }
        }
        ok.then_some(Self { rules })
    }

    /// The index of the target the message goes to.
    pub(crate) fn choose(&self, message: &Message) -> Result<usize, FlowError> {
        self.rules
            .iter()
            .find(|(condition, _)| condition.as_ref().is_none_or(|c| c.holds(message.root())))
            .map(|(_, target)| *target)
            .ok_or(FlowError::NoRoute)
    }
}

impl Condition {
    fn compile(config: &ConditionConfig, ctx: &mut Ctx<'_>) -> Option<Self> {
        let path = ctx.message_path(&config.path.value, config.path.referenced)?;
        let test = match (&config.equals, &config.one_of, config.exists) {
            (Some(value), None, None) => Test::OneOf(vec![value.clone()]),
            (None, Some(values), None) => Test::OneOf(values.clone()),
            (None, None, exists) => Test::Exists(exists.unwrap_or(true)),
            _ => {
                ctx.error(
                    config.path.referenced,
                    "a condition takes one of `equals`, `in` or `exists`",
                );
                return None;
            }
        };
        Some(Self { path, test })
    }

    /// Whether the condition holds for the message document `root`.
    pub(crate) fn holds(&self, root: &Value) -> bool {
        let selected = self.path.select(root);
        match &self.test {
            Test::Exists(exists) => selected.is_empty() != *exists,
            Test::OneOf(values) => selected.iter().any(|v| values.contains(v)),
        }
    }
}
