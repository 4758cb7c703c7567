//! The expressions inside `{{ }}`, in Handlebars' own syntax: a path (`body.samples`,
//! `sample.sample_id`, `@index`), a literal (`"R"`, `'R'`, `7.5`, `true`, `null`), or a
//! helper call whose arguments are expressions, with subexpressions in parentheses:
//! `{{coalesce (number obs.value) obs.value}}`.
//!
//! An expression is parsed and its helpers resolved (name, number of arguments, tables)
//! when the flow loads; a message only evaluates the tree. Evaluation yields a JSON value,
//! or nothing for a path that finds nothing ("missing"), which helpers treat as absent: a
//! comparison with a missing field is false, a conversion of one is `null`.

use std::borrow::Cow;

use serde_json::Value;
use smallvec::SmallVec;

use super::helpers::{self, Helper};

/// A compiled expression.
#[derive(Debug, Clone)]
pub enum Expr {
    /// A literal value.
    Literal(Value),
    /// A path into the message or into an item of an enclosing `$each`.
    Path(Path),
    /// `@index` (from 0), `@position` (from 1), `@first` or `@last` of the innermost item.
    Data(Data),
    /// A helper applied to its arguments.
    Call(&'static Helper, Vec<Expr>),
    /// `eq A B` (or `ne A B` when negated), compiled on its own: the comparison that joins
    /// and filters run for every pair of items, evaluated without building an argument list.
    Equal(Box<Expr>, Box<Expr>, bool),
}

/// What a path starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Root {
    /// `body`, `vars` or `meta` of the message.
    Message(&'static str),
    /// The item of the enclosing `$each` at this depth (0 is the outermost).
    Item(usize),
}

/// A path: a root and the names and indices under it.
#[derive(Debug, Clone)]
pub struct Path {
    /// Where it starts.
    pub root: Root,
    /// The names (and indices, as digits) after the root.
    pub segments: Vec<String>,
}

/// A data variable of the innermost `$each`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Data {
    /// The item's index, from 0.
    Index,
    /// The item's position, from 1.
    Position,
    /// Whether it is the first item.
    First,
    /// Whether it is the last item.
    Last,
}

/// An item of an enclosing `$each` while it is being rendered.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    /// The item.
    pub value: &'a Value,
    /// Its index.
    pub index: usize,
    /// How many items there are.
    pub len: usize,
}

/// What an expression reads: the message and the items in scope, innermost last.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    /// The message document `{body, vars, meta}`.
    pub root: &'a Value,
    /// The items of the enclosing `$each`es, outermost first.
    pub items: &'a [Binding<'a>],
}

/// What compiling sees: the flow's tables and the names of the items in scope.
#[derive(Debug, Clone, Copy)]
pub struct Names<'a> {
    /// Item names of the enclosing `$each`es, outermost first.
    pub items: &'a [String],
    /// The flow's lookup tables.
    pub tables: &'a [String],
}

/// The roots a message path may start at.
pub const ROOTS: [&str; 3] = ["body", "vars", "meta"];

/// A value, or nothing.
pub type Found<'a> = Option<Cow<'a, Value>>;

/// Why an expression does not compile: what, and (when ferry can tell) what to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExprError {
    /// What is wrong.
    pub message: String,
    /// What to do.
    pub hint: Option<String>,
}

impl ExprError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            hint: None,
        }
    }
}

impl std::fmt::Display for ExprError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Parses the inside of one `{{ }}`.
///
/// # Errors
///
/// An [`ExprError`] saying what does not parse, or which helper, table or name is unknown.
pub fn parse(source: &str, names: Names<'_>) -> Result<Expr, ExprError> {
    let tokens = tokenize(source)?;
    let mut parser = Parser {
        tokens: &tokens,
        at: 0,
        names,
    };
    let expr = parser.top()?;
    if parser.at < tokens.len() {
        return Err(ExprError::new(format!(
            "unexpected `{}` in `{{{{{source}}}}}`",
            tokens[parser.at].text()
        )));
    }
    Ok(expr)
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Open,
    Close,
    Literal(Value),
    Word(String),
}

