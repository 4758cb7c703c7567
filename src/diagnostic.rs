//! One problem found in a flow, with where it is and what to do about it.
//!
//! Loading and compiling collect every problem as a [`Diagnostic`] instead of stopping at the
//! first, so `ferry check` can report them all at once.

use std::fmt;
use std::path::{Path, PathBuf};

/// How bad a [`Diagnostic`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The flow cannot run.
    Error,
    /// The flow runs, but probably not as meant.
    Warning,
}

/// A problem in a flow file (or a file it references), located as precisely as possible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// The file the problem is in.
    pub file: PathBuf,
    /// 1-based line and column, when known.
    pub position: Option<(u64, u64)>,
    /// Name of the flow, when known.
    pub flow: Option<String>,
    /// The step, as `step 2 (validate)`, or the part of the flow (`trigger`, `target "lab"`).
    pub context: Option<String>,
    /// What is wrong, lowercase, quoting the offending value.
    pub message: String,
    /// Stable name of the kind of problem, such as `unknown-key` (see the README).
    pub code: &'static str,
    /// What to do about it, when ferry can tell.
    pub hint: Option<String>,
}

impl Diagnostic {
    /// An error in `file` with no location yet.
    pub fn error(file: &Path, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            file: file.to_path_buf(),
            position: None,
            flow: None,
            context: None,
            message: message.into(),
            code: "invalid-value",
            hint: None,
        }
    }

    /// Names the kind of problem.
    #[must_use]
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = code;
        self
    }

    /// Adds advice.
    #[must_use]
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// The diagnostic as rustc shows one: what, where, the offending line with a caret under
    /// the column, and advice. `source` is the text of the file, when it can be read.
    pub fn render(&self, source: Option<&str>) -> String {
        use std::fmt::Write as _;
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let mut out = format!("{severity}[{}]: {}\n", self.code, self.message);
        // Every line of the gutter is as wide as the line number, as rustc draws it.
        let number = self.position.map(|(line, _)| line.to_string());
        let pad = " ".repeat(number.as_ref().map_or(1, String::len));
        let _ = write!(out, "{pad}--> {}", self.file.display());
        if let (Some((line, column)), Some(number)) = (self.position, &number) {
            let _ = write!(out, ":{line}:{column}");
            let text =
                source.and_then(|s| s.lines().nth(usize::try_from(line).ok()?.checked_sub(1)?));
            if let Some(text) = text {
                let caret = " ".repeat(usize::try_from(column.saturating_sub(1)).unwrap_or(0));
                let _ = write!(out, "\n{pad} |\n{number} | {text}\n{pad} | {caret}^");
            }
        }
        out.push('\n');
        match (&self.flow, &self.context) {
            (Some(flow), Some(context)) => {
                let _ = writeln!(out, "{pad} = in flow \"{flow}\", {context}");
            }
            (Some(flow), None) => {
                let _ = writeln!(out, "{pad} = in flow \"{flow}\"");
            }
            _ => {}
        }
        if let Some(hint) = &self.hint {
            let _ = writeln!(out, "{pad} = help: {hint}");
        }
        out
    }

    /// The diagnostic as one JSON object, for CI tools and editors.
    pub fn to_json(&self) -> serde_json::Value {
        let (line, column) = self
            .position
            .map_or((None, None), |(l, c)| (Some(l), Some(c)));
        serde_json::json!({
            "file": self.file.display().to_string(),
            "line": line,
            "column": column,
            "severity": match self.severity { Severity::Error => "error", Severity::Warning => "warning" },
            "code": self.code,
            "message": self.message,
            "flow": self.flow,
            "context": self.context,
            "hint": self.hint,
        })
    }

    /// Sets the 1-based line and column; a zero line means unknown and is ignored.
    #[must_use]
    pub fn at(mut self, line: u64, column: u64) -> Self {
        if line > 0 {
            self.position = Some((line, column.max(1)));
        }
        self
    }

    /// Locates the diagnostic at a YAML node.
    #[must_use]
    pub fn at_location(self, location: serde_saphyr::Location) -> Self {
        self.at(location.line(), location.column())
    }

    /// Names the flow the diagnostic belongs to.
    #[must_use]
    pub fn in_flow(mut self, flow: &str) -> Self {
        self.flow = Some(flow.to_owned());
        self
    }

    /// Names the part of the flow the diagnostic belongs to.
    #[must_use]
    pub fn in_context(mut self, context: impl Into<String>) -> Self {
        self.context = Some(context.into());
        self
    }

    /// Sort key: file, then position, so reports read top to bottom.
    pub fn sort_key(&self) -> (&Path, (u64, u64)) {
        (&self.file, self.position.unwrap_or((0, 0)))
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, column)) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, ": {severity}: ")?;
        match (&self.flow, &self.context) {
            (Some(flow), Some(context)) => write!(f, "flow \"{flow}\", {context}: ")?,
            (Some(flow), None) => write!(f, "flow \"{flow}\": ")?,
            (None, Some(context)) => write!(f, "{context}: ")?,
            (None, None) => {}
        }
        f.write_str(&self.message)
    }
}

