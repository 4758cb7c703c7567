//! A structural template that becomes the message's new body (a `transform`'s `body:`).
//!
//! The old body is dropped once the new one is rendered, so what the template puts somewhere
//! whole from it (`samples: "{{body.samples}}"`) is moved there instead of copied: the field
//! renders as `null` and, once the whole template has rendered (every other expression read
//! the old body intact), the value is taken out of the old body into its place. A reshape
//! that keeps a partner's arrays as they are then copies none of them.

use std::borrow::Cow;

use serde_json::Value;
use smallvec::SmallVec;

use super::expr::{Expr, Path, Root, Scope};
use super::{JsonTemplate, Templates};
use crate::message::Message;

/// A compiled `transform` body: the template, and what it moves from the old body.
#[derive(Debug)]
pub struct BodyTemplate {
    /// What [`BodyTemplate::render`] renders: moved nodes are `null` here.
    template: JsonTemplate,
    moves: Vec<Move>,
}

/// A node of the template that is a path into the old body, read by no other move.
#[derive(Debug, Clone)]
struct Move {
    /// The node's keys in the new body, from its root (none for the root itself).
    to: Vec<String>,
    /// The path, which renders the node when the value cannot be taken as it is (a name
    /// read from an array's every item builds a new array).
    path: Path,
}

impl BodyTemplate {
    /// Compiles `template` to move what it takes whole from the body. A node moves when it
    /// is exactly one `{{body…}}` path, is the template itself or a field under plain
    /// objects (no `$each`, `$if` or optional key above it), and no other such node reads
    /// the same value or a value inside or around it.
    pub fn new(template: JsonTemplate) -> Self {
        let mut found = Vec::new();
        collect(&template, &mut Vec::new(), &mut found);
        let overlapping = |a: &Move| {
            found
                .iter()
                .filter(|b| overlap(&a.path.segments, &b.path.segments))
                .count()
                > 1
        };
        let moves: Vec<Move> = found.iter().filter(|m| !overlapping(m)).cloned().collect();
        let mut template = template;
        for moved in &moves {
            if let Some(field) = field_mut(&mut template, &moved.to) {
                *field = JsonTemplate::Literal(Value::Null);
            }
        }
        Self { template, moves }
    }

    /// Renders the new body from `message` and makes it the body.
    ///
    /// # Errors
    ///
    /// The first node that cannot render, named by its JSON pointer.
    pub fn render(&self, templates: &Templates, message: &mut Message) -> Result<(), String> {
        let mut body = templates.render_json(&self.template, message)?;
        // Values a path reads from every item are built, as rendering would; the rest are
        // taken as they are, after, so no path walks through a value another took.
        let scope = Scope {
            root: message.root(),
            items: &[],
        };
        let mut taken: SmallVec<[&Move; 8]> = SmallVec::new();
        for moved in &self.moves {
            match moved.path.find(scope) {
                Some(Cow::Borrowed(_)) => taken.push(moved),
                Some(Cow::Owned(value)) => put(&mut body, &moved.to, value),
                None => {}
            }
        }
        message.update_body(|old| {
            for moved in taken {
                if let Some(value) = walk_mut(old, &moved.path.segments) {
                    put(&mut body, &moved.to, value.take());
                }
            }
        });
        message.set_body(body);
        Ok(())
    }
}

/// The nodes of `template`, itself or fields under plain objects, that are one `{{body…}}`
/// path; `to` holds the keys down to `template`.
fn collect(template: &JsonTemplate, to: &mut Vec<String>, found: &mut Vec<Move>) {
    match template {
        JsonTemplate::Expr(Expr::Path(path), _) if path.root == Root::Message("body") => {
            found.push(Move {
                to: to.clone(),
                path: path.clone(),
            });
        }
        JsonTemplate::Object(fields) => {
            for field in fields.iter().filter(|field| !field.optional) {
                to.push(field.key.clone());
                collect(&field.value, to, found);
                to.pop();
            }
        }
        _ => {}
    }
}

/// Whether one path reads a value inside (or the same as) the other's. Digits name an
/// array's item whatever zeros lead them, so `01` and `1` are the same step.
fn overlap(a: &[String], b: &[String]) -> bool {
    a.iter().zip(b).all(|(a, b)| {
        a == b || matches!((a.parse::<usize>(), b.parse::<usize>()), (Ok(a), Ok(b)) if a == b)
    })
}

/// The template of the node at `keys`.
fn field_mut<'t>(template: &'t mut JsonTemplate, keys: &[String]) -> Option<&'t mut JsonTemplate> {
    let Some((key, rest)) = keys.split_first() else {
        return Some(template);
    };
    let JsonTemplate::Object(fields) = template else {
        return None;
    };
    let field = fields.iter_mut().find(|field| &field.key == key)?;
    field_mut(&mut field.value, rest)
}