impl Token {
    fn text(&self) -> String {
        match self {
            Self::Open => "(".into(),
            Self::Close => ")".into(),
            Self::Literal(value) => value.to_string(),
            Self::Word(word) => word.clone(),
        }
    }
}

fn tokenize(source: &str) -> Result<Vec<Token>, ExprError> {
    let mut tokens = Vec::new();
    let mut chars = source.char_indices().peekable();
    while let Some(&(at, c)) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '(' => {
                chars.next();
                tokens.push(Token::Open);
            }
            ')' => {
                chars.next();
                tokens.push(Token::Close);
            }
            '"' | '\'' => {
                chars.next();
                let mut text = String::new();
                let mut closed = false;
                for (_, next) in chars.by_ref() {
                    if next == c {
                        closed = true;
                        break;
                    }
                    text.push(next);
                }
                if !closed {
                    return Err(ExprError::new(format!(
                        "a text literal is not closed: {}",
                        &source[at..]
                    )));
                }
                tokens.push(Token::Literal(Value::String(text)));
            }
            _ => {
                // A word runs to whitespace or a parenthesis; `[…]` segments may hold either.
                let mut end = source.len();
                let mut bracket = false;
                for (i, next) in source[at..].char_indices() {
                    match next {
                        '[' => bracket = true,
                        ']' => bracket = false,
                        c if !bracket && (c.is_whitespace() || c == '(' || c == ')') => {
                            end = at + i;
                            break;
                        }
                        _ => {}
                    }
                }
                let word = &source[at..end];
                while chars.peek().is_some_and(|&(i, _)| i < end) {
                    chars.next();
                }
                tokens.push(match word {
                    "true" => Token::Literal(Value::Bool(true)),
                    "false" => Token::Literal(Value::Bool(false)),
                    "null" => Token::Literal(Value::Null),
                    number if looks_numeric(number) => match number.parse::<serde_json::Number>() {
                        Ok(n) => Token::Literal(Value::Number(n)),
                        Err(_) => {
                            return Err(ExprError::new(format!("\"{number}\" is not a number")));
                        }
                    },
                    word => Token::Word(word.to_owned()),
                });
            }
        }
    }
    Ok(tokens)
}

fn looks_numeric(word: &str) -> bool {
    let digits = word.strip_prefix('-').unwrap_or(word);
    digits.starts_with(|c: char| c.is_ascii_digit())
}

struct Parser<'t, 'n> {
    tokens: &'t [Token],
    at: usize,
    names: Names<'n>,
}

impl Parser<'_, '_> {
    /// A whole `{{ }}`: a helper with its arguments, or one operand.
    fn top(&mut self) -> Result<Expr, ExprError> {
        match self.tokens {
            [] => Err(ExprError::new("an empty `{{}}`")),
            [Token::Word(name), _, ..] => {
                self.at += 1;
                self.call(name)
            }
            _ => self.operand(),
        }
    }

    /// A helper named `name`, its arguments up to the end or a closing parenthesis.
    fn call(&mut self, name: &str) -> Result<Expr, ExprError> {
        let Some(helper) = helpers::find(name) else {
            let mut error = ExprError::new(format!("unknown helper `{name}`"));
            error.hint = Some(match crate::diagnostic::closest(name, helpers::names()) {
                Some(best) => {
                    format!("did you mean `{best}`? The helpers are listed in the README")
                }
                None => "the helpers are listed in the README's transform reference".into(),
            });
            return Err(error);
        };
        let mut args = Vec::new();
        while self.tokens.get(self.at).is_some_and(|t| *t != Token::Close) {
            args.push(self.operand()?);
        }
        helper.check(&args, self.names)?;
        if let ("eq" | "ne", [_, _]) = (helper.name, args.as_slice()) {
            let mut args = args.into_iter();
            let (a, b) = (args.next().expect("two"), args.next().expect("two"));
            return Ok(Expr::Equal(Box::new(a), Box::new(b), helper.name == "ne"));
        }
        Ok(Expr::Call(helper, args))
    }

