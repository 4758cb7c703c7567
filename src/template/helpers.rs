//! The helpers templates call: text, numbers, conversions, comparisons, lookup tables,
//! arrays and date-times. One table ([`HELPERS`]) lists them with their arguments; the
//! README's list is checked against it. Each takes and returns JSON values, so a lone
//! `{{sum body.samples.volume_ml}}` keeps its type, and the same helpers serve Handlebars
//! text templates ([`register`]).
//!
//! Missing input is absence, not an error: a conversion or text helper given a missing
//! field answers `null`, a comparison answers `false`, and `coalesce` or a table's default
//! fills it in. Errors are kept for data that cannot be what the flow says it is, such as
//! a text that `datetime` cannot read.

use std::borrow::Cow;

use serde_json::{Number, Value};

use super::expr::{Env, Expr, ExprError, Found, Names, text_of};

/// A helper: its name, how many arguments it takes, and what it does.
pub struct Helper {
    /// The name templates call it by.
    pub name: &'static str,
    /// Its arguments, as the README shows them.
    pub signature: &'static str,
    /// What it answers.
    pub doc: &'static str,
    min: usize,
    max: Option<usize>,
    run: fn(&[Found<'_>], &Env) -> Result<Value, String>,
    /// Checks on arguments written as literals, made when the flow loads.
    check: Option<Check>,
}

/// A check of a call's arguments when the flow loads.
type Check = fn(&[Expr], Names<'_>) -> Result<(), ExprError>;

impl std::fmt::Debug for Helper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl Helper {
    /// Checks a call's arguments when the flow loads: their number, and what literal
    /// arguments name (a table, a date format, a time zone).
    ///
    /// # Errors
    ///
    /// What is wrong, with the helper's signature as the hint.
    pub fn check(&self, args: &[Expr], names: Names<'_>) -> Result<(), ExprError> {
        let count = args.len();
        let fits = count >= self.min && self.max.is_none_or(|max| count <= max);
        if !fits {
            let wanted = match self.max {
                Some(max) if max == self.min => format!("{max}"),
                Some(max) => format!("{} to {max}", self.min),
                None => format!("at least {}", self.min),
            };
            return Err(ExprError {
                message: format!("`{}` takes {wanted} argument(s), not {count}", self.name),
                hint: Some(format!("write `{{{{{} {}}}}}`", self.name, self.signature)),
            });
        }
        match self.check {
            Some(check) => check(args, names),
            None => Ok(()),
        }
    }

    /// Applies the helper to evaluated arguments.
    ///
    /// # Errors
    ///
    /// The helper's refusal, naming it.
    pub fn call(&self, args: &[Found<'_>], env: &Env) -> Result<Value, String> {
        (self.run)(args, env).map_err(|reason| format!("`{}`: {reason}", self.name))
    }
}

/// The helper named `name`.
pub fn find(name: &str) -> Option<&'static Helper> {
    HELPERS.iter().find(|h| h.name == name)
}

/// Every helper's name.
pub fn names() -> impl Iterator<Item = &'static str> {
    HELPERS.iter().map(|h| h.name)
}

/// The namespace of `uuid`'s UUIDs: any fixed value would do; this one is ferry's own.
const UUID_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x3c1d_5f7a_9e2b_4d60_8a13_c7f4_e5b2_9d01);

macro_rules! helper {
    ($name:literal, $signature:literal, $doc:literal, $min:expr, $max:expr, $run:expr) => {
        helper!($name, $signature, $doc, $min, $max, $run, None)
    };
    ($name:literal, $signature:literal, $doc:literal, $min:expr, $max:expr, $run:expr, $check:expr) => {
        Helper {
            name: $name,
            signature: $signature,
            doc: $doc,
            min: $min,
            max: $max,
            run: $run,
            check: $check,
        }
    };
}

/// Every helper, in the order the README lists them.
pub static HELPERS: &[Helper] = &[
    // Text.
    helper!(
        "upper",
        "TEXT",
        "the text in upper case",
        1,
        Some(1),
        |a, _| text_map(a, str::to_uppercase)
    ),
    helper!(
        "lower",
        "TEXT",
        "the text in lower case",
        1,
        Some(1),
        |a, _| text_map(a, str::to_lowercase)
    ),
    helper!(
        "trim",
        "TEXT",
        "the text without leading and trailing white space",
        1,
        Some(1),
        |a, _| text_map(a, |t| t.trim().to_owned())
    ),
    helper!(
        "concat",
        "VALUE…",
        "the values' texts one after another (missing ones are empty)",
        1,
        None,
        |a, _| {
            Ok(Value::String(
                a.iter().map(|v| text_of(v.as_deref())).collect(),
            ))
        }
    ),
    helper!(
        "uuid",
        "VALUE…",
        "a UUID named by the values (version 5): the same values always give the same UUID, so every attempt of a message names the same things (FHIR `urn:uuid:` references, say)",
        1,
        None,
        |a, _| {
            // The unit separator keeps ("ab", "c") and ("a", "bc") apart.
            let name: Vec<_> = a.iter().map(|v| text_of(v.as_deref())).collect();
            let id = uuid::Uuid::new_v5(&UUID_NAMESPACE, name.join("\u{1f}").as_bytes());
            Ok(Value::String(id.to_string()))
        }
    ),
    helper!(
        "replace",
        "TEXT FROM TO",
        "the text with every FROM replaced by TO",
        3,
        Some(3),
        |a, _| {
            let (from, to) = (text_of(arg(a, 1)), text_of(arg(a, 2)));
            text_map(a, |t| t.replace(from.as_ref(), &to))
        }
    ),
    helper!(
        "substring",
        "TEXT START [LENGTH]",
        "LENGTH characters (default: all) from character START (from 0)",
        2,
        Some(3),
        |a, _| {
            let start = index(arg(a, 1))?;
            let length = arg(a, 2).map(|v| index(Some(v))).transpose()?;
            text_map(a, |t| {
                let rest = t.chars().skip(start);
                match length {
                    Some(length) => rest.take(length).collect(),
                    None => rest.collect(),
                }
            })
        }
    ),
    helper!(
        "split",
        "TEXT SEPARATOR",
        "the parts of the text between separators, as an array",
        2,
        Some(2),
        |a, _| {
            let Some(text) = present(arg(a, 0)) else {
                return Ok(Value::Null);
            };
            let separator = text_of(arg(a, 1));
            let text = text_of(Some(text));
            Ok(Value::Array(
                text.split(separator.as_ref())
                    .map(|p| Value::String(p.to_owned()))
                    .collect(),
            ))
        }
    ),
    helper!(
        "join",
        "ARRAY SEPARATOR",
        "the texts of the items, separated",
        2,
        Some(2),
        |a, _| {
            let separator = text_of(arg(a, 1));
            Ok(Value::String(
                items(arg(a, 0))
                    .iter()
                    .map(|v| text_of(Some(v)))
                    .collect::<Vec<_>>()
                    .join(&separator),
            ))
        }
    ),
    helper!(
        "length",
        "VALUE",
        "characters of a text, items of an array, keys of an object (0 when missing)",
        1,
        Some(1),
        |a, _| {
            Ok(Value::from(match arg(a, 0) {
                Some(Value::String(t)) => t.chars().count(),
                Some(Value::Array(items)) => items.len(),
                Some(Value::Object(map)) => map.len(),
                None | Some(Value::Null) => 0,
                Some(_) => 1,
            }))
        }
    ),
    // Numbers and conversions.
    helper!(
        "number",
        "VALUE",
        "a number, or a text that is one (\" 7.20\" → 7.2); else null",
        1,
        Some(1),
        |a, _| Ok(number(arg(a, 0)).map_or(Value::Null, Value::Number))
    ),
    helper!(
        "string",
        "VALUE",
        "the value as text (null and missing as empty)",
        1,
        Some(1),
        |a, _| Ok(Value::String(text_of(arg(a, 0)).into_owned()))
    ),
    helper!(
        "boolean",
        "VALUE",
        "whether the value is truthy: not missing, null, false, 0, \"\" or empty",
        1,
        Some(1),
        |a, _| Ok(Value::Bool(truthy(arg(a, 0))))
    ),
    helper!(
        "json",
        "VALUE",
        "the value written as JSON text",
        1,
        Some(1),
        |a, _| Ok(Value::String(
            arg(a, 0).map_or_else(|| "null".to_owned(), Value::to_string)
        ))
    ),
    helper!(
        "add",
        "A B",
        "A + B (null unless both are numbers)",
        2,
        Some(2),
        |a, _| arithmetic(a, |x, y| Some(x + y))
    ),
    helper!("subtract", "A B", "A − B", 2, Some(2), |a, _| arithmetic(
        a,
        |x, y| Some(x - y)
    )),
    helper!("multiply", "A B", "A × B", 2, Some(2), |a, _| arithmetic(
        a,
        |x, y| Some(x * y)
    )),
    helper!(
        "divide",
        "A B",
        "A ÷ B (null when B is 0)",
        2,
        Some(2),
        |a, _| arithmetic(a, |x, y| (y != 0.0).then(|| x / y))
    ),
    helper!(
        "round",
        "NUMBER [DIGITS]",
        "the number rounded to DIGITS decimals (default 0)",
        1,
        Some(2),
        |a, _| {
            let Some(x) = number(arg(a, 0)).and_then(|n| n.as_f64()) else {
                return Ok(Value::Null);
            };
            let digits = arg(a, 1)
                .map(|v| index(Some(v)))
                .transpose()?
                .unwrap_or(0)
                .min(15);
            let scale = 10f64.powi(i32::try_from(digits).unwrap_or(0));
            Ok(to_number((x * scale).round() / scale))
        }
    ),
    // Comparisons and logic.
    helper!(
        "eq",
        "A B",
        "whether A equals B (numbers by value: 5 equals 5.0); false when either is missing",
        2,
        Some(2),
        |a, _| Ok(Value::Bool(both(a).is_some_and(|(x, y)| same(x, y))))
    ),
    helper!(
        "ne",
        "A B",
        "whether A differs from B",
        2,
        Some(2),
        |a, _| Ok(Value::Bool(!both(a).is_some_and(|(x, y)| same(x, y))))
    ),
    helper!(
        "gt",
        "A B",
        "A > B (numbers, or texts in order); false when either is missing",
        2,
        Some(2),
        |a, _| Ok(Value::Bool(order(a).is_some_and(std::cmp::Ordering::is_gt)))
    ),
    helper!("gte", "A B", "A ≥ B", 2, Some(2), |a, _| Ok(Value::Bool(
        order(a).is_some_and(std::cmp::Ordering::is_ge)
    ))),
    helper!("lt", "A B", "A < B", 2, Some(2), |a, _| Ok(Value::Bool(
        order(a).is_some_and(std::cmp::Ordering::is_lt)
    ))),
    helper!("lte", "A B", "A ≤ B", 2, Some(2), |a, _| Ok(Value::Bool(
        order(a).is_some_and(std::cmp::Ordering::is_le)
    ))),
    helper!(
        "in",
        "VALUE CHOICE…",
        "whether the value equals one of the choices",
        2,
        None,
        |a, _| {
            let Some(value) = arg(a, 0) else {
                return Ok(Value::Bool(false));
            };
            Ok(Value::Bool(
                a[1..]
                    .iter()
                    .any(|c| c.as_deref().is_some_and(|c| same(value, c))),
            ))
        }
    ),
    helper!(
        "and",
        "A B…",
        "whether every value is truthy",
        2,
        None,
        |a, _| Ok(Value::Bool(a.iter().all(|v| truthy(v.as_deref()))))
    ),
    helper!(
        "or",
        "A B…",
        "whether any value is truthy",
        2,
        None,
        |a, _| Ok(Value::Bool(a.iter().any(|v| truthy(v.as_deref()))))
    ),
    helper!(
        "not",
        "VALUE",
        "whether the value is not truthy",
        1,
        Some(1),
        |a, _| Ok(Value::Bool(!truthy(arg(a, 0))))
    ),
    helper!(
        "exists",
        "VALUE",
        "whether the value is there and not null",
        1,
        Some(1),
        |a, _| Ok(Value::Bool(present(arg(a, 0)).is_some()))
    ),
    helper!(
        "if",
        "CONDITION THEN [ELSE]",
        "THEN when the condition is truthy, else ELSE (default null)",
        2,
        Some(3),
        |a, _| {
            let chosen = if truthy(arg(a, 0)) {
                arg(a, 1)
            } else {
                arg(a, 2)
            };
            Ok(chosen.cloned().unwrap_or(Value::Null))
        }
    ),
    helper!(
        "coalesce",
        "VALUE…",
        "the first value that is there and not null",
        1,
        None,
        |a, _| {
            Ok(a.iter()
                .find_map(|v| present(v.as_deref()))
                .cloned()
                .unwrap_or(Value::Null))
        }
    ),
    // Tables.
    helper!(
        "table",
        "\"NAME\" KEY [DEFAULT]",
        "the entry for KEY in the flow's table NAME, else DEFAULT (else null)",
        2,
        Some(3),
        |a, env| {
            let name = text_of(arg(a, 0));
            let table = env
                .tables
                .iter()
                .find(|t| t.name == name)
                .ok_or_else(|| format!("no table \"{name}\""))?;
            let found = arg(a, 1).and_then(|key| table.entries.get(text_of(Some(key)).as_ref()));
            Ok(found.or(arg(a, 2)).cloned().unwrap_or(Value::Null))
        },
        Some(check_table)
    ),
    // Arrays.
    helper!(
        "count",
        "ARRAY",
        "how many items (0 when missing)",
        1,
        Some(1),
        |a, _| Ok(Value::from(items(arg(a, 0)).len()))
    ),
    helper!(
        "sum",
        "ARRAY",
        "the sum of the items that are numbers",
        1,
        Some(1),
        |a, _| {
            Ok(to_number(
                items(arg(a, 0)).iter().filter_map(|v| v.as_f64()).sum(),
            ))
        }
    ),
    helper!(
        "min",
        "ARRAY",
        "the least of the items that are numbers (null when none is)",
        1,
        Some(1),
        |a, _| {
            Ok(items(arg(a, 0))
                .iter()
                .filter_map(Value::as_f64)
                .reduce(f64::min)
                .map_or(Value::Null, to_number))
        }
    ),
    helper!(
        "max",
        "ARRAY",
        "the greatest of the items that are numbers",
        1,
        Some(1),
        |a, _| {
            Ok(items(arg(a, 0))
                .iter()
                .filter_map(Value::as_f64)
                .reduce(f64::max)
                .map_or(Value::Null, to_number))
        }
    ),
    helper!(
        "where",
        "ARRAY FIELD VALUE",
        "the items whose FIELD (a name, or a dotted path) equals VALUE",
        3,
        Some(3),
        |a, _| {
            let field = text_of(arg(a, 1));
            let path: Vec<&str> = field.split('.').collect();
            let Some(wanted) = arg(a, 2) else {
                return Ok(Value::Array(Vec::new()));
            };
            Ok(Value::Array(
                items(arg(a, 0))
                    .iter()
                    .filter(|item| {
                        path.iter()
                            .try_fold(*item, |v, k| v.get(k))
                            .is_some_and(|v| same(v, wanted))
                    })
                    .cloned()
                    .collect(),
            ))
        }
    ),
    helper!(
        "includes",
        "ARRAY VALUE",
        "whether an item equals the value",
        2,
        Some(2),
        |a, _| {
            let Some(wanted) = arg(a, 1) else {
                return Ok(Value::Bool(false));
            };
            Ok(Value::Bool(
                items(arg(a, 0)).iter().any(|v| same(v, wanted)),
            ))
        }
    ),
    helper!(
        "first",
        "ARRAY",
        "the first item (null when empty)",
        1,
        Some(1),
        |a, _| Ok(items(arg(a, 0)).first().cloned().unwrap_or(Value::Null))
    ),
    helper!("last", "ARRAY", "the last item", 1, Some(1), |a, _| Ok(
        items(arg(a, 0)).last().cloned().unwrap_or(Value::Null)
    )),
    helper!(
        "distinct",
        "ARRAY",
        "the items without repeats, in first-seen order",
        1,
        Some(1),
        |a, _| {
            let all = items(arg(a, 0));
            let mut seen: Vec<&Value> = Vec::new();
            for item in all.iter() {
                if !seen.iter().any(|s| same(s, item)) {
                    seen.push(item);
                }
            }
            Ok(Value::Array(seen.into_iter().cloned().collect()))
        }
    ),
    // Date-times.
    helper!(
        "datetime",
        "TEXT FORMAT [ZONE]",
        "a date-time (RFC 3339 or ISO 8601, with an offset, `Z` or none, or an HL7 timestamp such as \"20261122160405+0100\") in ZONE (an IANA name such as \"Europe/Berlin\", or \"UTC\"; default: its own offset), formatted with strftime's FORMAT (\"%Y%m%d%H%M%S\", \"%Y-%m-%d\")",
        2,
        Some(3),
        |a, _| {
            let Some(text) = present(arg(a, 0)) else {
                return Ok(Value::Null);
            };
            let format = text_of(arg(a, 1));
            let zone = arg(a, 2).map(|z| text_of(Some(z)));
            datetime(&text_of(Some(text)), &format, zone.as_deref()).map(Value::String)
        },
        Some(check_datetime)
    ),
    // HL7 v2.
    helper!(
        "hl7",
        "MESSAGE PLACE",
        "the value at PLACE of an HL7 v2 message read into JSON, written as integrators do (\"PID-5.1\", \"OBX[2]-5\", \"PID-3(2).1\"), or of one segment (\"3.1\"); null when absent",
        2,
        Some(2),
        |a, _| {
            let Some(place) = present(arg(a, 1)) else {
                return Ok(Value::Null);
            };
            let place = crate::hl7::Place::parse(&text_of(Some(place)))?;
            Ok(arg(a, 0)
                .and_then(|message| place.find(message))
                .cloned()
                .unwrap_or(Value::Null))
        },
        Some(check_hl7_place)
    ),
];

fn arg<'a>(args: &'a [Found<'_>], index: usize) -> Option<&'a Value> {
    args.get(index).and_then(|v| v.as_deref())
}

/// The value, unless missing or `null`.
fn present(value: Option<&Value>) -> Option<&Value> {
    value.filter(|v| !v.is_null())
}

/// Applies `map` to the first argument's text; `null` when it is missing or null.
fn text_map(args: &[Found<'_>], map: impl Fn(&str) -> String) -> Result<Value, String> {
    Ok(match present(arg(args, 0)) {
        Some(value) => Value::String(map(&text_of(Some(value)))),
        None => Value::Null,
    })
}

/// A count or position argument.
fn index(value: Option<&Value>) -> Result<usize, String> {
    value
        .and_then(Value::as_u64)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| format!("{} is not a whole number", text_of(value)))
}

/// The items of an array; a missing or null value has none, any other value is one item.
fn items(value: Option<&Value>) -> Cow<'_, [Value]> {
    match value {
        Some(Value::Array(items)) => Cow::Borrowed(items.as_slice()),
        None | Some(Value::Null) => Cow::Borrowed(&[]),
        Some(other) => Cow::Owned(vec![other.clone()]),
    }
}

fn number(value: Option<&Value>) -> Option<Number> {
    match value? {
        Value::Number(n) => Some(n.clone()),
        Value::String(text) => {
            let parsed: f64 = text.trim().parse().ok()?;
            parsed
                .is_finite()
                .then(|| to_number(parsed))
                .and_then(|v| match v {
                    Value::Number(n) => Some(n),
                    _ => None,
                })
        }
        _ => None,
    }
}

/// A float as JSON: whole numbers as integers (2.0 → 2), so results compare as people
/// expect.
fn to_number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        Value::from(x as i64)
    } else {
        Number::from_f64(x).map_or(Value::Null, Value::Number)
    }
}

