//! `route`: chooses the target of a message by the first rule whose condition holds.

use serde_json::Value;

use crate::compile::Ctx;
use crate::config::{ConditionConfig, RouteRuleConfig};
use crate::error::FlowError;
use crate::jsonpath::JsonPath;
use crate::message::Message;
use crate::template::{JsonTemplate, Templates};

/// A compiled `route` step.
#[derive(Debug, Default)]
pub struct Route {
    rules: Vec<Rule>,
}

/// A condition and the targets (indices into the flow's targets) it sends a message to.
#[derive(Debug)]
pub(crate) struct Rule {
    pub(crate) condition: Option<Condition>,
    pub(crate) targets: Vec<usize>,
}

/// A condition on the message.
#[derive(Debug)]
pub(crate) enum Condition {
    /// What a JSONPath selects, tested.
    Path { path: JsonPath, test: Test },
    /// An expression's value, truthy or not.
    Expr(JsonTemplate),
}

#[derive(Debug)]
pub(crate) enum Test {
    Exists(bool),
    OneOf(Vec<Value>),
}

impl Route {
    pub(crate) fn compile(config: &[RouteRuleConfig], ctx: &mut Ctx<'_>) -> Option<Self> {
        let mut rules = Vec::new();
        let mut ok = true;
        let mut catch_all: Option<u64> = None;
        for rule in config {
            let (names, at) = match (&rule.to, &rule.flow) {
                (Some(to), None) => (to.value.0.clone(), to.referenced),
                (None, Some(flow)) => (vec![flow.value.clone()], flow.referenced),
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
                    at,
                    "unreachable-route",
                    format!("this rule can never match: the rule at line {earlier} has no `when` and matches first"),
                );
            }
            let mut targets = Vec::with_capacity(names.len());
            for name in &names {
                match ctx.targets.iter().position(|t| t == name) {
                    Some(index) if targets.contains(&index) => {
                        ctx.error(at, format!("target \"{name}\" is listed twice"));
                        ok = false;
                    }
                    Some(index) => targets.push(index),
                    None => {
                        unknown_target(name, at, ctx);
                        ok = false;
                    }
                }
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
                    catch_all.get_or_insert(at.line());
                    None
                }
            };
            rules.push(Rule { condition, targets });
        }
        ok.then_some(Self { rules })
    }

    /// Puts `claims` (other flows' `takes`) before the step's own rules.
    pub(crate) fn claim(&mut self, claims: Vec<Rule>) {
        self.rules.splice(0..0, claims);
    }

    /// The targets of the first rule that holds for the message, if one does.
    ///
    /// # Errors
    ///
    /// What a `test` expression's helper refused.
    pub(crate) fn first_match(
        &self,
        message: &Message,
        templates: &Templates,
    ) -> Result<Option<&[usize]>, FlowError> {
        for rule in &self.rules {
            let holds = match &rule.condition {
                None => true,
                Some(condition) => condition.holds(message, templates)?,
            };
            if holds {
                return Ok(Some(&rule.targets));
            }
        }
        Ok(None)
    }

    /// The targets the message goes to.
    pub(crate) fn choose(
        &self,
        message: &Message,
        templates: &Templates,
    ) -> Result<Vec<usize>, FlowError> {
        match self.first_match(message, templates)? {
            Some(targets) => Ok(targets.to_vec()),
            None => Err(FlowError::NoRoute),
        }
    }
}

/// Reports a rule's unknown target, with the nearest known name.
fn unknown_target(name: &str, at: serde_saphyr::Location, ctx: &mut Ctx<'_>) {
    let hint = match crate::diagnostic::closest(name, ctx.targets.iter().map(String::as_str)) {
        Some(best) => format!(
            "did you mean `{best}`? known targets: {}",
            ctx.targets.join(", ")
        ),
        None if ctx.targets.is_empty() => "the flow declares no targets".to_owned(),
        None => format!("known targets: {}", ctx.targets.join(", ")),
    };
    ctx.error_with(
        at,
        "unknown-target",
        format!("unknown target \"{name}\""),
        Some(hint),
    );
}

impl Condition {
    pub(crate) fn compile(config: &ConditionConfig, ctx: &mut Ctx<'_>) -> Option<Self> {
        let at = config
            .path
            .as_ref()
            .or(config.test.as_ref())
            .map_or(ctx.at, |s| s.referenced);
        let path = match (&config.path, &config.test) {
            (Some(path), None) => path,
            (None, Some(test)) => {
                if config.equals.is_some() || config.one_of.is_some() || config.exists.is_some() {
                    ctx.error(at, "a `test` condition stands alone: write the comparison in it, such as `{{eq body.lab 'north'}}`");
                    return None;
                }
                let template = ctx.json_template(&Value::String(test.value.clone()), at)?;
                if !matches!(template, JsonTemplate::Expr(..)) {
                    ctx.error(
                        at,
                        format!("`test` takes one `{{{{…}}}}`, not \"{}\"", test.value),
                    );
                    return None;
                }
                return Some(Self::Expr(template));
            }
            _ => {
                ctx.error(
                    at,
                    "a condition has a `path` or a `test`, not both or neither",
                );
                return None;
            }
        };
        let json_path = ctx.message_path(&path.value, path.referenced)?;
        let test = match (&config.equals, &config.one_of, config.exists) {
            (Some(value), None, None) => Test::OneOf(vec![value.clone()]),
            (None, Some(values), None) => Test::OneOf(values.clone()),
            (None, None, exists) => Test::Exists(exists.unwrap_or(true)),
            _ => {
                ctx.error(
                    path.referenced,
                    "a condition takes one of `equals`, `in` or `exists`",
                );
                return None;
            }
        };
        Some(Self::Path {
            path: json_path,
            test,
        })
    }