    /// A literal, a path, a data variable, or a parenthesised helper call.
    fn operand(&mut self) -> Result<Expr, ExprError> {
        let token = self
            .tokens
            .get(self.at)
            .ok_or_else(|| ExprError::new("an expression ends too early"))?;
        self.at += 1;
        match token {
            Token::Literal(value) => Ok(Expr::Literal(value.clone())),
            Token::Close => Err(ExprError::new("a `)` without its `(`")),
            Token::Open => {
                let Some(Token::Word(name)) = self.tokens.get(self.at) else {
                    return Err(ExprError::new("`(` must be followed by a helper's name"));
                };
                self.at += 1;
                let call = self.call(name)?;
                match self.tokens.get(self.at) {
                    Some(Token::Close) => {
                        self.at += 1;
                        Ok(call)
                    }
                    _ => Err(ExprError::new(format!(
                        "`({name} …` is not closed with `)`"
                    ))),
                }
            }
            Token::Word(word) => self.path(word),
        }
    }

    fn path(&self, word: &str) -> Result<Expr, ExprError> {
        if let Some(data) = word.strip_prefix('@') {
            return match data {
                "index" => Ok(Expr::Data(Data::Index)),
                "position" => Ok(Expr::Data(Data::Position)),
                "first" => Ok(Expr::Data(Data::First)),
                "last" => Ok(Expr::Data(Data::Last)),
                other => Err(ExprError::new(format!(
                    "`@{other}` is not known; inside `$each` there are @index, @position, @first and @last"
                ))),
            }
            .and_then(|data| {
                if self.names.items.is_empty() {
                    Err(ExprError::new(format!(
                        "`{word}` is only known inside `$each`"
                    )))
                } else {
                    Ok(data)
                }
            });
        }
        let segments = segments(word)
            .ok_or_else(|| ExprError::new(format!("`{word}` is not a path, helper or literal")))?;
        let (first, rest) = segments.split_first().expect("a path has a segment");
        let root = match self.names.items.iter().rposition(|n| n == first) {
            Some(depth) => Root::Item(depth),
            None => match ROOTS.iter().find(|r| **r == first) {
                Some(root) => Root::Message(root),
                None => {
                    let mut known: Vec<&str> = ROOTS.to_vec();
                    known.extend(self.names.items.iter().map(String::as_str));
                    let mut error = ExprError::new(format!(
                        "`{word}` reads `{first}`; templates read {}",
                        known
                            .iter()
                            .map(|k| format!("`{k}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                    error.hint = crate::diagnostic::closest(first, known.iter().copied())
                        .map(|best| format!("did you mean `{best}`?"));
                    return Err(error);
                }
            },
        };
        Ok(Expr::Path(Path {
            root,
            segments: rest.to_vec(),
        }))
    }
}

/// The segments of a dotted path as Handlebars writes it: `body.tests.[0].code`, or `None`.
pub fn segments(word: &str) -> Option<Vec<String>> {
    let mut segments = Vec::new();
    let mut rest = word;
    while !rest.is_empty() {
        let (segment, after) = if let Some(quoted) = rest.strip_prefix('[') {
            let end = quoted.find(']')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            let end = rest.find('.').unwrap_or(rest.len());
            (&rest[..end], &rest[end..])
        };
        let plain = segment
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '-');
        if segment.is_empty() || (!plain && !rest.starts_with('[')) {
            return None;
        }
        segments.push(segment.to_owned());
        rest = match after.strip_prefix('.') {
            Some(next) if !next.is_empty() => next,
            Some(_) => return None,
            None if after.is_empty() => after,
            None => return None,
        };
    }
    (!segments.is_empty()).then_some(segments)
}

impl Expr {
    /// Evaluates the expression in `scope`; `None` when a path finds nothing.
    ///
    /// # Errors
    ///
    /// What a helper refuses, such as a text that is not a date-time.
    pub fn eval<'a>(&'a self, scope: Scope<'a>, env: &'a Env) -> Result<Found<'a>, String> {
        match self {
            Self::Literal(value) => Ok(Some(Cow::Borrowed(value))),
            Self::Path(path) => Ok(path.find(scope)),
            Self::Data(data) => {
                let Some(item) = scope.items.last() else {
                    return Ok(None);
                };
                let value = match data {
                    Data::Index => Value::from(item.index),
                    Data::Position => Value::from(item.index + 1),
                    Data::First => Value::Bool(item.index == 0),
                    Data::Last => Value::Bool(item.index + 1 == item.len),
                };
                Ok(Some(Cow::Owned(value)))
            }
            Self::Call(helper, args) => {
                let mut values: SmallVec<[Found<'a>; 4]> = SmallVec::with_capacity(args.len());
                for arg in args {
                    values.push(arg.eval(scope, env)?);
                }
                helper.call(&values, env).map(|v| Some(Cow::Owned(v)))
            }
            Self::Equal(a, b, negate) => {
                let equal = match (a.borrowed(scope), b.borrowed(scope)) {
                    // Paths and literals compare by reference, nothing copied.
                    (Some(a), Some(b)) => a.zip(b).is_some_and(|(a, b)| super::helpers::same(a, b)),
                    _ => {
                        let (a, b) = (a.eval(scope, env)?, b.eval(scope, env)?);
                        match (a.as_deref(), b.as_deref()) {
                            (Some(a), Some(b)) => super::helpers::same(a, b),
                            _ => false,
                        }
                    }
                };
                Ok(Some(Cow::Owned(Value::Bool(equal != *negate))))
            }
        }
    }

    /// For a path or a literal: what it reads, by reference (`Some(None)` when a path finds
    /// nothing, or one that maps over an array); `None` for anything that must be computed.
    fn borrowed<'a>(&'a self, scope: Scope<'a>) -> Option<Option<&'a Value>> {
        match self {
            Self::Literal(value) => Some(Some(value)),
            Self::Path(path) => match path.find(scope) {
                Some(Cow::Borrowed(value)) => Some(Some(value)),
                None => Some(None),
                Some(Cow::Owned(_)) => None,
            },
            _ => None,
        }
    }

    /// The paths it reads, each with its root.
    pub fn paths(&self, out: &mut Vec<Path>) {
        match self {
            Self::Path(path) => out.push(path.clone()),
            Self::Call(_, args) => args.iter().for_each(|a| a.paths(out)),
            Self::Equal(a, b, _) => {
                a.paths(out);
                b.paths(out);
            }
            Self::Literal(_) | Self::Data(_) => {}
        }
    }

    /// The path, when the expression is nothing but one.
    pub fn as_path(&self) -> Option<&Path> {
        match self {
            Self::Path(path) => Some(path),
            _ => None,
        }
    }
}

impl Path {
    /// The value at the path in `scope`. A name applied to an array reads it from every
    /// item (arrays that gives are joined), as JSONata does: `body.samples.volume_ml` is
    /// every sample's volume.
    pub fn find<'a>(&self, scope: Scope<'a>) -> Found<'a> {
        let mut value = match self.root {
            Root::Message(name) => scope.root.get(name)?,
            Root::Item(depth) => scope.items.get(depth)?.value,
        };
        // The common case walks objects by reference; an array read by name maps.
        for (at, segment) in self.segments.iter().enumerate() {
            value = match value {
                Value::Object(map) => map.get(segment)?,
                Value::Array(items) => match segment.parse::<usize>() {
                    Ok(index) => items.get(index)?,
                    Err(_) => return mapped(items, &self.segments[at..]),
                },
                _ => return None,
            };
        }
        Some(Cow::Borrowed(value))
    }
}

