//! `validate`: the body must match a JSON Schema, or the message is refused with every
//! violation.

use std::sync::Arc;

use jsonschema::Validator;

use crate::compile::Ctx;
use crate::config::ValidateConfig;
use crate::error::FlowError;
use crate::message::Message;

/// A compiled `validate` step.
#[derive(Debug)]
pub struct Validate {
    name: String,
    schema: Arc<Validator>,
}

impl Validate {
    pub(crate) fn compile(config: &ValidateConfig, ctx: &mut Ctx<'_>) -> Option<Self> {
        let name = &config.schema;
        let schema = ctx.schema(&name.value, name.referenced)?;
        Some(Self {
            name: name.value.clone(),
            schema,
        })
    }

    /// The schema file it validates against.
    pub fn schema_name(&self) -> &str {
        &self.name
    }

    pub(crate) fn apply(&self, message: &Message) -> Result<(), FlowError> {
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