/// The candidate closest to `word`, if one is close enough to be a likely misspelling.
///
/// Jaro-Winkler says which are close enough; among those, the fewest edits wins, so
/// `test-requst.schema.json` finds `test-request.schema.json`, not `test-result.schema.json`
/// (whose shared prefix Jaro-Winkler favours).
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score >= 0.8)
        .min_by(|a, b| {
            let edits = |c: &str| strsim::levenshtein(word, c);
            edits(a.1).cmp(&edits(b.1)).then(b.0.total_cmp(&a.0))
        })
        .map(|(_, c)| c)
}

/// Sorts diagnostics by file and position, and drops exact repeats.
pub fn sort(diagnostics: &mut Vec<Diagnostic>) {
    diagnostics.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
    diagnostics.dedup();
}

/// Where, in a flow file's `text`, the node at JSON `pointer` inside the YAML value that
/// starts at `line:column` is written: each key of the pointer is looked for from where its
/// parent was found on, in block style (`key:` on a line of its own) or flow style
/// (`{key: …}`). Array positions keep their parent's place. `None` when a key is not found
/// (a value written in another way), so the caller keeps the value's own place.
pub fn locate(text: &str, line: u64, column: u64, pointer: &str) -> Option<(u64, u64)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut at = (
        usize::try_from(line).ok()?.checked_sub(1)?,
        usize::try_from(column).ok()?.saturating_sub(1),
    );
    for segment in pointer.split('/').skip(1) {
        let key = segment.replace("~1", "/").replace("~0", "~");
        if key.parse::<usize>().is_ok() {
            continue;
        }
        at = find_key(&lines, at, &key)?;
    }
    Some((at.0 as u64 + 1, at.1 as u64 + 1))
}

/// The first place at or after `from` where `key` is written as a YAML key.
fn find_key(lines: &[&str], from: (usize, usize), key: &str) -> Option<(usize, usize)> {
    let forms = [key.to_owned(), format!("\"{key}\""), format!("'{key}'")];
    for (index, line) in lines.iter().enumerate().skip(from.0) {
        let start = if index == from.0 {
            from.1.min(line.len())
        } else {
            0
        };
        for form in &forms {
            let mut search = start;
            while let Some(found) = line.get(search..).and_then(|rest| rest.find(form.as_str())) {
                let begin = search + found;
                let end = begin + form.len();
                let before = line[..begin].chars().next_back();
                let after = line[end..].trim_start();
                let starts =
                    before.is_none_or(|c| c.is_whitespace() || c == '{' || c == ',' || c == '-');
                if starts && after.starts_with(':') {
                    return Some((index, begin));
                }
                search = end;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_file_line_column_flow_and_context() {
        let d = Diagnostic::error(Path::new("flows/a.yaml"), "unknown field `templat`")
            .at(12, 7)
            .in_flow("orders")
            .in_context("step 2 (transform)");
        assert_eq!(
            d.to_string(),
            "flows/a.yaml:12:7: error: flow \"orders\", step 2 (transform): unknown field `templat`"
        );
    }

    #[test]
    fn renders_like_rustc_with_the_line_and_a_caret() {
        let d = Diagnostic::error(Path::new("f.yaml"), "unknown field `pathh`")
            .at(2, 5)
            .in_flow("orders")
            .in_context("trigger")
            .with_code("unknown-key")
            .with_hint("did you mean `path`?");
        let rendered = d.render(Some("http:\n    pathh: /x\n"));
        assert_eq!(
            rendered,
            "error[unknown-key]: unknown field `pathh`\n --> f.yaml:2:5\n  |\n2 |     pathh: /x\n  |     ^\n  = in flow \"orders\", trigger\n  = help: did you mean `path`?\n"
        );
    }

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(
            closest("pathh", ["method", "path", "max_body"]),
            Some("path")
        );
        assert_eq!(
            closest("atempts", ["attempts", "initial"]),
            Some("attempts")
        );
        assert_eq!(closest("zzz", ["method", "path"]), None);
        assert_eq!(
            closest(
                "test-requst.schema.json",
                ["test-result.schema.json", "test-request.schema.json"]
            ),
            Some("test-request.schema.json")
        );
    }

    #[test]
    fn the_gutter_is_as_wide_as_the_line_number() {
        let source = "x\n".repeat(119) + "  pathh: /x\n";
        let rendered = Diagnostic::error(Path::new("f.yaml"), "unknown field `pathh`")
            .at(120, 3)
            .with_hint("did you mean `path`?")
            .render(Some(&source));
        assert_eq!(
            rendered,
            "error[invalid-value]: unknown field `pathh`\n   --> f.yaml:120:3\n    |\n120 |   pathh: /x\n    |   ^\n    = help: did you mean `path`?\n"
        );
    }

    #[test]
    fn renders_without_position() {
        let d = Diagnostic::error(Path::new("flows"), "no flow files found");
        assert_eq!(d.to_string(), "flows: error: no flow files found");
    }

    #[test]
    fn pointers_are_found_in_block_and_flow_style() {
        let text = "steps:\n  - transform:\n      body:\n        a: \"{{x}}\"\n        e:\n          $each: x\n          id: \"{{y}}\"\n        f: { $eachh: x }\n";
        assert_eq!(super::locate(text, 3, 7, "/a"), Some((4, 9)));
        assert_eq!(super::locate(text, 3, 7, "/e/id"), Some((7, 11)));
        assert_eq!(super::locate(text, 3, 7, "/f/$eachh"), Some((8, 14)));
        assert_eq!(super::locate(text, 3, 7, "/nowhere"), None);
    }
}
