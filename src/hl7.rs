//! HL7 v2 bodies in ER7, the pipe-and-hat form: read into JSON, and values escaped for it.
//!
//! A message is segments, each ended by a carriage return (a line feed, or both, is taken
//! too). The first is `MSH`, whose first two fields declare the delimiters: the field
//! separator right after `MSH` (usually `|`), then the component, repetition, escape and
//! sub-component characters (usually `^~\&`).
//!
//! # The JSON a message becomes
//!
//! - The body is an object with a key per segment id. Its value is an array with one entry
//!   per occurrence of that segment, in message order: `body.PID.0` is the first `PID`,
//!   `body.OBX.1` the second `OBX` (what integrators write `OBX[2]`).
//! - An occurrence is an object keyed by field number, from `"1"`; empty fields are left
//!   out. `PID-5` is `body.PID.0.5` in a template and `$.PID[0]['5']` in a JSONPath.
//! - A field is a string, unless it has components: then an object keyed by component
//!   number (`PID-5.1` is `body.PID.0.5.1`), empty ones left out. A component with
//!   sub-components is an object of them the same way. A field with repetitions is an
//!   array of its repetitions, each shaped as above.
//! - `MSH-1` is the field separator and `MSH-2` the encoding characters, as written; field
//!   numbers of `MSH` follow the standard (`MSH-9` the message type, `MSH-10` the control
//!   id), so `MSH-3` is the first field after the encoding characters.
//! - Escape sequences are decoded: `\F\ \S\ \T\ \R\ \E\` become the delimiter they stand for
//!   and `\Xhh…\` the bytes it spells. Formatting sequences (`\H\`, `\N\`, `\.br\`…) are
//!   kept as written, for the partner that reads formatted text.
//!
//! Parsing is strict: a message that does not start with `MSH`, a segment id that is not
//! three capitals or digits, delimiters that repeat, or an escape sequence left open is
//! refused with its place (`segment 4 (OBX), field 5: …`).

use std::fmt;

use serde_json::{Map, Value};

/// The media types of an HL7 v2 body in ER7: `x-application/hl7-v2+er7` (what HAPI and
/// most interface engines send) and `application/hl7-v2`.
pub fn is_hl7(content_type: &str) -> bool {
    matches!(
        &*crate::message::media_type(content_type),
        "x-application/hl7-v2+er7" | "application/hl7-v2"
    )
}

/// Reads a message from bytes: [`parse`], once they are UTF-8 text.
///
/// # Errors
///
/// What is wrong, and where ([`Hl7Error`]'s text), or that the bytes are not UTF-8.
pub fn read(bytes: &[u8]) -> Result<Value, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8 text: {e}"))?;
    parse(text).map_err(|e| e.to_string())
}