fn follow<'a>(value: Cow<'a, Value>, segments: &[String]) -> Found<'a> {
    let Some((segment, rest)) = segments.split_first() else {
        return Some(value);
    };
    match value {
        Cow::Borrowed(value) => match value {
            Value::Object(map) => follow(Cow::Borrowed(map.get(segment)?), rest),
            Value::Array(items) => match segment.parse::<usize>() {
                Ok(index) => follow(Cow::Borrowed(items.get(index)?), rest),
                Err(_) => mapped(items, segments),
            },
            _ => None,
        },
        Cow::Owned(value) => match value {
            Value::Object(mut map) => follow(Cow::Owned(map.remove(segment)?), rest),
            Value::Array(items) => match segment.parse::<usize>() {
                Ok(index) => follow(Cow::Owned(items.into_iter().nth(index)?), rest),
                Err(_) => mapped(&items, segments).map(|v| Cow::Owned(v.into_owned())),
            },
            _ => None,
        },
    }
}

/// `segments` read from every item of `items`, what is found joined into one array.
fn mapped<'a>(items: &'a [Value], segments: &[String]) -> Found<'a> {
    let mut out = Vec::new();
    for item in items {
        match follow(Cow::Borrowed(item), segments) {
            Some(Cow::Borrowed(Value::Array(found))) => out.extend(found.iter().cloned()),
            Some(Cow::Owned(Value::Array(found))) => out.extend(found),
            Some(found) => out.push(found.into_owned()),
            None => {}
        }
    }
    Some(Cow::Owned(Value::Array(out)))
}

