//! JSONPath expressions (RFC 9535), parsed once when a flow loads.
//!
//! Singular paths (only names and indices, such as `$.body.customer.name` or
//! `$.body.tests[0]`) are walked directly, which is the common case and the fast one; other
//! paths (wildcards, filters, slices, descendants) go through `jsonpath-rust`.

use jsonpath_rust::parser::model::{JpQuery, Segment, Selector};
use jsonpath_rust::parser::parse_json_path;
use jsonpath_rust::query::js_path_process;
use serde_json::Value;

/// A compiled JSONPath.
#[derive(Debug, Clone)]
pub struct JsonPath {
    source: String,
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    Singular(Vec<Step>),
    General(JpQuery),
}

#[derive(Debug, Clone)]
enum Step {
    Name(String),
    Index(i64),
}

impl JsonPath {
    /// Parses `source`.
    ///
    /// # Errors
    ///
    /// The parser's explanation when `source` is not a valid JSONPath.
    pub fn parse(source: &str) -> Result<Self, String> {
        let query = parse_json_path(source).map_err(|e| one_line(&e.to_string()))?;
        let singular: Option<Vec<Step>> = query
            .segments
            .iter()
            .map(|segment| match segment {
                Segment::Selector(Selector::Name(name)) => Some(Step::Name(name.clone())),
                Segment::Selector(Selector::Index(index)) => Some(Step::Index(*index)),
                _ => None,
            })
            .collect();
        let kind = match singular {
            Some(steps) => Kind::Singular(steps),
            None => Kind::General(query),
        };
        Ok(Self {
            source: source.to_owned(),
            kind,
        })
    }

    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the path selects at most one value.
    pub fn is_singular(&self) -> bool {
        matches!(self.kind, Kind::Singular(_))
    }

    /// For a singular path, the names and indices it walks (`$.body.tests[0]` → `body`,
    /// `tests`, `0`).
    pub fn segments(&self) -> Option<Vec<String>> {
        match &self.kind {
            Kind::Singular(steps) => Some(
                steps
                    .iter()
                    .map(|s| match s {
                        Step::Name(name) => name.clone(),
                        Step::Index(index) => index.to_string(),
                    })
                    .collect(),
            ),
            Kind::General(_) => None,
        }
    }

    /// The first name the path reads under the root (`body` in `$.body.x`), if any.
    pub fn root_name(&self) -> Option<&str> {
        match &self.kind {
            Kind::Singular(steps) => match steps.first() {
                Some(Step::Name(name)) => Some(name),
                _ => None,
            },
            Kind::General(query) => match query.segments.first() {
                Some(Segment::Selector(Selector::Name(name))) => Some(name),
                _ => None,
            },
        }
    }

    /// Every value the path selects in `value`, in document order.
    pub fn select<'a>(&self, value: &'a Value) -> Vec<&'a Value> {
        match &self.kind {
            Kind::Singular(steps) => walk(value, steps).into_iter().collect(),
            Kind::General(query) => js_path_process(query, value)
                .map(|found| found.into_iter().map(|r| r.val).collect())
                .unwrap_or_default(),
        }
    }

    /// The value a `set` step stores: for a singular path the value or `null`; for any other
    /// path the array of everything it selects.
    pub fn extract(&self, value: &Value) -> Value {
        match &self.kind {
            Kind::Singular(steps) => walk(value, steps).cloned().unwrap_or(Value::Null),
            Kind::General(_) => Value::Array(self.select(value).into_iter().cloned().collect()),
        }
    }
}

/// The parser explains errors over several lines with a drawing; keep what and where.
fn one_line(error: &str) -> String {
    let what = error
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("= "))
        .map(str::to_owned);
    let column = error
        .split("--> ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|position| position.split(':').nth(1));
    match (what, column) {
        (Some(what), Some(column)) => format!("{what} at character {column}"),
        (Some(what), None) => what,
        _ => error.split_whitespace().collect::<Vec<_>>().join(" "),
    }
}

fn walk<'a>(mut value: &'a Value, steps: &[Step]) -> Option<&'a Value> {
    for step in steps {
        value = match (step, value) {
            (Step::Name(name), Value::Object(map)) => map.get(name)?,
            (Step::Index(index), Value::Array(items)) => {
                let at = if *index < 0 {
                    items.len().checked_sub(index.unsigned_abs() as usize)?
                } else {
                    *index as usize
                };
                items.get(at)?
            }
            _ => return None,
        };
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc() -> Value {
        json!({"body": {"tests": [{"code": "PH"}, {"code": "PB"}], "name": "x"}})
    }

    #[test]
    fn singular_paths_walk_names_and_indices() {
        let path = JsonPath::parse("$.body.tests[-1].code").unwrap();
        assert!(path.is_singular());
        assert_eq!(path.extract(&doc()), json!("PB"));
        assert_eq!(
            JsonPath::parse("$.body.nope").unwrap().extract(&doc()),
            Value::Null
        );
        assert_eq!(
            JsonPath::parse("$['body']['name']")
                .unwrap()
                .extract(&doc()),
            json!("x")
        );
    }

    #[test]
    fn general_paths_return_every_match() {
        let path = JsonPath::parse("$.body.tests[*].code").unwrap();
        assert!(!path.is_singular());
        assert_eq!(path.extract(&doc()), json!(["PH", "PB"]));
        let filter = JsonPath::parse("$.body.tests[?@.code == 'PB']").unwrap();
        assert_eq!(filter.select(&doc()), vec![&json!({"code": "PB"})]);
        assert_eq!(filter.root_name(), Some("body"));
    }

    #[test]
    fn invalid_paths_are_refused() {
        assert!(JsonPath::parse("body.x").is_err());
        assert_eq!(
            JsonPath::parse("$.body[").unwrap_err(),
            "expected selector at character 8"
        );
    }
}
