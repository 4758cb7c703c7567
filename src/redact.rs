//! What must not leave ferry by an error path.
//!
//! Fields a flow marks `sensitive`: their values never reach logs, error replies, timelines
//! or the admin API (targets still receive them). And error texts: a URL in one loses its
//! userinfo and its query values (where partners' keys and message data sit), and the text
//! is cut to [`MAX_ERROR_LEN`], so no error carries a secret or grows a log line without
//! bound.

use serde_json::Value;

/// The longest error text ferry logs, stores or returns, in bytes; longer ones are cut and
/// say how much was left out.
pub const MAX_ERROR_LEN: usize = 1024;

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

/// `text` as it may leave ferry: every URL in it without userinfo or query values, and at
/// most [`MAX_ERROR_LEN`] bytes.
pub fn error_text(text: &str) -> String {
    truncate(&scrub_urls(text))
}

/// A URL as it may appear in an error: `https://[redacted]@host/path?key=[redacted]`.
pub fn url(url: &reqwest::Url) -> String {
    scrub_urls(url.as_str())
}

/// Cuts `text` to [`MAX_ERROR_LEN`] bytes (on a character boundary), saying how much went.
pub fn truncate(text: &str) -> String {
    if text.len() <= MAX_ERROR_LEN {
        return text.to_owned();
    }
    let mut end = MAX_ERROR_LEN;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} more bytes)", &text[..end], text.len() - end)
}

/// Replaces userinfo and query values of every `scheme://…` in `text`. Works on text, not
/// on parsed URLs, since errors quote URLs that do not parse, inside other words.
fn scrub_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let start = rest[..at]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |i| i + 1);
        out.push_str(&rest[..start]);
        let scheme_end = at + 3;
        let len = rest[scheme_end..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ')' | '>' | '<' | '`'))
            .unwrap_or(rest.len() - scheme_end);
        out.push_str(&rest[start..scheme_end]);
        scrub_url_tail(&rest[scheme_end..scheme_end + len], &mut out);
        rest = &rest[scheme_end + len..];
    }
    out.push_str(rest);
    out
}

/// `user:pass@host/path?a=1#f` → `[redacted]@host/path?a=[redacted]`.
fn scrub_url_tail(tail: &str, out: &mut String) {
    let authority_end = tail.find(['/', '?', '#']).unwrap_or(tail.len());
    let tail = match tail[..authority_end].rfind('@') {
        Some(at) => {
            out.push_str(REDACTED);
            &tail[at..]
        }
        None => tail,
    };
    let Some(query_at) = tail.find('?') else {
        out.push_str(tail.split('#').next().unwrap_or_default());
        return;
    };
    out.push_str(&tail[..=query_at]);
    let query = tail[query_at + 1..].split('#').next().unwrap_or_default();
    for (index, pair) in query.split('&').enumerate() {
        if index > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((key, _)) => {
                out.push_str(key);
                out.push('=');
                out.push_str(REDACTED);
            }
            None => out.push_str(REDACTED),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn urls_in_error_texts_lose_credentials_and_query_values() {
        let text = "error sending request for url (https://u:pw-secret@lab.example:8443/hook?api_key=k-secret&x=1#frag): connection refused";
        assert_eq!(
            error_text(text),
            "error sending request for url (https://[redacted]@lab.example:8443/hook?api_key=[redacted]&x=[redacted]): connection refused"
        );
        assert_eq!(
            error_text("invalid URL \"http://h/p?token\": bad"),
            "invalid URL \"http://h/p?[redacted]\": bad"
        );
        assert_eq!(error_text("no url here: a=b?c"), "no url here: a=b?c");
        assert_eq!(
            error_text("two: amqp://guest:guest@mq/%2f and nats://n:4222"),
            "two: amqp://[redacted]@mq/%2f and nats://n:4222"
        );
    }

    #[test]
    fn long_error_texts_are_cut_on_a_character_boundary() {
        let long = "é".repeat(100_000);
        let cut = error_text(&long);
        assert!(cut.len() < MAX_ERROR_LEN + 40, "{}", cut.len());
        assert!(
            cut.ends_with("… (198976 more bytes)"),
            "{}",
            &cut[cut.len() - 30..]
        );
    }

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
