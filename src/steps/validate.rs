//! `validate`: the body must match a JSON Schema, or the message is refused with every
//! violation.

use std::sync::Arc;

use jsonschema::Validator;

use crate::compile::Ctx;
use crate::config::ValidateConfig;
use crate::error::FlowError;
use crate::message::Message;
use crate::schema::Defaults;

/// A compiled `validate` step.
#[derive(Debug)]
pub struct Validate {
    name: String,
    schema: Arc<Validator>,
    /// The schema's defaults, when the step fills them in.
    defaults: Option<Defaults>,
}

impl Validate {
    pub(crate) fn compile(config: &ValidateConfig, ctx: &mut Ctx<'_>) -> Option<Self> {
        let name = &config.schema;
        let schema = ctx.schema(&name.value, name.referenced)?;
        let defaults = if config.defaults {
            let defaults = ctx.schemas.defaults(&name.value);
            if defaults.is_none() {
                ctx.warn_with(
                    name.referenced,
                    "schema",
                    format!("`defaults: true`, but {} declares no defaults", name.value),
                );
            }
            defaults
        } else {
            None
        };
        Some(Self {
            name: name.value.clone(),
            schema,
            defaults,
        })
    }

    /// The schema file it validates against.
    pub fn schema_name(&self) -> &str {
        &self.name
    }

    pub(crate) fn apply(&self, message: &mut Message) -> Result<(), FlowError> {
        if let Some(defaults) = &self.defaults {
            message.update_body(|body| defaults.apply(body));
        }
        // The fast check first: valid messages, the common case, skip collecting errors.
        if self.schema.is_valid(message.body()) {
            return Ok(());
        }
        let (violations, total) = crate::schema::violations_up_to(
            &self.schema,
            message.body(),
            crate::error::MAX_VIOLATIONS,
        );
        Err(FlowError::Invalid {
            schema: self.name.clone(),
            violations,
            total,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::Validate;
    use crate::compile::bench::{Bench, message};
    use crate::error::FlowError;

    fn schema() -> serde_json::Value {
        json!({
            "type": "object",
            "required": ["ref"],
            "properties": {
                "ref": {"type": "string"},
                "priority": {"enum": ["routine", "urgent"], "default": "routine"}
            }
        })
    }

    #[test]
    fn a_valid_body_passes_and_an_invalid_one_is_refused_with_every_violation() {
        let mut bench = Bench::new().schema("request.json", &schema());
        let step = bench
            .compile("schema: request.json", Validate::compile)
            .unwrap();
        assert_eq!(step.schema_name(), "request.json");
        step.apply(&mut message(json!({"ref": "R-1"}))).unwrap();

        let refused = step
            .apply(&mut message(json!({"priority": "soon"})))
            .unwrap_err();
        let FlowError::Invalid {
            schema,
            violations,
            total,
        } = refused
        else {
            panic!("not a schema refusal: {refused}");
        };
        assert_eq!((schema.as_str(), total), ("request.json", 2));
        let pointers: Vec<_> = violations.iter().map(|v| v.pointer.as_str()).collect();
        assert_eq!(pointers, ["/ref", "/priority"]);
    }

    #[test]
    fn defaults_are_filled_in_before_the_check_when_asked() {
        let mut bench = Bench::new().schema("request.json", &schema());
        let step = bench
            .compile("schema: request.json\ndefaults: true", Validate::compile)
            .unwrap();
        let mut filled = message(json!({"ref": "R-1"}));
        step.apply(&mut filled).unwrap();
        assert_eq!(filled.body()["priority"], "routine");

        let plain = bench
            .compile("schema: request.json", Validate::compile)
            .unwrap();
        let mut untouched = message(json!({"ref": "R-1"}));
        plain.apply(&mut untouched).unwrap();
        assert_eq!(untouched.body(), &json!({"ref": "R-1"}));
    }

    #[test]
    fn a_missing_schema_or_one_without_defaults_is_reported() {
        let mut bench = Bench::new().schema("plain.json", &json!({"type": "object"}));
        let error = bench
            .compile("schema: nowhere.json", Validate::compile)
            .unwrap_err();
        assert!(error.contains("nowhere.json"), "{error}");

        bench
            .compile("schema: plain.json\ndefaults: true", Validate::compile)
            .unwrap();
        assert_eq!(bench.warnings(), ["schema"]);
    }
}