/// The value at `segments` in `value`, by object keys and array indices only: where
/// [`Path::find`] finds a value by reference, this finds the same one.
fn walk_mut<'v>(mut value: &'v mut Value, segments: &[String]) -> Option<&'v mut Value> {
    for segment in segments {
        value = match value {
            Value::Object(map) => map.get_mut(segment)?,
            Value::Array(items) => items.get_mut(segment.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(value)
}

/// Puts `value` at the keys `to` of the rendered body, where a moved node rendered `null`.
fn put(body: &mut Value, to: &[String], value: Value) {
    if let Some(slot) = walk_mut(body, to) {
        *slot = value;
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::BodyTemplate;
    use crate::compile::bench::message;
    use crate::template::Templates;

    /// The body `tree` renders from `body`, moved and copied, and the moves' targets.
    fn render(tree: &Value, body: &Value) -> (Value, Value, Vec<String>) {
        let mut templates = Templates::new();
        let template = templates.compile_json(tree).unwrap();
        let copied = templates
            .render_json(&template, &message(body.clone()))
            .unwrap();
        let compiled = BodyTemplate::new(template);
        let moved_to = compiled.moves.iter().map(|m| m.to.join(".")).collect();
        let mut moved = message(body.clone());
        compiled.render(&templates, &mut moved).unwrap();
        (moved.body().clone(), copied, moved_to)
    }

    #[test]
    fn what_a_template_takes_whole_is_moved_and_renders_as_a_copy_would() {
        let body = json!({
            "ref": "R-1",
            "customer": {"id": "C-7", "name": "Ana"},
            "samples": [{"id": "S-1", "tube": "EDTA"}, {"id": "S-2", "tube": "SST"}],
            "tests": [{"code": "CBC"}, {"code": "LFT"}],
            "notes": null
        });
        let tree = json!({
            "ref": "{{body.ref}}",
            "client": {"account": "{{body.customer.id}}", "name": "{{body.customer.name}}"},
            "samples": "{{body.samples}}",
            "first_test": "{{body.tests.0}}",
            "second_test": "{{body.tests.[01]}}",
            "codes": "{{body.tests.code}}",
            "count": "{{count body.samples}}",
            "notes": "{{body.notes}}",
            "missing": "{{body.nothing.here}}",
            "label": "order {{body.ref}}"
        });
        let (moved, copied, moved_to) = render(&tree, &body);
        assert_eq!(moved, copied);
        // `codes` reads every test, around the two taken whole: it is built before they go.
        assert_eq!(
            moved_to,
            [
                "client.account",
                "client.name",
                "codes",
                "first_test",
                "missing",
                "notes",
                "ref",
                "samples",
                "second_test"
            ]
        );
    }

    #[test]
    fn a_value_read_twice_or_around_another_is_copied() {
        let body = json!({"customer": {"id": "C-7", "tags": ["a", "b"]}, "ref": "R-1"});
        let tree = json!({
            "a": "{{body.ref}}",
            "b": "{{body.ref}}",
            "customer": "{{body.customer}}",
            "id": "{{body.customer.id}}",
            "tag": "{{body.customer.tags.[01]}}",
            "also_tag": "{{body.customer.tags.1}}",
            "kept?": "{{body.customer.id}}",
            "listed": ["{{body.ref}}"],
            "whole": {"$if": "{{body.ref}}", "$then": "{{body}}"}
        });
        let (moved, copied, moved_to) = render(&tree, &body);
        assert_eq!(moved, copied);
        assert!(moved_to.is_empty(), "{moved_to:?}");
    }

    #[test]
    fn a_template_that_is_one_path_moves_that_value() {
        let body = json!({"envelope": {"id": 7}, "payload": {"tests": [{"code": "CBC"}]}});
        let (moved, copied, moved_to) = render(&json!("{{body.payload}}"), &body);
        assert_eq!(moved, json!({"tests": [{"code": "CBC"}]}));
        assert_eq!(moved, copied);
        assert_eq!(moved_to, [""]);
    }

    #[test]
    fn the_whole_body_moves_when_nothing_else_is_taken() {
        let body = json!({"a": [1, 2], "b": {"c": true}});
        let tree = json!({"original": "{{body}}", "count": "{{count body.a}}"});
        let (moved, copied, moved_to) = render(&tree, &body);
        assert_eq!(moved, json!({"original": body, "count": 2}));
        assert_eq!(moved, copied);
        assert_eq!(moved_to, ["original"]);
    }
}
