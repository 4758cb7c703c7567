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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::Set;
    use crate::compile::bench::{Bench, message};

    #[test]
    fn a_singular_path_stores_its_value_and_any_other_an_array() {
        let mut bench = Bench::new();
        let set = bench
            .compile(
                "ref: $.body.ref\nmissing: $.body.nothing\ncodes: $.body.tests[*].code\nflow: $.meta.flow",
                Set::compile,
            )
            .unwrap();
        let mut message = message(json!({"ref": "R-1", "tests": [{"code": "A"}, {"code": "B"}]}));
        set.apply(&mut message);
        assert_eq!(
            message.root()["vars"],
            json!({"ref": "R-1", "missing": null, "codes": ["A", "B"], "flow": "bench"})
        );
    }

    #[test]
    fn paths_must_read_the_message() {
        let mut bench = Bench::new();
        let error = bench
            .compile("a: $.elsewhere.x\nb: $.body[", Set::compile)
            .unwrap_err();
        assert!(
            error.contains("must start with $.body, $.vars or $.meta"),
            "{error}"
        );
        assert!(error.contains("invalid JSONPath \"$.body[\""), "{error}");
    }
}
