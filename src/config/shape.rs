//! Every unknown key and kind of a flow file at once. Reading a file into [`super::FlowConfig`]
//! stops at its first unknown key; this walks the whole YAML document against the flow
//! format's JSON Schema ([`super::json_schema`]) and reports each one, at its line and
//! column, with the nearest known name.

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use serde_saphyr::{Location, Spanned};

/// A YAML document with the position of every key.
#[derive(Debug)]
enum Node {
    Map(Vec<(Spanned<String>, Node)>),
    Seq(Vec<Node>),
    /// A scalar, or a key that is not text: nothing to check inside.
    Leaf,
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Spanned<Key>>()? {
            let value = map.next_value::<Node>()?;
            if let Key::Text(text) = key.value {
                entries.push((Spanned::new(text, key.referenced, key.defined), value));
            }
        }
        Ok(Node::Map(entries))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_str<E>(self, _: &str) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }
}

/// A mapping key: text, or anything else (which the format never uses).
enum Key {
    Text(String),
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match Node::deserialize_key(deserializer)? {
            Some(text) => Self::Text(text),
            None => Self::Other,
        })
    }
}

impl Node {
    fn deserialize_key<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Option<String>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Some(v.to_owned()))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
        }
        d.deserialize_any(KeyVisitor)
    }
}

/// A key the format does not know: its name, where it is, and what could stand there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unknown {
    /// The key as written.
    pub name: String,
    /// Where it is.
    pub at: Location,
    /// A kind (the one key of a step, trigger, target…), not a field.
    pub kind: bool,
    /// The names that may stand there.
    pub expected: Vec<String>,
}

/// Every unknown key and kind of the flow file `text`, in document order; empty when the
/// YAML cannot be read (the reader reports that).
pub fn unknown_keys(text: &str) -> Vec<Unknown> {
    let options = serde_saphyr::options! { strict_booleans: true };
    let Ok(node) = serde_saphyr::from_str_with_options::<Node>(text, options) else {
        return Vec::new();
    };
    let schema = format();
    let mut found = Vec::new();
    walk(&node, schema, schema, &mut found);
    found
}

/// `text` with each of `unknown` blanked out (its key and value, or for a kind its whole
/// list item, as spaces), so the rest of the file can be read and checked further; every
/// other line and column stays where it was.
pub fn without(text: &str, unknown: &[Unknown]) -> String {
    let mut lines: Vec<Vec<char>> = text.lines().map(|l| l.chars().collect()).collect();
    for found in unknown {
        let line = usize::try_from(found.at.line())
            .unwrap_or(usize::MAX)
            .saturating_sub(1);
        let column = usize::try_from(found.at.column())
            .unwrap_or(usize::MAX)
            .saturating_sub(1);
        let Some(current) = lines.get(line) else {
            continue;
        };
        let lead: String = current.iter().take(column).collect();
        if lead.contains(['{', ',']) {
            blank_flow_entry(&mut lines[line], column);
            continue;
        }
        // A block key: it, its value, and the lines nested under it. An unknown kind takes
        // its whole list item with it.
        let start = match lead.trim_end().strip_suffix('-') {
            Some(dash) if found.kind => dash.chars().count(),
            _ => column,
        };
        for c in &mut lines[line][start..] {
            *c = ' ';
        }
        for below in &mut lines[line + 1..] {
            let indent = below.iter().take_while(|c| **c == ' ').count();
            if indent == below.len() {
                continue;
            }
            if indent <= start {
                break;
            }
            below.iter_mut().for_each(|c| *c = ' ');
        }
    }
    let mut out: String = lines
        .iter()
        .map(|l| l.iter().collect::<String>())
        .collect::<Vec<_>>()
        .join("\n");
    if text.ends_with('\n') {
        out.push('\n');
    }
    out
}

/// Blanks the entry of a flow mapping that starts at `column` (`key: value`), with the
/// comma that separates it from the next entry (or from the one before, when it is last).
fn blank_flow_entry(line: &mut [char], column: usize) {
    let mut depth = 0usize;
    let mut quote = None;
    let mut end = line.len();
    for (at, c) in line.iter().enumerate().skip(column) {
        match (quote, c) {
            (Some(q), c) if *c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(*c),
            (None, '{' | '[') => depth += 1,
            (None, '}' | ']') if depth == 0 => {
                end = at;
                break;
            }
            (None, '}' | ']') => depth -= 1,
            (None, ',') if depth == 0 => {
                end = at + 1;
                break;
            }
            _ => {}
        }
    }
    let mut start = column;
    if line.get(end.wrapping_sub(1)) != Some(&',') {
        // The last entry: the comma before it goes instead.
        if let Some(comma) = line[..column].iter().rposition(|c| *c == ',') {
            start = comma;
        }
    }
    for c in &mut line[start..end] {
        *c = ' ';
    }
}