/// What helpers read besides their arguments: the flow's lookup tables.
#[derive(Debug, Default, Clone)]
pub struct Env {
    /// The tables, by the index `table` resolved at load.
    pub tables: Vec<Table>,
}

/// A lookup table a flow declares once under `tables:`.
#[derive(Debug, Clone, Default)]
pub struct Table {
    /// The table's name.
    pub name: String,
    /// Its entries.
    pub entries: serde_json::Map<String, Value>,
}

/// A value as text: strings as they are, `null` and missing as nothing, other values as
/// JSON.
pub fn text_of(value: Option<&Value>) -> Cow<'_, str> {
    match value {
        Some(Value::String(text)) => Cow::Borrowed(text),
        None | Some(Value::Null) => Cow::Borrowed(""),
        Some(other) => Cow::Owned(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn names<'a>(items: &'a [String], tables: &'a [String]) -> Names<'a> {
        Names { items, tables }
    }

    fn eval(source: &str, root: &Value) -> Option<Value> {
        let expr = parse(source, names(&[], &[])).unwrap();
        let scope = Scope { root, items: &[] };
        expr.eval(scope, &Env::default())
            .unwrap()
            .map(Cow::into_owned)
    }

    #[test]
    fn paths_literals_and_nested_calls_parse() {
        let root =
            json!({"body": {"a": {"b": [1, {"c": "x"}]}, "name": " Ana "}, "vars": {}, "meta": {}});
        assert_eq!(eval("body.a.b.[1].c", &root), Some(json!("x")));
        assert_eq!(eval("body.a.b.1.c", &root), Some(json!("x")));
        assert_eq!(eval("'it'", &root), Some(json!("it")));
        assert_eq!(eval("\"a b\"", &root), Some(json!("a b")));
        assert_eq!(eval("-2.5", &root), Some(json!(-2.5)));
        assert_eq!(eval("upper (trim body.name)", &root), Some(json!("ANA")));
        assert_eq!(eval("body.missing", &root), None);
    }

    #[test]
    fn a_name_on_an_array_reads_every_item() {
        let root = json!({"body": {"samples": [{"v": 1}, {"w": 2}, {"v": [3, 4]}]}});
        assert_eq!(eval("body.samples.v", &root), Some(json!([1, 3, 4])));
    }

    #[test]
    fn mistakes_are_named_with_what_to_write() {
        let error = parse("uper body.x", names(&[], &[])).unwrap_err();
        assert_eq!(error.message, "unknown helper `uper`");
        assert!(error.hint.unwrap().contains("did you mean `upper`?"));
        let error = parse("sampel.id", names(&["sample".into()], &[])).unwrap_err();
        assert!(
            error.message.contains("reads `sampel`"),
            "{}",
            error.message
        );
        assert_eq!(error.hint.as_deref(), Some("did you mean `sample`?"));
        assert!(parse("upper", names(&[], &[])).is_err());
        assert!(parse("(upper body.x", names(&[], &[])).is_err());
        assert!(parse("@index", names(&[], &[])).is_err());
        assert!(parse("'open", names(&[], &[])).is_err());
    }
}