/// Why a message is not HL7 v2 ER7, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hl7Error {
    /// The segment's position in the message, from 1.
    pub segment: usize,
    /// The segment's id, when it has one.
    pub id: Option<String>,
    /// The field, from 1, when the problem is inside one.
    pub field: Option<usize>,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for Hl7Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "segment {}", self.segment)?;
        if let Some(id) = &self.id {
            write!(f, " ({id})")?;
        }
        if let Some(field) = self.field {
            write!(f, ", field {field}")?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl std::error::Error for Hl7Error {}

/// The delimiters a message declares in `MSH`.
#[derive(Debug, Clone, Copy)]
struct Delimiters {
    field: char,
    component: char,
    repetition: char,
    escape: char,
    subcomponent: char,
}

/// Reads an ER7 message into JSON (see the module documentation for its shape).
///
/// # Errors
///
/// An [`Hl7Error`] saying which segment and field is wrong, and how.
pub fn parse(text: &str) -> Result<Value, Hl7Error> {
    let mut segments = text
        .split(['\r', '\n'])
        .filter(|s| !s.is_empty())
        .enumerate()
        .map(|(n, s)| (n + 1, s));
    let Some((_, header)) = segments.next() else {
        return Err(error(1, None, None, "the message is empty"));
    };
    let delimiters = delimiters(header)?;
    let mut body = Map::new();
    let fields = &header[3 + delimiters.field.len_utf8()..];
    let msh = read_segment(1, "MSH", fields, delimiters, 2)?;
    push(&mut body, "MSH", msh);
    for (n, segment) in segments {
        let id = segment.get(..3).unwrap_or(segment);
        let id_ok = id.len() == 3
            && id
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
        if !id_ok {
            return Err(error(
                n,
                None,
                None,
                format!("\"{id}\" is not a segment id (three capitals or digits)"),
            ));
        }
        let rest = &segment[3..];
        let fields = match rest.chars().next() {
            None => "",
            Some(c) if c == delimiters.field => &rest[c.len_utf8()..],
            Some(c) => {
                return Err(error(
                    n,
                    Some(id),
                    None,
                    format!(
                        "the segment id is followed by '{c}', not the field separator '{}'",
                        delimiters.field
                    ),
                ));
            }
        };
        if id == "MSH" {
            return Err(error(n, Some(id), None, "a message has one MSH, first"));
        }
        let occurrence = read_segment(n, id, fields, delimiters, 0)?;
        push(&mut body, id, occurrence);
    }
    Ok(Value::Object(body))
}

/// The delimiters declared by the `MSH` segment `header`.
fn delimiters(header: &str) -> Result<Delimiters, Hl7Error> {
    if !header.starts_with("MSH") {
        let id = header.get(..3).unwrap_or(header);
        return Err(error(1, Some(id), None, "a message starts with MSH"));
    }
    let declared: Vec<char> = header[3..].chars().take(5).collect();
    let [field, component, repetition, escape, subcomponent] = declared[..] else {
        return Err(error(
            1,
            Some("MSH"),
            Some(2),
            "MSH declares five delimiters (as in `MSH|^~\\&|`)",
        ));
    };
    let all = [field, component, repetition, escape, subcomponent];
    for (i, c) in all.iter().enumerate() {
        if c.is_alphanumeric() || c.is_whitespace() || all[..i].contains(c) {
            return Err(error(
                1,
                Some("MSH"),
                Some(if i == 0 { 1 } else { 2 }),
                format!("'{c}' cannot be a delimiter here: each must be distinct punctuation"),
            ));
        }
    }
    // A sixth encoding character (the truncation character of v2.7) is not read.
    let after = header[3..].chars().nth(5);
    if after.is_some_and(|c| c != field) {
        return Err(error(
            1,
            Some("MSH"),
            Some(2),
            "MSH-2 holds the four encoding characters (`^~\\&`), then the field separator",
        ));
    }
    Ok(Delimiters {
        field,
        component,
        repetition,
        escape,
        subcomponent,
    })
}

/// Reads the fields of one segment (the text after its id and first separator). For `MSH`,
/// `skip` is 2: its first two fields are the delimiters, kept as written.
fn read_segment(
    n: usize,
    id: &str,
    fields: &str,
    d: Delimiters,
    skip: usize,
) -> Result<Value, Hl7Error> {
    let mut occurrence = Map::new();
    let mut split = fields.split(d.field);
    if skip == 2 {
        occurrence.insert("1".into(), Value::String(d.field.to_string()));
        let encoding = split.next().unwrap_or_default();
        occurrence.insert("2".into(), Value::String(encoding.to_owned()));
    }
    for (i, field) in split.enumerate() {
        let number = i + 1 + skip;
        if field.is_empty() {
            continue;
        }
        let value =
            read_field(field, d).map_err(|reason| error(n, Some(id), Some(number), reason))?;
        if let Some(value) = value {
            occurrence.insert(number.to_string(), value);
        }
    }
    Ok(Value::Object(occurrence))
}

/// A field: its repetitions, components and sub-components; `None` when all are empty.
fn read_field(field: &str, d: Delimiters) -> Result<Option<Value>, String> {
    let mut repetitions = Vec::new();
    for repetition in field.split(d.repetition) {
        let components = numbered(repetition.split(d.component), |component| {
            numbered(component.split(d.subcomponent), |text| unescape(text, d))
        })?;
        repetitions.push(components.unwrap_or(Value::String(String::new())));
    }
    Ok(match repetitions.len() {
        1 => repetitions.pop().filter(|v| v != ""),
        _ => Some(Value::Array(repetitions)),
    })
}

/// Parts read by `read`, as one value when there is one part and an object keyed by
/// number when there are several (empty parts left out); `None` when all are empty.
fn numbered<'a>(
    parts: impl Iterator<Item = &'a str>,
    read: impl Fn(&'a str) -> Result<Option<Value>, String>,
) -> Result<Option<Value>, String> {
    let parts: Vec<&str> = parts.collect();
    if let [only] = parts[..] {
        return read(only);
    }
    let mut object = Map::new();
    for (i, part) in parts.into_iter().enumerate() {
        if let Some(value) = read(part)? {
            object.insert((i + 1).to_string(), value);
        }
    }
    Ok((!object.is_empty()).then_some(Value::Object(object)))
}

/// Decodes the escape sequences of one value; `None` when it is empty.
fn unescape(text: &str, d: Delimiters) -> Result<Option<Value>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    if !text.contains(d.escape) {
        return Ok(Some(Value::String(text.to_owned())));
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(d.escape) {
        out.push_str(&rest[..start]);
        let after = &rest[start + d.escape.len_utf8()..];
        let Some(end) = after.find(d.escape) else {
            return Err(format!(
                "the escape sequence at \"{}\" is not closed by '{}'",
                &rest[start..],
                d.escape
            ));
        };
        let sequence = &after[..end];
        match sequence {
            "F" => out.push(d.field),
            "S" => out.push(d.component),
            "T" => out.push(d.subcomponent),
            "R" => out.push(d.repetition),
            "E" => out.push(d.escape),
            hex if hex.starts_with('X') => out.push_str(&decode_hex(&hex[1..])?),
            _ => {
                // A formatting instruction: kept for the partner that reads it.
                out.push(d.escape);
                out.push_str(sequence);
                out.push(d.escape);
            }
        }
        rest = &after[end + d.escape.len_utf8()..];
    }
    out.push_str(rest);
    Ok(Some(Value::String(out)))
}

/// The text that `\Xhh…\`'s hex digits spell (as UTF-8).
fn decode_hex(hex: &str) -> Result<String, String> {
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .filter(|b| !b.is_empty())
        .ok_or_else(|| format!("\"\\X{hex}\\\" is not an even number of hex digits"))?;
    String::from_utf8(bytes).map_err(|_| format!("\"\\X{hex}\\\" is not UTF-8 text"))
}

/// A place in a message as integrators write it: `PID-5.1`, `OBX[2]-5`, `PID-3(2).1`, or,
/// inside one segment, `5` and `3.1`. Counted from 1, as HL7 counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// The segment id and its occurrence (from 0), when the place starts from the message.
    segment: Option<(String, usize)>,
    field: usize,
    /// The repetition of the field, from 0.
    repetition: usize,
    /// The component and sub-component, when named.
    component: Option<usize>,
    subcomponent: Option<usize>,
}

