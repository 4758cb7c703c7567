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
