//! Reading request bodies strictly: JSON that parsers would read differently (an object with
//! a key twice) or that is nested deep enough to exhaust a recursive reader is refused, with
//! a JSON pointer to the place. A body declared HL7 v2 is read by [`crate::hl7`].

use std::cell::RefCell;
use std::fmt;

use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::map::Entry;
use serde_json::{Map, Value};

use crate::error::ServeError;

/// The default deepest nesting a body may have.
pub const DEFAULT_MAX_DEPTH: u32 = 64;
/// The deepest nesting a flow may allow (below serde_json's own limit of 128).
pub const MAX_MAX_DEPTH: u32 = 100;

/// Reads a body by its content type: HL7 v2 (ER7) when declared so, else JSON ([`parse`]);
/// an empty body is `null`. What `serve` and `ferry test` read a request with.
///
/// # Errors
///
/// [`ServeError::MalformedHl7`] for a body declared HL7 v2 that is not,
/// [`ServeError::UnsupportedMediaType`] for a body declared neither, and what [`parse`]
/// refuses.
pub fn read_body(content_type: &str, bytes: &[u8], max_depth: u32) -> Result<Value, ServeError> {
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    if crate::hl7::is_hl7(content_type) {
        return crate::hl7::read(bytes).map_err(ServeError::MalformedHl7);
    }
    if !is_json(content_type) {
        return Err(ServeError::UnsupportedMediaType(content_type.to_owned()));
    }
    parse(bytes, max_depth)
}

/// `value` as JSON text: written straight into the string, where `Value::to_string` goes
/// through `fmt` a piece at a time (twice as slow on a message body).
pub fn text(value: &Value) -> String {
    // Serializing a `Value` cannot fail: its object keys are strings.
    serde_json::to_string(value).unwrap_or_default()
}

/// Whether `content_type` declares JSON: `application/json` or `application/*+json`.
pub fn is_json(content_type: &str) -> bool {
    let essence = crate::message::media_type(content_type);
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Parses `bytes` as one JSON document.
///
/// # Errors
///
/// [`ServeError::MalformedJson`] for bytes that are not JSON (with line and column), and
/// [`ServeError::RefusedJson`] for a duplicate key or nesting deeper than `max_depth`.
pub fn parse(bytes: &[u8], max_depth: u32) -> Result<Value, ServeError> {
    let state = State {
        max_depth: max_depth as usize,
        refused: RefCell::new(None),
    };
    // One check of the whole body, rather than one per string as `from_slice` makes.
    let text = std::str::from_utf8(bytes).map_err(|error| not_utf8(bytes, &error))?;
    let mut reader = serde_json::Deserializer::from_str(text);
    let parsed = Node {
        depth: 0,
        state: &state,
    }
    .deserialize(&mut reader)
    .and_then(|value| reader.end().map(|()| value));
    parsed.map_err(|error| match state.refused.into_inner() {
        Some(refused) => ServeError::RefusedJson {
            pointer: refused.pointer(),
            reason: refused.reason,
        },
        None => ServeError::MalformedJson {
            reason: error.to_string(),
            line: error.line(),
            column: error.column(),
        },
    })
}

/// The error for `bytes` that are not UTF-8, at the line and column of the first bad byte
/// (counted in bytes, as the JSON reader counts them).
fn not_utf8(bytes: &[u8], error: &std::str::Utf8Error) -> ServeError {
    let before = &bytes[..error.valid_up_to()];
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |at| at + 1);
    ServeError::MalformedJson {
        reason: format!("{error}"),
        line: before.iter().filter(|&&b| b == b'\n').count() + 1,
        column: before.len() - line_start + 1,
    }
}

struct State {
    max_depth: usize,
    /// Why the body was refused, and where.
    refused: RefCell<Option<Refusal>>,
}

/// Why a body was refused, and where: the segments of the pointer to the place, innermost
/// first, each added by its container as the refusal passes up through it (a body read
/// whole pays for no path).
struct Refusal {
    reason: String,
    segments: Vec<String>,
}

impl Refusal {
    fn pointer(&self) -> String {
        self.segments
            .iter()
            .rev()
            .map(|s| format!("/{}", s.replace('~', "~0").replace('/', "~1")))
            .collect()
    }
}