/// The flow format's JSON Schema, made once: an editor asks for it at every keystroke.
fn format() -> &'static Value {
    static FORMAT: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    FORMAT.get_or_init(super::json_schema)
}

/// Follows `$ref`s into the root's `$defs`.
fn resolve<'a>(schema: &'a Value, root: &'a Value) -> &'a Value {
    let mut schema = schema;
    while let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        let Some(name) = reference.strip_prefix("#/$defs/") else {
            break;
        };
        match root["$defs"].get(name) {
            Some(target) => schema = target,
            None => break,
        }
    }
    schema
}

/// What a value may be: the schema's alternatives (`oneOf`, `anyOf`, nested ones flattened),
/// `$ref`s followed, `null` left out (an optional part that is there is not null).
fn alternatives<'a>(schema: &'a Value, root: &'a Value) -> Vec<&'a Value> {
    let schema = resolve(schema, root);
    match schema.get("oneOf").or_else(|| schema.get("anyOf")) {
        Some(Value::Array(branches)) => branches
            .iter()
            .flat_map(|b| alternatives(b, root))
            .collect(),
        _ if schema.get("type") == Some(&Value::String("null".into())) => Vec::new(),
        _ => vec![schema],
    }
}

fn walk(node: &Node, schema: &Value, root: &Value, found: &mut Vec<Unknown>) {
    let alternatives = alternatives(schema, root);
    let objects: Vec<&Value> = alternatives
        .iter()
        .copied()
        .filter(|a| a.get("properties").is_some() || a["additionalProperties"].is_object())
        .collect();
    // A kind: one key naming the variant, as `- transform: {...}`.
    let one_key = |o: &&Value| {
        o["properties"].as_object().is_some_and(|p| p.len() == 1)
            && o.get("additionalProperties") == Some(&Value::Bool(false))
    };
    let tagged = objects.len() > 1 && objects.iter().all(one_key);
    match node {
        Node::Map(entries) if tagged => {
            let variants: Vec<(&String, &Value)> = objects
                .iter()
                .filter_map(|o| o["properties"].as_object()?.iter().next())
                .collect();
            for (key, value) in entries {
                match variants.iter().find(|(name, _)| **name == key.value) {
                    Some((_, inner)) => walk(value, inner, root, found),
                    None => found.push(Unknown {
                        name: key.value.clone(),
                        at: key.referenced,
                        kind: true,
                        expected: variants.iter().map(|(n, _)| (*n).clone()).collect(),
                    }),
                }
            }
        }
        Node::Map(entries) => {
            let [schema] = objects.as_slice() else {
                return;
            };
            let properties = schema["properties"].as_object();
            let closed = schema.get("additionalProperties") == Some(&Value::Bool(false));
            let open = schema.get("additionalProperties").filter(|a| a.is_object());
            for (key, value) in entries {
                match properties.and_then(|p| p.get(&key.value)) {
                    Some(inner) => walk(value, inner, root, found),
                    None if closed => found.push(Unknown {
                        name: key.value.clone(),
                        at: key.referenced,
                        kind: false,
                        expected: properties
                            .map(|p| p.keys().cloned().collect())
                            .unwrap_or_default(),
                    }),
                    None => {
                        if let Some(inner) = open {
                            walk(value, inner, root, found);
                        }
                    }
                }
            }
        }
        Node::Seq(items) => {
            if let Some(inner) = alternatives.iter().find_map(|a| a.get("items")) {
                for item in items {
                    walk(item, inner, root, found);
                }
            }
        }
        Node::Leaf => {}
    }
}

/// A step along the keys of a flow file: a mapping key, or an item of a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// The value of this key.
    Key(String),
    /// An item of a list.
    Item,
}