fn arithmetic(args: &[Found<'_>], op: impl Fn(f64, f64) -> Option<f64>) -> Result<Value, String> {
    let (Some(x), Some(y)) = (
        number(arg(args, 0)).and_then(|n| n.as_f64()),
        number(arg(args, 1)).and_then(|n| n.as_f64()),
    ) else {
        return Ok(Value::Null);
    };
    Ok(op(x, y).map_or(Value::Null, to_number))
}

/// Whether a value counts as true: not missing, null, false, 0, "" or empty.
pub fn truthy(value: Option<&Value>) -> bool {
    match value {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
    }
}

fn both<'a>(args: &'a [Found<'_>]) -> Option<(&'a Value, &'a Value)> {
    Some((arg(args, 0)?, arg(args, 1)?))
}

/// Equality with numbers compared by value (`5` equals `5.0`), inside arrays and objects too.
pub fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x == y || x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

fn order(args: &[Found<'_>]) -> Option<std::cmp::Ordering> {
    let (a, b) = both(args)?;
    match (a, b) {
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => number(Some(a))?
            .as_f64()?
            .partial_cmp(&number(Some(b))?.as_f64()?),
    }
}

fn check_table(args: &[Expr], names: Names<'_>) -> Result<(), ExprError> {
    let Some(Expr::Literal(Value::String(name))) = args.first() else {
        return Err(ExprError {
            message: "`table` takes the table's name as a text: `{{table \"priority\" …}}`".into(),
            hint: None,
        });
    };
    if names.tables.contains(name) {
        return Ok(());
    }
    Err(ExprError {
        message: format!("no table \"{name}\" in this flow"),
        hint: Some(
            match crate::diagnostic::closest(name, names.tables.iter().map(String::as_str)) {
                Some(best) => format!("did you mean \"{best}\"?"),
                None if names.tables.is_empty() => {
                    "declare it under `tables:` at the top of the flow".into()
                }
                None => format!("the flow's tables: {}", names.tables.join(", ")),
            },
        ),
    })
}

fn check_datetime(args: &[Expr], _: Names<'_>) -> Result<(), ExprError> {
    let error = |message: String| ExprError {
        message,
        hint: Some("write e.g. `{{datetime body.at \"%Y-%m-%dT%H:%M:%SZ\" \"UTC\"}}`".into()),
    };
    if let Some(Expr::Literal(Value::String(zone))) = args.get(2) {
        jiff::tz::TimeZone::get(zone)
            .map_err(|_| error(format!("\"{zone}\" is not a time zone ferry knows")))?;
    }
    if let Some(Expr::Literal(Value::String(format))) = args.get(1) {
        datetime("2026-01-02T03:04:05Z", format, None)
            .map_err(|e| error(format!("the format \"{format}\" does not work: {e}")))?;
    }
    Ok(())
}

fn check_hl7_place(args: &[Expr], _: Names<'_>) -> Result<(), ExprError> {
    if let Some(Expr::Literal(Value::String(place))) = args.get(1) {
        crate::hl7::Place::parse(place).map_err(|message| ExprError {
            message,
            hint: Some("write e.g. `{{hl7 body \"PID-5.1\"}}`".into()),
        })?;
    }
    Ok(())
}

/// Reads `text` as a date-time, puts it in `zone` (else keeps its own offset; UTC for one
/// without), and formats it.
fn datetime(text: &str, format: &str, zone: Option<&str>) -> Result<String, String> {
    use jiff::fmt::temporal::Pieces;
    use jiff::tz::TimeZone;
    let unreadable = || format!("\"{text}\" is not a date-time");
    // An HL7 timestamp (`20261122160405+0100`) reads as its ISO 8601 form.
    let iso = crate::hl7::timestamp_iso(text.trim());
    let pieces = Pieces::parse(iso.as_deref().unwrap_or(text.trim())).map_err(|_| unreadable())?;
    let civil = pieces
        .date()
        .to_datetime(pieces.time().unwrap_or(jiff::civil::Time::midnight()));
    let own = match pieces.to_numeric_offset() {
        Some(offset) => TimeZone::fixed(offset),
        None => pieces
            .to_time_zone()
            .map_err(|_| unreadable())?
            .unwrap_or(TimeZone::UTC),
    };
    let mut zoned = civil.to_zoned_datetime(own).map_err(|_| unreadable())?;
    if let Some(zone) = zone {
        let zone = TimeZone::get(zone).map_err(|_| format!("\"{zone}\" is not a time zone"))?;
        zoned = zoned.with_time_zone(zone);
    }
    jiff::fmt::strtime::format(format, &zoned).map_err(|e| e.to_string())
}

/// Makes every helper callable from Handlebars text templates too, reading `env`'s tables.
/// Handlebars' own `if`, `unless`, `each`, `with` and `lookup` stay as they are.
pub fn register(registry: &mut handlebars::Handlebars<'static>, env: &std::sync::Arc<Env>) {
    for helper in HELPERS.iter().filter(|h| h.name != "if") {
        registry.register_helper(
            helper.name,
            Box::new(InHandlebars {
                helper,
                env: std::sync::Arc::clone(env),
            }),
        );
    }
}

struct InHandlebars {
    helper: &'static Helper,
    env: std::sync::Arc<Env>,
}

impl handlebars::HelperDef for InHandlebars {
    fn call_inner<'reg: 'rc, 'rc>(
        &self,
        h: &handlebars::Helper<'rc>,
        _: &'reg handlebars::Handlebars<'reg>,
        _: &'rc handlebars::Context,
        _: &mut handlebars::RenderContext<'reg, 'rc>,
    ) -> Result<handlebars::ScopedJson<'rc>, handlebars::RenderError> {
        let args: Vec<Found<'_>> = h
            .params()
            .iter()
            .map(|p| (!p.is_value_missing()).then(|| Cow::Borrowed(p.value())))
            .collect();
        if args.len() < self.helper.min || self.helper.max.is_some_and(|max| args.len() > max) {
            return Err(handlebars::RenderErrorReason::Other(format!(
                "`{}` takes {} argument(s)",
                self.helper.name, self.helper.signature
            ))
            .into());
        }
        self.helper
            .call(&args, &self.env)
            .map(handlebars::ScopedJson::Derived)
            .map_err(|e| handlebars::RenderErrorReason::Other(e).into())
    }
}

