//! `transform`: replaces the body with a rendered template.
//!
//! `body:` is a structural template (see [`crate::template`]) and yields JSON; `text:` with a
//! `content_type` yields text with every value escaped for that type. A text template of
//! `application/json` must render valid JSON; one of HL7 v2 (`x-application/hl7-v2+er7`)
//! ends its segments with carriage returns, whatever line breaks the YAML holds.

use crate::compile::Ctx;
use crate::config::TransformConfig;
use crate::message::Message;
use crate::template::{BodyTemplate, Escape, Templates, TextTemplate};

/// A compiled `transform` step.
#[derive(Debug)]
pub enum Transform {
    /// A structural template: the new body is JSON.
    Json(BodyTemplate),
    /// A text template and the content type of what it renders.
    Text {
        /// The template.
        template: TextTemplate,
        /// The content type of the rendered body.
        content_type: String,
        /// How values were escaped, which says what the text must be: JSON for
        /// [`Escape::JsonString`], segments ended by carriage returns for [`Escape::Hl7`].
        escape: Escape,
    },
}

impl Transform {
    pub(crate) fn compile(config: &TransformConfig, ctx: &mut Ctx<'_>) -> Option<Self> {
        match (&config.body, &config.text) {
            (Some(body), None) => {
                if let Some(content_type) = &config.content_type {
                    ctx.error(
                        content_type.referenced,
                        "`content_type` goes with `text`; a `body` template is always JSON",
                    );
                    return None;
                }
                ctx.json_template(&body.value, body.referenced)
                    .map(|template| Self::Json(BodyTemplate::new(template)))
            }
            (None, Some(text)) => {
                let content_type = config
                    .content_type
                    .as_ref()
                    .map_or("text/plain", |c| c.value.as_str());
                let escape = match Escape::for_content_type(content_type) {
                    Ok(escape) => escape,
                    Err(message) => {
                        let at = config
                            .content_type
                            .as_ref()
                            .map_or(text.referenced, |c| c.referenced);
                        ctx.error(at, message);
                        return None;
                    }
                };
                let template = ctx.text_template(&text.value, escape, text.referenced)?;
                Some(Self::Text {
                    template,
                    content_type: content_type.to_owned(),
                    escape,
                })
            }
            (Some(body), Some(_)) => {
                ctx.error(
                    body.referenced,
                    "a transform has either `body` (JSON) or `text`, not both",
                );
                None
            }
            (None, None) => {
                ctx.error(
                    ctx.at,
                    "a transform needs `body` (a JSON template) or `text` (a text template)",
                );
                None
            }
        }
    }

    pub(crate) fn apply(&self, message: &mut Message, templates: &Templates) -> Result<(), String> {
        match self {
            Self::Json(template) => template.render(templates, message)?,
            Self::Text {
                template,
                content_type,
                escape,
            } => {
                let text = templates.render_text(template, message)?;
                match escape {
                    Escape::JsonString => {
                        let body =
                            serde_json::from_str(&text).map_err(|e| invalid_json(&text, &e))?;
                        message.set_body(body);
                    }
                    Escape::Hl7 => {
                        message.set_text_body(crate::hl7::segment_ends(&text), content_type);
                    }
                    _ => message.set_text_body(text, content_type),
                }
            }
        }
        Ok(())
    }
}

/// Says where rendered text stopped being JSON, and shows the text around that place.
fn invalid_json(text: &str, error: &serde_json::Error) -> String {
    let line = text
        .lines()
        .nth(error.line().saturating_sub(1))
        .unwrap_or_default();
    let column = error.column().saturating_sub(1).min(line.len());
    let mut start = column.saturating_sub(40);
    while !line.is_char_boundary(start) {
        start -= 1;
    }
    let mut end = (column + 40).min(line.len());
    while !line.is_char_boundary(end) {
        end += 1;
    }
    let caret = " ".repeat(line[start..column.max(start)].chars().count());
    format!(
        "the text template did not render valid JSON: {error}\n  {}\n  {caret}^",
        &line[start..end]
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::Transform;
    use crate::compile::bench::{Bench, message};

    #[test]
    fn a_body_template_keeps_types_and_reshapes_arrays() {
        let mut bench = Bench::new();
        let step = bench
            .compile(
                r#"
body:
  order: "{{body.ref}}"
  count: "{{count body.tests}}"
  lines:
    $each: "{{body.tests}}"
    code: "{{upper item.code}}"
    line: "{{@position}}"
"#,
                Transform::compile,
            )
            .unwrap();
        let mut message =
            message(json!({"ref": "R-1", "tests": [{"code": "cbc"}, {"code": "lft"}]}));
        step.apply(&mut message, &bench.templates).unwrap();
        assert_eq!(
            message.body(),
            &json!({"order": "R-1", "count": 2, "lines": [
                {"code": "CBC", "line": 1}, {"code": "LFT", "line": 2}
            ]})
        );
        assert_eq!(message.content_type(), None);
    }

    #[test]
    fn a_text_template_escapes_for_its_content_type() {
        let mut bench = Bench::new();
        let step = bench
            .compile(
                "text: \"<ref>{{body.ref}}</ref>\"\ncontent_type: application/xml",
                Transform::compile,
            )
            .unwrap();
        let mut message = message(json!({"ref": "a<b&c"}));
        step.apply(&mut message, &bench.templates).unwrap();
        assert_eq!(message.body(), &json!("<ref>a&lt;b&amp;c</ref>"));
        assert_eq!(message.content_type(), Some("application/xml"));

        let json_text = bench
            .compile(
                "text: '{\"ref\": \"{{body.ref}}\"}'\ncontent_type: application/json",
                Transform::compile,
            )
            .unwrap();
        let mut message = message_with_quote();
        json_text.apply(&mut message, &bench.templates).unwrap();
        assert_eq!(message.body(), &json!({"ref": "say \"hi\""}));
    }

    fn message_with_quote() -> crate::message::Message {
        message(json!({"ref": "say \"hi\""}))
    }

    #[test]
    fn a_transform_has_body_or_text() {
        let mut bench = Bench::new();
        for (yaml, says) in [
            ("{}", "needs `body`"),
            ("body: {a: 1}\ntext: x", "not both"),
            (
                "body: {a: 1}\ncontent_type: text/csv",
                "`content_type` goes with `text`",
            ),
            ("text: x\ncontent_type: image/png", "image/png"),
        ] {
            let error = bench.compile(yaml, Transform::compile).unwrap_err();
            assert!(error.contains(says), "{yaml}: {error}");
        }
    }

    #[test]
    fn invalid_json_is_shown_around_the_place() {
        let text = "{\"a\": 1, \"b\": [1, 2,], \"c\": 3}";
        let error = serde_json::from_str::<serde_json::Value>(text).unwrap_err();
        let shown = super::invalid_json(text, &error);
        assert!(shown.contains("[1, 2,]"), "{shown}");
        assert!(shown.ends_with('^'), "{shown}");
        assert!(
            shown.starts_with("the text template did not render valid JSON: "),
            "{shown}"
        );
    }
}