/// The keys that may stand at `path` in a flow file, each with its description: an object's
/// fields, or the kinds a part names itself by (a step's, a trigger's, a target's).
pub fn keys_at(path: &[Segment]) -> Vec<(String, String)> {
    let root = format();
    let mut schema = root;
    for segment in path {
        let alternatives = alternatives(schema, root);
        let next = match segment {
            Segment::Item => alternatives.iter().find_map(|a| a.get("items")),
            Segment::Key(key) => alternatives.iter().find_map(|a| {
                a.get("properties")
                    .and_then(|p| p.get(key))
                    .or_else(|| a.get("additionalProperties").filter(|x| x.is_object()))
            }),
        };
        match next {
            Some(next) => schema = next,
            None => return Vec::new(),
        }
    }
    alternatives(schema, root)
        .iter()
        .filter_map(|a| a.get("properties")?.as_object())
        .flat_map(|properties| properties.iter())
        .map(|(key, value)| {
            let described = value
                .get("description")
                .or_else(|| resolve(value, root).get("description"));
            let text = described.and_then(Value::as_str).unwrap_or_default();
            (key.clone(), text.to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::unknown_keys;

    #[test]
    fn every_unknown_key_and_kind_is_found_where_it_is() {
        let text = "name: x\n\
                    descripton: typo\n\
                    trigger:\n  http: { method: POST, pathh: /x, auth: none }\n\
                    steps:\n  - transfrom: { body: {} }\n  - validate: { schema: a.json, defualts: true }\n\
                    targets:\n  lab:\n    http: { url: http://lab, timout: 5s }\n  other:\n    htp: { url: http://x }\n\
                    delivery: { retyr: { for: 1h } }\n\
                    reply: { status: 202, body: { anything: goes } }\n";
        let found: Vec<(String, bool, u64)> = unknown_keys(text)
            .into_iter()
            .map(|u| (u.name, u.kind, u.at.line()))
            .collect();
        assert_eq!(
            found,
            [
                ("descripton".to_owned(), false, 2),
                ("pathh".to_owned(), false, 4),
                ("transfrom".to_owned(), true, 6),
                ("defualts".to_owned(), false, 7),
                ("timout".to_owned(), false, 10),
                ("htp".to_owned(), true, 12),
                ("retyr".to_owned(), false, 13),
            ]
        );
    }

    #[test]
    fn unknown_keys_are_blanked_and_the_rest_stays_in_place() {
        let text = "name: x\n\
                    descripton:\n  still: nested\n\
                    steps:\n  - transfrom:\n      body: {}\n  - validate: { schema: a.json, defualts: true }\n\
                    targets:\n  lab:\n    http: { timout: 5s, url: http://lab }\n";
        let cleaned = super::without(text, &unknown_keys(text));
        assert_eq!(cleaned.lines().count(), text.lines().count());
        assert_eq!(unknown_keys(&cleaned), []);
        assert!(
            cleaned.contains("  - validate: { schema: a.json                 }"),
            "{cleaned}"
        );
        let http = cleaned.lines().find(|l| l.contains("http:")).unwrap();
        assert_eq!(
            http.split_whitespace().collect::<Vec<_>>(),
            ["http:", "{", "url:", "http://lab", "}"]
        );
        assert!(
            !cleaned.contains("transfrom") && !cleaned.contains("body"),
            "{cleaned}"
        );
        assert!(!cleaned.contains("nested"), "{cleaned}");
    }

    #[test]
    fn the_keys_at_a_place_are_its_fields_or_its_kinds() {
        use super::{Segment, keys_at};
        let names = |path: &[Segment]| -> Vec<String> {
            keys_at(path).into_iter().map(|(name, _)| name).collect()
        };
        let key = |k: &str| Segment::Key(k.to_owned());
        assert!(names(&[]).contains(&"trigger".to_owned()));
        let kinds = names(&[key("steps"), Segment::Item]);
        assert!(kinds.contains(&"transform".to_owned()), "{kinds:?}");
        let http = names(&[key("targets"), key("lab"), key("http")]);
        assert!(http.contains(&"timeout".to_owned()), "{http:?}");
        let described = keys_at(&[key("trigger"), key("http")]);
        let (_, path) = described.iter().find(|(name, _)| name == "path").unwrap();
        assert!(path.starts_with("Path, starting with"), "{path}");
        assert!(names(&[key("nothing")]).is_empty());
    }

    #[test]
    fn the_shipped_flows_and_examples_have_nothing_unknown() {
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut folders = vec![repo.join("flows")];
        for example in std::fs::read_dir(repo.join("examples")).unwrap() {
            folders.push(example.unwrap().path().join("flows"));
        }
        for entry in folders.iter().flat_map(|f| std::fs::read_dir(f).unwrap()) {
            let path = entry.unwrap().path();
            let name = path.to_string_lossy();
            if name.ends_with(".yaml") && !name.ends_with(".test.yaml") {
                let text = std::fs::read_to_string(&path).unwrap();
                assert_eq!(unknown_keys(&text), [], "{}", path.display());
            }
        }
    }
}