impl State {
    fn refuse<E: serde::de::Error>(&self, reason: String) -> E {
        let error = E::custom(&reason);
        *self.refused.borrow_mut() = Some(Refusal {
            reason,
            segments: Vec::new(),
        });
        error
    }

    /// Adds `segment` to the pointer of a refusal passing up out of it.
    fn within<E>(&self, segment: impl fmt::Display, error: E) -> E {
        if let Some(refused) = self.refused.borrow_mut().as_mut() {
            refused.segments.push(segment.to_string());
        }
        error
    }
}

/// One value, `depth` containers deep.
struct Node<'a> {
    depth: usize,
    state: &'a State,
}

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl Node<'_> {
    fn enter<E: serde::de::Error>(&self) -> Result<Node<'_>, E> {
        if self.depth >= self.state.max_depth {
            return Err(self.state.refuse(format!(
                "nesting deeper than {} levels",
                self.state.max_depth
            )));
        }
        Ok(Node {
            depth: self.depth + 1,
            state: self.state,
        })
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let inner = self.enter()?;
        let mut items = Vec::new();
        loop {
            match seq.next_element_seed(Node { ..inner }) {
                Ok(Some(item)) => items.push(item),
                Ok(None) => return Ok(Value::Array(items)),
                Err(error) => return Err(self.state.within(items.len(), error)),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let inner = self.enter()?;
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            match object.entry(key) {
                Entry::Occupied(taken) => {
                    let refused = self.state.refuse("duplicate key".into());
                    return Err(self.state.within(taken.key(), refused));
                }
                Entry::Vacant(free) => match map.next_value_seed(Node { ..inner }) {
                    Ok(value) => {
                        free.insert(value);
                    }
                    Err(error) => return Err(self.state.within(free.key(), error)),
                },
            }
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn json_content_types_are_recognised() {
        use super::is_json;
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(is_json("application/fhir+json"));
        assert!(!is_json("text/plain"));
        assert!(!is_json(""));
    }

    use super::*;

    fn refused(text: &str) -> (String, String) {
        match parse(text.as_bytes(), DEFAULT_MAX_DEPTH) {
            Err(ServeError::RefusedJson { reason, pointer }) => (reason, pointer),
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn reads_json_like_serde_json() {
        let text =
            r#"{"a": [1, -2, 3.5, "x\u0000y", null, true, {"b": {}}], "c": 18446744073709551615}"#;
        let expected: Value = serde_json::from_str(text).unwrap();
        assert_eq!(parse(text.as_bytes(), 64).unwrap(), expected);
    }

    #[test]
    fn duplicate_keys_are_refused_where_they_are() {
        let (reason, pointer) = refused(r#"{"a": [{"x/y": 1, "x/y": 2}]}"#);
        assert_eq!(reason, "duplicate key");
        assert_eq!(pointer, "/a/0/x~1y");
    }

    #[test]
    fn deep_nesting_is_refused_before_it_costs_anything() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let (reason, pointer) = refused(&deep);
        assert_eq!(reason, "nesting deeper than 64 levels");
        assert_eq!(pointer.matches('/').count(), 64);
        let fine = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert!(parse(fine.as_bytes(), 64).is_ok());
    }

    #[test]
    fn broken_json_says_where() {
        match parse(b"{\"a\": 1,\n \"b\": }", 64) {
            Err(ServeError::MalformedJson { line, column, .. }) => {
                assert_eq!((line, column), (2, 7))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(b"1e400", 64),
            Err(ServeError::MalformedJson { .. })
        ));
        assert!(matches!(
            parse(b"{} trailing", 64),
            Err(ServeError::MalformedJson { .. })
        ));
    }

    #[test]
    fn bytes_that_are_not_utf8_say_where() {
        match parse(b"{\"a\": \"x\",\n \"b\": \"\xff\"}", 64) {
            Err(ServeError::MalformedJson {
                line,
                column,
                reason,
            }) => {
                assert_eq!((line, column), (2, 8));
                assert!(reason.contains("utf-8"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
}