/// An object from pairs, for tests.
#[cfg(test)]
fn object(pairs: &[(&str, Value)]) -> Value {
    Value::Object(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn call(name: &str, args: &[Option<Value>]) -> Result<Value, String> {
        let env = Env {
            tables: vec![super::super::expr::Table {
                name: "priority".into(),
                entries: object(&[("routine", json!("R")), ("urgent", json!("S"))])
                    .as_object()
                    .cloned()
                    .unwrap(),
            }],
        };
        let args: Vec<Found<'_>> = args.iter().map(|a| a.clone().map(Cow::Owned)).collect();
        find(name).unwrap().call(&args, &env)
    }

    #[test]
    fn missing_is_absence_not_an_error() {
        assert_eq!(call("eq", &[None, Some(json!("urgent"))]), Ok(json!(false)));
        assert_eq!(call("gt", &[None, Some(json!(1))]), Ok(json!(false)));
        assert_eq!(call("upper", &[None]), Ok(Value::Null));
        assert_eq!(call("number", &[None]), Ok(Value::Null));
        assert_eq!(call("count", &[None]), Ok(json!(0)));
        assert_eq!(
            call("coalesce", &[None, Some(Value::Null), Some(json!(3))]),
            Ok(json!(3))
        );
        assert_eq!(
            call("table", &[Some(json!("priority")), None, Some(json!("R"))]),
            Ok(json!("R"))
        );
        assert_eq!(
            call("table", &[Some(json!("priority")), Some(json!("urgent"))]),
            Ok(json!("S"))
        );
    }

    #[test]
    fn conversions_keep_types_people_expect() {
        assert_eq!(call("number", &[Some(json!(" 7.20"))]), Ok(json!(7.2)));
        assert_eq!(call("number", &[Some(json!("<0.5"))]), Ok(Value::Null));
        assert_eq!(call("number", &[Some(json!("12"))]), Ok(json!(12)));
        assert_eq!(
            call("sum", &[Some(json!([500, "x", 2.5]))]),
            Ok(json!(502.5))
        );
        assert_eq!(
            call("eq", &[Some(json!(-5)), Some(json!(-5.0))]),
            Ok(json!(true))
        );
        assert_eq!(
            call("round", &[Some(json!(2.345)), Some(json!(2))]),
            Ok(json!(2.35))
        );
        assert_eq!(
            call(
                "in",
                &[Some(json!("H")), Some(json!("H")), Some(json!("L"))]
            ),
            Ok(json!(true))
        );
        assert_eq!(
            call("concat", &[Some(json!("A")), None, Some(json!(1))]),
            Ok(json!("A1"))
        );
        assert_eq!(
            call(
                "substring",
                &[Some(json!("Okafor")), Some(json!(0)), Some(json!(3))]
            ),
            Ok(json!("Oka"))
        );
    }

    #[test]
    fn date_times_convert_between_zones_and_formats() {
        let f = |t: &str, fmt: &str, z: Option<&str>| datetime(t, fmt, z);
        assert_eq!(
            f("2026-11-20T09:30:00+02:00", "%Y%m%d%H%M%S", Some("UTC")).unwrap(),
            "20261120073000"
        );
        assert_eq!(
            f("2026-11-22T15:04:05Z", "%Y-%m-%d", None).unwrap(),
            "2026-11-22"
        );
        assert_eq!(
            f("2026-07-01T12:00:00Z", "%H:%M %Z", Some("Europe/Berlin")).unwrap(),
            "14:00 CEST"
        );
        assert_eq!(f("2026-11-20", "%Y%m%d", None).unwrap(), "20261120");
        assert!(
            f("yesterday", "%Y", None)
                .unwrap_err()
                .contains("\"yesterday\" is not a date-time")
        );
    }

    #[test]
    fn an_hl7_place_written_wrong_is_refused_when_the_flow_loads() {
        let mut templates = crate::template::Templates::new();
        let error = templates
            .compile_text("{{hl7 body 'PID-0'}}", crate::template::Escape::Plain)
            .unwrap_err();
        assert!(
            error.message.contains("\"PID-0\" is not an HL7 place"),
            "{error:?}"
        );
        assert!(
            templates
                .compile_text("{{hl7 body 'OBX[2]-5.1'}}", crate::template::Escape::Plain)
                .is_ok()
        );
    }

    #[test]
    fn a_uuid_is_named_by_its_values_alone() {
        let uuid = |args: &[&str]| {
            let args: Vec<Option<Value>> = args.iter().map(|a| Some(json!(a))).collect();
            call("uuid", &args).unwrap().as_str().unwrap().to_owned()
        };
        let specimen = uuid(&["R-1", "specimen", "S-1"]);
        assert_eq!(
            specimen,
            uuid(&["R-1", "specimen", "S-1"]),
            "the same every time"
        );
        assert_eq!(
            uuid::Uuid::parse_str(&specimen).unwrap().get_version_num(),
            5
        );
        assert_ne!(specimen, uuid(&["R-1", "specimen", "S-2"]));
        assert_ne!(uuid(&["ab", "c"]), uuid(&["a", "bc"]), "values stay apart");
    }

    #[test]
    fn the_readme_lists_every_helper_as_it_is() {
        let readme = include_str!("../../README.md");
        for helper in HELPERS {
            let row = format!(
                "| `{} {}` | {} |",
                helper.name, helper.signature, helper.doc
            );
            assert!(
                readme.contains(&row),
                "the README lacks, or words otherwise:\n{row}"
            );
        }
        let listed = readme
            .lines()
            .filter(|l| l.starts_with("| `") && l.contains("` | "))
            .count();
        assert!(listed >= HELPERS.len());
    }
}
