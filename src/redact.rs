//! Fields a flow marks `sensitive`: their values never reach logs, error replies, timelines
//! or the admin API (targets still receive them).

use serde_json::Value;

/// What replaces a sensitive value.
pub const REDACTED: &str = "[redacted]";

/// A flow's sensitive fields, as JSON pointers into the body.
#[derive(Debug, Default, Clone)]
pub struct Sensitive {
    pointers: Vec<String>,
}

impl Sensitive {
    /// The fields at `pointers`.
    pub fn new(pointers: Vec<String>) -> Self {
        Self { pointers }
    }

    /// Whether the flow marks nothing.
    pub fn is_empty(&self) -> bool {
        self.pointers.is_empty()
    }

    /// Replaces each sensitive value in `body` with [`REDACTED`].
    pub fn redact(&self, body: &mut Value) {
        for pointer in &self.pointers {
            if let Some(value) = body.pointer_mut(pointer) {
                *value = Value::String(REDACTED.to_owned());
            }
        }
    }

    /// `text` with every sensitive value of `body` that appears in it replaced (error
    /// messages quote the values they refuse).
    pub fn scrub(&self, body: &Value, text: &str) -> String {
        let mut text = text.to_owned();
        for value in self.pointers.iter().filter_map(|p| body.pointer(p)) {
            let quoted = value.to_string();
            let plain = value.as_str().unwrap_or(&quoted);
            for form in [quoted.as_str(), plain] {
                if !form.is_empty() && form != "\"\"" {
                    text = text.replace(form, REDACTED);
                }
            }
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sensitive_values_are_replaced_wherever_they_appear() {
        let sensitive = Sensitive::new(vec!["/customer/email".into(), "/missing".into()]);
        let mut body = json!({"customer": {"email": "ana@example.test", "name": "Ana"}});
        let message = r#""ana@example.test" is not a "idn-email""#;
        assert_eq!(
            sensitive.scrub(&body, message),
            r#"[redacted] is not a "idn-email""#
        );
        sensitive.redact(&mut body);
        assert_eq!(
            body,
            json!({"customer": {"email": "[redacted]", "name": "Ana"}})
        );
    }
}