    /// Whether the condition holds for `message`.
    ///
    /// # Errors
    ///
    /// What a `test` expression's helper refused.
    pub(crate) fn holds(
        &self,
        message: &Message,
        templates: &Templates,
    ) -> Result<bool, FlowError> {
        match self {
            Self::Path { path, test } => {
                let selected = path.select(message.root());
                Ok(match test {
                    Test::Exists(exists) => selected.is_empty() != *exists,
                    Test::OneOf(values) => selected
                        .iter()
                        .any(|v| values.iter().any(|w| crate::template::helpers::same(v, w))),
                })
            }
            Self::Expr(template) => {
                let value = templates.render_json(template, message).map_err(|reason| {
                    FlowError::Unprocessable {
                        context: "route".into(),
                        reason,
                    }
                })?;
                Ok(crate::template::helpers::truthy(Some(&value)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::Route;
    use crate::compile::bench::{Bench, message};
    use crate::config::RouteRuleConfig;
    use crate::error::FlowError;

    fn compile(bench: &mut Bench, yaml: &str) -> Result<Route, String> {
        bench.compile(yaml, |rules: &Vec<RouteRuleConfig>, ctx| {
            Route::compile(rules, ctx)
        })
    }

    #[test]
    fn the_first_rule_that_holds_chooses_the_target() {
        let mut bench = Bench::new().targets(&["north", "south", "fallback"]);
        let route = compile(
            &mut bench,
            r#"
- when: {path: $.body.lab, equals: north}
  to: north
- when: {test: "{{in (upper body.region) 'S' 'SOUTH'}}"}
  to: south
- when: {path: $.body.urgent, exists: true}
  to: north
- to: fallback
"#,
        )
        .unwrap();
        let choose = |body| route.choose(&message(body), &bench.templates).unwrap();
        assert_eq!(choose(json!({"lab": "north", "region": "south"})), [0]);
        assert_eq!(choose(json!({"lab": "west", "region": "south"})), [1]);
        assert_eq!(choose(json!({"urgent": false})), [0]);
        assert_eq!(choose(json!({})), [2]);
    }

    #[test]
    fn no_rule_holding_is_no_route_and_numbers_compare_by_value() {
        let mut bench = Bench::new().targets(&["a"]);
        let route = compile(&mut bench, "- when: {path: $.body.n, in: [1, 2]}\n  to: a").unwrap();
        assert_eq!(
            route
                .choose(&message(json!({"n": 2.0})), &bench.templates)
                .unwrap(),
            [0]
        );
        let missed = route.choose(&message(json!({"n": 3})), &bench.templates);
        assert!(matches!(missed, Err(FlowError::NoRoute)), "{missed:?}");
    }

    #[test]
    fn mistakes_are_reported_with_what_to_write() {
        let mut bench = Bench::new().targets(&["north", "south"]);
        let error = compile(&mut bench, "- to: nort").unwrap_err();
        assert!(error.contains("unknown target \"nort\""), "{error}");
        let hint = bench.diagnostics[0].hint.clone().unwrap();
        assert!(hint.starts_with("did you mean `north`?"), "{hint}");

        for (yaml, says) in [
            (
                "- when: {path: $.body.a}",
                "needs `to: TARGET` or `flow: NAME`",
            ),
            ("- {to: north, flow: other}", "not both"),
            (
                "- when: {path: $.body.a, test: '{{body.a}}'}\n  to: north",
                "not both or neither",
            ),
            (
                "- when: {test: '{{body.a}}', equals: 1}\n  to: north",
                "stands alone",
            ),
            (
                "- when: {test: 'a {{body.a}}'}\n  to: north",
                "takes one `{{…}}`",
            ),
            (
                "- when: {path: $.body.a, equals: 1, exists: true}\n  to: north",
                "one of `equals`, `in` or `exists`",
            ),
        ] {
            let error = compile(&mut bench, yaml).unwrap_err();
            assert!(error.contains(says), "{yaml}: {error}");
        }
    }

    #[test]
    fn a_rule_may_send_the_message_to_several_targets() {
        let mut bench = Bench::new().targets(&["portal", "archive", "audit"]);
        let route = compile(
            &mut bench,
            "- when: {path: $.body.final, equals: true}\n  to: [portal, archive]\n- to: audit",
        )
        .unwrap();
        let chosen = route
            .choose(&message(json!({"final": true})), &bench.templates)
            .unwrap();
        assert_eq!(chosen, [0, 1]);
        let error = compile(&mut bench, "- to: [portal, portal]").unwrap_err();
        assert!(error.contains("listed twice"), "{error}");
        let error = compile(&mut bench, "- to: []").unwrap_err();
        assert!(error.contains("at least one target"), "{error}");
    }

    #[test]
    fn claims_are_tried_before_the_steps_own_rules() {
        let mut bench = Bench::new().targets(&["lab", "helix"]);
        let mut route = compile(&mut bench, "- to: lab").unwrap();
        let claim = bench
            .compile(
                "{path: $.body.lab, equals: helix}",
                |c: &crate::config::ConditionConfig, ctx| super::Condition::compile(c, ctx),
            )
            .unwrap();
        route.claim(vec![super::Rule {
            condition: Some(claim),
            targets: vec![1],
        }]);
        let choose = |body| route.choose(&message(body), &bench.templates).unwrap();
        assert_eq!(choose(json!({"lab": "helix"})), [1]);
        assert_eq!(choose(json!({"lab": "north"})), [0]);
    }

    #[test]
    fn a_rule_after_a_catch_all_is_unreachable() {
        let mut bench = Bench::new().targets(&["north", "south"]);
        compile(&mut bench, "- to: north\n- to: south").unwrap();
        assert_eq!(bench.warnings(), ["unreachable-route"]);
    }
}