impl Place {
    /// Reads a place.
    ///
    /// # Errors
    ///
    /// What is wrong with it, and how places are written.
    pub fn parse(text: &str) -> Result<Self, String> {
        let wrong = || {
            format!(
                "\"{text}\" is not an HL7 place: write SEGMENT[occurrence]-FIELD(repetition).COMPONENT.SUBCOMPONENT, such as \"PID-5.1\" or \"OBX[2]-5\", or FIELD.COMPONENT within a segment, such as \"3.1\""
            )
        };
        let (segment, rest) = match text.split_once('-') {
            Some((segment, rest)) => {
                let (id, occurrence) = match segment.split_once('[') {
                    Some((id, n)) => (id, counted(n.strip_suffix(']').ok_or_else(wrong)?)),
                    None => (segment, Some(0)),
                };
                let valid = id.len() == 3
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
                match (valid, occurrence) {
                    (true, Some(n)) => (Some((id.to_owned(), n)), rest),
                    _ => return Err(wrong()),
                }
            }
            None => (None, text),
        };
        let mut parts = rest.split('.');
        let field = parts.next().unwrap_or_default();
        let (field, repetition) = match field.split_once('(') {
            Some((field, n)) => (field, counted(n.strip_suffix(')').ok_or_else(wrong)?)),
            None => (field, Some(0)),
        };
        let number = |part: &str| part.parse::<usize>().ok().filter(|n| *n > 0);
        let named = |part: Option<&str>| part.map(|p| number(p).ok_or_else(wrong)).transpose();
        let component = named(parts.next())?;
        let subcomponent = named(parts.next())?;
        if parts.next().is_some() {
            return Err(wrong());
        }
        Ok(Self {
            segment,
            field: number(field).ok_or_else(wrong)?,
            repetition: repetition.ok_or_else(wrong)?,
            component,
            subcomponent,
        })
    }

