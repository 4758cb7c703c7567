//! Steps: what a flow does to each message, in order.
//!
//! [`Step`] is the closed registry of step kinds; each kind lives in its own file, named as
//! in YAML (`- validate:` ↔ `validate.rs`), with its compile and run halves.

mod correlate;
mod route;
mod set;
mod transform;
mod validate;

pub use correlate::Correlate;
pub use route::Route;
pub(crate) use route::{Condition, Rule};
pub use set::Set;
pub use transform::Transform;
pub use validate::Validate;

use crate::compile::Ctx;
use crate::config::StepConfig;
use crate::error::FlowError;
use crate::message::Message;
use crate::store::{CorrelationWrite, Store};
use crate::template::Templates;

/// A compiled step.
#[derive(Debug)]
pub enum Step {
    /// JSON Schema validation.
    Validate(Validate),
    /// JSONPath extraction into vars.
    Set(Set),
    /// A new body from a template.
    Transform(Transform),
    /// A choice of target.
    Route(Route),
    /// A correlation record saved or found.
    Correlate(Correlate),
}

/// What running a step may decide besides changing the message.
#[derive(Debug, Default)]
pub struct StepState {
    /// The targets a `route` step chose, as indices into the flow's targets.
    pub route: Option<Vec<usize>>,
    /// Correlation changes to commit with the message.
    pub correlation: Vec<CorrelationWrite>,
}

impl Step {
    /// Compiles one step, recording problems in `ctx`.
    pub(crate) fn compile(config: &StepConfig, ctx: &mut Ctx<'_>) -> Option<Self> {
        match config {
            StepConfig::Validate(c) => Validate::compile(c, ctx).map(Self::Validate),
            StepConfig::Set(c) => Set::compile(c, ctx).map(Self::Set),
            StepConfig::Transform(c) => Transform::compile(c, ctx).map(Self::Transform),
            StepConfig::Route(c) => Route::compile(c, ctx).map(Self::Route),
            StepConfig::Correlate(c) => Correlate::compile(c, ctx).map(Self::Correlate),
        }
    }

    /// Runs the step on `message`.
    ///
    /// # Errors
    ///
    /// A [`FlowError`] when the message breaks a schema, a template cannot render, no
    /// route matches, or no correlation record is found; `label` names the step in it.
    pub async fn apply(
        &self,
        message: &mut Message,
        templates: &Templates,
        state: &mut StepState,
        store: Option<&Store>,
        label: &str,
    ) -> Result<(), FlowError> {
        match self {
            Self::Validate(step) => step.apply(message),
            Self::Set(step) => {
                step.apply(message);
                Ok(())
            }
            Self::Transform(step) => {
                step.apply(message, templates)
                    .map_err(|reason| FlowError::Unprocessable {
                        context: label.to_owned(),
                        reason,
                    })
            }
            Self::Route(step) => {
                state.route = Some(step.choose(message, templates)?);
                Ok(())
            }
            Self::Correlate(step) => step.apply(message, templates, state, store, label).await,
        }
    }
}
