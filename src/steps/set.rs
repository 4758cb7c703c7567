//! `set`: extracts values from the message with JSONPath into named vars.
//!
//! A singular path (names and indices only) stores the value it selects, or `null`; any other
//! path stores the array of everything it selects.

use std::collections::BTreeMap;

use crate::compile::Ctx;
use crate::config::Spanned;
use crate::jsonpath::JsonPath;
use crate::message::Message;

/// A compiled `set` step.
#[derive(Debug)]
pub struct Set {
    vars: Vec<(String, JsonPath)>,
}

impl Set {
    pub(crate) fn compile(
        config: &BTreeMap<String, Spanned<String>>,
        ctx: &mut Ctx<'_>,
    ) -> Option<Self> {
        let mut vars = Vec::new();
        let mut ok = true;
        for (name, path) in config {
            match ctx.message_path(&path.value, path.referenced) {
                Some(compiled) => vars.push((name.clone(), compiled)),
                None => ok = false,
            }
        }
        ok.then_some(Self { vars })
    }

    pub(crate) fn apply(&self, message: &mut Message) {
        for (name, path) in &self.vars {
            let value = path.extract(message.root());
            message.set_var(name, value);
        }
    }
}