    /// The value at this place of `value`: a message read by [`parse`], or one occurrence of
    /// a segment. A component of a field without components is the field itself (its first
    /// component), and the same one level down; a field that repeats gives its first
    /// repetition unless the place names another.
    pub fn find<'a>(&self, value: &'a Value) -> Option<&'a Value> {
        let occurrence = match &self.segment {
            Some((id, n)) => value.get(id)?.get(n)?,
            None => value,
        };
        let mut found = occurrence.get(self.field.to_string())?;
        found = match found {
            Value::Array(repetitions) => repetitions.get(self.repetition)?,
            one if self.repetition == 0 => one,
            _ => return None,
        };
        for part in [self.component, self.subcomponent].into_iter().flatten() {
            found = match found {
                Value::Object(parts) => parts.get(&part.to_string())?,
                whole if part == 1 => whole,
                _ => return None,
            };
        }
        Some(found)
    }
}

/// A count from 1 as an index from 0.
fn counted(text: &str) -> Option<usize> {
    text.parse::<usize>().ok()?.checked_sub(1)
}

/// Escapes `value` for a field of a message with the standard delimiters (`|^~\&`): it can
/// never end its field, component, repetition, sub-component or segment.
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\E\\"),
            '|' => out.push_str("\\F\\"),
            '^' => out.push_str("\\S\\"),
            '&' => out.push_str("\\T\\"),
            '~' => out.push_str("\\R\\"),
            '\r' => out.push_str("\\X0D\\"),
            '\n' => out.push_str("\\X0A\\"),
            c => out.push(c),
        }
    }
    out
}

/// Writes a field as [`parse`] read it back as ER7 with the standard delimiters, every value
/// [`escape`]d: repetitions joined by `~`, components by `^`, sub-components by `&`.
pub fn write_field(field: &Value) -> String {
    match field {
        Value::Array(repetitions) => repetitions
            .iter()
            .map(|r| write_part(r, &['^', '&']))
            .collect::<Vec<_>>()
            .join("~"),
        one => write_part(one, &['^', '&']),
    }
}

/// A value of a field, its numbered parts joined by the first of `separators` (the rest for
/// the parts' own parts).
fn write_part(value: &Value, separators: &[char]) -> String {
    match (value, separators.split_first()) {
        (Value::Object(parts), Some((separator, inner))) => {
            let last = parts.keys().filter_map(|k| k.parse::<usize>().ok()).max();
            (1..=last.unwrap_or(0))
                .map(|n| {
                    parts
                        .get(&n.to_string())
                        .map_or_else(String::new, |p| write_part(p, inner))
                })
                .collect::<Vec<_>>()
                .join(&separator.to_string())
        }
        (Value::String(text), _) => escape(text),
        (Value::Null, _) => String::new(),
        (other, _) => escape(&other.to_string()),
    }
}

/// An HL7 timestamp (`YYYY[MM[DD[HH[MM[SS[.S…]]]]]]` with an optional `+ZZZZ`/`-ZZZZ`
/// offset) in ISO 8601, missing parts the earliest: `20261122160405+0100` is
/// `2026-11-22T16:04:05+01:00`. `None` when `text` is not one.
pub fn timestamp_iso(text: &str) -> Option<String> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (moment, offset) = match text.find(['+', '-']) {
        Some(at) => (&text[..at], Some(&text[at..])),
        None => (text, None),
    };
    let (whole, fraction) = match moment.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (moment, None),
    };
    let whole_ok = matches!(whole.len(), 4 | 6 | 8 | 10 | 12 | 14) && digits(whole);
    let fraction_ok = fraction.is_none_or(|f| whole.len() == 14 && f.len() <= 4 && digits(f));
    let offset_ok = offset.is_none_or(|o| o.len() == 5 && digits(&o[1..]));
    if !(whole_ok && fraction_ok && offset_ok) {
        return None;
    }
    let part = |from: usize, earliest: &'static str| whole.get(from..from + 2).unwrap_or(earliest);
    let mut iso = format!(
        "{}-{}-{}T{}:{}:{}",
        &whole[..4],
        part(4, "01"),
        part(6, "01"),
        part(8, "00"),
        part(10, "00"),
        part(12, "00")
    );
    if let Some(fraction) = fraction {
        iso.push('.');
        iso.push_str(fraction);
    }
    if let Some(offset) = offset {
        iso.push_str(&offset[..3]);
        iso.push(':');
        iso.push_str(&offset[3..]);
    }
    Some(iso)
}

/// Rendered ER7 with its segments ended the HL7 way: a template's line breaks (`\n` or
/// `\r\n`) become carriage returns. Values cannot hold either once [`escape`]d.
pub fn segment_ends(text: &str) -> String {
    text.replace("\r\n", "\r").replace('\n', "\r")
}

fn push(body: &mut Map<String, Value>, id: &str, occurrence: Value) {
    match body.get_mut(id) {
        Some(Value::Array(list)) => list.push(occurrence),
        _ => {
            body.insert(id.to_owned(), Value::Array(vec![occurrence]));
        }
    }
}

fn error(
    segment: usize,
    id: Option<&str>,
    field: Option<usize>,
    reason: impl Into<String>,
) -> Hl7Error {
    Hl7Error {
        segment,
        id: id.map(str::to_owned),
        field,
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    const ORU: &str = "MSH|^~\\&|LAB|HELIX|FERRY|PORTAL|20260417120000||ORU^R01^ORU_R01|MSG0001|P|2.5.1\r\
PID|1||CUST-7^^^PORTAL~999^^^LAB||Doe^Jane||19800101|F\r\
OBR|1|PR-2026-0417|LAB-88|CBC^Complete blood count\r\
OBX|1|NM|HGB^Hemoglobin||13.5|g/dL|12.0-16.0|N|||F\r\
OBX|2|ST|NOTE^Note||Sample A \\T\\ B\\F\\ok\\X0A\\next line||||||F\r";

    #[test]
    fn hl7_timestamps_read_as_iso_8601() {
        for (hl7, iso) in [
            ("20261122160405+0100", Some("2026-11-22T16:04:05+01:00")),
            (
                "20261122160405.25-0500",
                Some("2026-11-22T16:04:05.25-05:00"),
            ),
            ("202611221604", Some("2026-11-22T16:04:00")),
            ("2026", Some("2026-01-01T00:00:00")),
            ("2026-11-22", None),
            ("20261122160", None),
            ("2026112216.5", None),
            ("20261122+01", None),
        ] {
            assert_eq!(timestamp_iso(hl7).as_deref(), iso, "{hl7}");
        }
    }

    #[test]
    fn a_field_read_is_written_back_as_it_was() {
        let body = parse(ORU).unwrap();
        for (place, written) in [
            ("MSH-9", "ORU^R01^ORU_R01"),
            ("PID-3", "CUST-7^^^PORTAL~999^^^LAB"),
            ("OBX[2]-5", "Sample A \\T\\ B\\F\\ok\\X0A\\next line"),
            ("OBR-2", "PR-2026-0417"),
        ] {
            let (id, field) = place.split_once('-').unwrap();
            let (id, n) = match id.split_once('[') {
                Some((id, n)) => (id, n.trim_end_matches(']').parse::<usize>().unwrap() - 1),
                None => (id, 0),
            };
            let value = &body[id][n][field];
            assert_eq!(write_field(value), written, "{place}");
        }
    }

    #[test]
    fn a_result_message_becomes_json_addressed_as_integrators_name_it() {
        let body = parse(ORU).unwrap();
        assert_eq!(body["MSH"][0]["1"], "|");
        assert_eq!(body["MSH"][0]["2"], "^~\\&");
        assert_eq!(body["MSH"][0]["3"], "LAB");
        assert_eq!(
            body["MSH"][0]["9"],
            json!({"1": "ORU", "2": "R01", "3": "ORU_R01"})
        );
        assert_eq!(body["MSH"][0]["10"], "MSG0001");
        // PID-3 repeats; PID-5.1 is the family name.
        assert_eq!(
            body["PID"][0]["3"],
            json!([{"1": "CUST-7", "4": "PORTAL"}, {"1": "999", "4": "LAB"}])
        );
        assert_eq!(body["PID"][0]["5"]["1"], "Doe");
        assert!(
            body["PID"][0].get("2").is_none(),
            "empty fields are left out"
        );
        assert_eq!(body["OBR"][0]["2"], "PR-2026-0417");
        assert_eq!(body["OBX"].as_array().unwrap().len(), 2);
        assert_eq!(body["OBX"][0]["5"], "13.5");
        // Escapes decoded: \T\ is '&', \F\ is '|', \X0A\ a line feed.
        assert_eq!(body["OBX"][1]["5"], "Sample A & B|ok\nnext line");
    }

    #[test]
    fn sub_components_line_feeds_and_declared_delimiters_are_read() {
        let body = parse("MSH#*@!%#A#B\nZZZ#x*y%z!S!*w\n").unwrap();
        assert_eq!(body["MSH"][0]["1"], "#");
        assert_eq!(body["MSH"][0]["3"], "A");
        assert_eq!(
            body["ZZZ"][0]["1"],
            json!({"1": "x", "2": {"1": "y", "2": "z*"}, "3": "w"})
        );
    }

    #[test]
    fn formatting_escapes_are_kept_as_written() {
        let body = parse("MSH|^~\\&|A\rOBX|1|FT|||line one\\.br\\line two\r").unwrap();
        assert_eq!(body["OBX"][0]["5"], "line one\\.br\\line two");
    }

    #[test]
    fn mistakes_are_refused_with_their_place() {
        let cases = [
            ("", "segment 1: the message is empty"),
            ("PID|1\r", "segment 1 (PID): a message starts with MSH"),
            (
                "MSH|^~\r",
                "segment 1 (MSH), field 2: MSH declares five delimiters",
            ),
            (
                "MSH|^^\\&|A\r",
                "segment 1 (MSH), field 2: '^' cannot be a delimiter",
            ),
            (
                "MSH|^~\\&|A\rpid|1\r",
                "segment 2: \"pid\" is not a segment id",
            ),
            (
                "MSH|^~\\&|A\rPID^1\r",
                "segment 2 (PID): the segment id is followed by '^'",
            ),
            (
                "MSH|^~\\&|A\rPID|1\rOBX|1|ST|||open \\F and more\r",
                "segment 3 (OBX), field 5: the escape sequence at \"\\F and more\" is not closed",
            ),
            (
                "MSH|^~\\&|A\rOBX|1|ST|||\\X0\\\r",
                "segment 2 (OBX), field 5: \"\\X0\\\" is not an even",
            ),
            (
                "MSH|^~\\&|A\rMSH|^~\\&|B\r",
                "segment 2 (MSH): a message has one MSH, first",
            ),
        ];
        for (text, expected) in cases {
            let error = parse(text).unwrap_err().to_string();
            assert!(error.starts_with(expected), "{text:?}: {error}");
        }
    }

    #[test]
    fn places_are_found_as_integrators_write_them() {
        let body = parse(ORU).unwrap();
        let at = |place: &str| Place::parse(place).unwrap().find(&body).cloned();
        assert_eq!(at("PID-5.1"), Some(json!("Doe")));
        assert_eq!(at("PID-5"), Some(json!({"1": "Doe", "2": "Jane"})));
        assert_eq!(at("PID-3.1"), Some(json!("CUST-7")), "the first repetition");
        assert_eq!(at("PID-3(2).4"), Some(json!("LAB")));
        assert_eq!(at("OBX[2]-3.2"), Some(json!("Note")));
        assert_eq!(at("OBX-5"), Some(json!("13.5")));
        assert_eq!(
            at("OBX-5.1"),
            Some(json!("13.5")),
            "a plain field is its component 1"
        );
        assert_eq!(at("OBX-5.2"), None);
        assert_eq!(at("OBX[3]-5"), None);
        assert_eq!(at("MSH-9.2"), Some(json!("R01")));
        let obx = &body["OBX"][1];
        assert_eq!(Place::parse("3.1").unwrap().find(obx), Some(&json!("NOTE")));
        for wrong in [
            "",
            "PID",
            "PID-",
            "PID-0",
            "pid-5",
            "OBX[0]-5",
            "OBX[2-5",
            "PID-5.1.1.1",
            "PID-5..1",
            "PID-3(0)",
        ] {
            let error = Place::parse(wrong).unwrap_err();
            assert!(error.contains("is not an HL7 place"), "{wrong}: {error}");
        }
    }

    #[test]
    fn media_types_are_recognised() {
        assert!(is_hl7("x-application/hl7-v2+er7"));
        assert!(is_hl7("Application/HL7-v2; charset=utf-8"));
        assert!(!is_hl7("application/json"));
    }

    proptest! {
        /// Whatever a value holds, escaped into a field it is read back as itself, and it
        /// adds no field, component, repetition, sub-component or segment.
        #[test]
        fn an_escaped_value_stays_one_value(value in "[a-z|^~\\\\&\r\n ]{1,20}|\\PC{1,12}") {
            let message = format!("MSH|^~\\&|A\rZZZ|{}|after\r", escape(&value));
            let body = parse(&message).unwrap();
            prop_assert_eq!(body.as_object().unwrap().len(), 2);
            prop_assert_eq!(body["ZZZ"].as_array().unwrap().len(), 1);
            prop_assert_eq!(&body["ZZZ"][0]["1"], &Value::String(value));
            prop_assert_eq!(&body["ZZZ"][0]["2"], "after");
        }
    }
}
