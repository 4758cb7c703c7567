//! Reading flow files: discovery, `${VAR}` interpolation and YAML parsing.
//!
//! This is the only module that parses YAML. It deserializes straight from text into the
//! typed [`FlowConfig`], never through a generic YAML value, so every error keeps its line
//! and column.

use std::path::{Path, PathBuf};

use super::FlowConfig;
use crate::diagnostic::Diagnostic;

/// A parsed flow file.
#[derive(Debug)]
pub struct LoadedFlow {
    /// The file the flow came from, as found under the flows folder.
    pub file: PathBuf,
    /// The flow as written, after interpolation.
    pub config: FlowConfig,
}

/// Finds and parses every flow file (`*.yaml`, `*.yml`) under `dir`, recursively, reading
/// `${VAR}`s through `env`. `dir` may also be one flow file.
///
/// Returns the flows that parsed and a diagnostic for every problem found. A folder with
/// neither flows nor flow tests is a mistake; one with tests alone (tests of flows kept
/// elsewhere) is not.
pub fn load_dir(
    dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> (Vec<LoadedFlow>, Vec<Diagnostic>) {
    load_dir_edited(dir, env, &|_| None)
}

/// [`load_dir`], with the text of some files as an editor holds it: `edited` gives a file's
/// unsaved text, or `None` to read the file.
pub fn load_dir_edited(
    dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    edited: &dyn Fn(&Path) -> Option<String>,
) -> (Vec<LoadedFlow>, Vec<Diagnostic>) {
    let mut diagnostics = Vec::new();
    let mut files = Vec::new();
    let mut tests = 0;
    if dir.is_file() {
        files.push(dir.to_path_buf());
    } else if let Err(error) = find_flow_files(dir, &mut files, &mut tests) {
        diagnostics.push(
            Diagnostic::error(dir, format!("cannot read flows folder: {error}")).with_code("io"),
        );
        return (Vec::new(), diagnostics);
    }
    if files.is_empty() && tests == 0 {
        diagnostics.push(Diagnostic::error(dir, "no flow files (*.yaml) found").with_code("io"));
    }
    files.sort();
    let mut flows = Vec::new();
    for file in files {
        let text = match edited(&file).map_or_else(|| std::fs::read_to_string(&file), Ok) {
            Ok(text) => text,
            Err(error) => {
                diagnostics.push(
                    Diagnostic::error(&file, format!("cannot read file: {error}")).with_code("io"),
                );
                continue;
            }
        };
        let (config, mut found) = parse_flow(&file, &text, env);
        diagnostics.append(&mut found);
        if let Some(config) = config {
            flows.push(LoadedFlow { file, config });
        }
    }
    (flows, diagnostics)
}

/// The flow files under `dir`, and how many flow tests lie beside them.
fn find_flow_files(dir: &Path, files: &mut Vec<PathBuf>, tests: &mut usize) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if is_hidden(&path) {
            continue;
        }
        if path.is_dir() {
            find_flow_files(&path, files, tests)?;
        } else if is_flow_file(&path) {
            files.push(path);
        } else if path.to_string_lossy().ends_with(".test.yaml") {
            *tests += 1;
        }
    }
    Ok(())
}

/// Hidden files and folders hold no flows: editors' and version control's, and the `..data`
/// folders through which Kubernetes mounts a ConfigMap (whose files would load twice).
pub(crate) fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// Flow files end in `.yaml` or `.yml`; `*.test.yaml` files hold flow tests, not flows.
fn is_flow_file(path: &Path) -> bool {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    (name.ends_with(".yaml") || name.ends_with(".yml"))
        && !name.ends_with(".test.yaml")
        && !name.ends_with(".test.yml")
}

/// Parses one flow file's text, interpolating environment variables through `env` first.
///
/// Returns the flow when it can be read, and every problem found: every unset variable, or
/// the first YAML or structure error. A file with unknown keys or kinds has every one of
/// them reported, and is read without them, so the later phases check the rest of it.
pub fn parse_flow(
    file: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> (Option<FlowConfig>, Vec<Diagnostic>) {
    let text = match interpolate(file, text, env) {
        Ok(text) => text,
        Err(diagnostics) => return (None, diagnostics),
    };
    let mut diagnostics = match parse_yaml(file, &text) {
        Ok(config) => return (Some(config), Vec::new()),
        Err(diagnostics) => diagnostics,
    };
    let unknown = |d: &Diagnostic| matches!(d.code, "unknown-key" | "unknown-kind");
    if !diagnostics.iter().any(unknown) {
        return (None, diagnostics);
    }
    let found = super::shape::unknown_keys(&text);
    let reported: Vec<Option<(u64, u64)>> = diagnostics.iter().map(|d| d.position).collect();
    for unknown in &found {
        let at = Some((unknown.at.line(), unknown.at.column()));
        if !reported.contains(&at) {
            diagnostics.push(unknown_diagnostic(file, unknown));
        }
    }
    diagnostics.sort_by_key(|d| d.position);
    // Read without them; a file that still cannot be read is checked no further.
    let cleaned = super::shape::without(&text, &found);
    (parse_yaml(file, &cleaned).ok(), diagnostics)
}

/// The diagnostic of an unknown key or kind, worded as the reader words its first one.
fn unknown_diagnostic(file: &Path, found: &super::shape::Unknown) -> Diagnostic {
    let (what, code) = if found.kind {
        ("variant", "unknown-kind")
    } else {
        ("field", "unknown-key")
    };
    let message = format!(
        "unknown {what} `{}`, expected one of {}",
        found.name,
        found.expected.join(", ")
    );
    let diagnostic = Diagnostic::error(file, message)
        .with_code(code)
        .at_location(found.at);
    let candidates = found.expected.iter().map(String::as_str);
    match crate::diagnostic::closest(&found.name, candidates) {
        Some(best) => diagnostic.with_hint(format!("did you mean `{best}`?")),
        None => diagnostic,
    }
}

/// Deserializes YAML text into `T` with ferry's parsing rules: YAML 1.2 booleans only
/// (`yes`, `on` and `NO` stay strings), duplicate keys refused.
///
/// # Errors
///
/// The first syntax or structure error, located in `file`.
pub fn parse_yaml<T: serde::de::DeserializeOwned>(
    file: &Path,
    text: &str,
) -> Result<T, Vec<Diagnostic>> {
    let options = serde_saphyr::options! { strict_booleans: true };
    serde_saphyr::from_str_with_options(text, options).map_err(|error| {
        let message = yaml_message(&error);
        let mut diagnostic = classify(Diagnostic::error(file, message.clone()), &message);
        if let Some(location) = error.location() {
            diagnostic = diagnostic.at_location(location);
        }
        vec![diagnostic]
    })
}

/// Names the kind of a parse error and, for a misspelt key or kind, suggests the right one.
fn classify(diagnostic: Diagnostic, message: &str) -> Diagnostic {
    let (code, unknown) = if let Some(rest) = message.strip_prefix("unknown field `") {
        ("unknown-key", rest)
    } else if let Some(rest) = message.strip_prefix("unknown variant `") {
        ("unknown-kind", rest)
    } else if message.starts_with("missing field") {
        return diagnostic.with_code("missing-key");
    } else if message.starts_with("invalid") {
        return diagnostic.with_code("invalid-value");
    } else {
        return diagnostic.with_code("yaml-syntax");
    };
    let diagnostic = diagnostic.with_code(code);
    let Some((word, expected)) = unknown.split_once('`') else {
        return diagnostic;
    };
    // serde lists what it expected after "expected one of" or "expected".
    let expected = expected.split_once("expected").map_or("", |(_, list)| list);
    let candidates: Vec<&str> = expected
        .split([',', ' '])
        .map(|c| c.trim_matches(|ch: char| ch == '`' || ch == ' ' || ch == '.'))
        .filter(|c| !c.is_empty() && *c != "one" && *c != "of" && *c != "or")
        .collect();
    match crate::diagnostic::closest(word, candidates.iter().copied()) {
        Some(best) => diagnostic.with_hint(format!("did you mean `{best}`?")),
        None => diagnostic,
    }
}

/// The error's own words, without the location and snippet that the diagnostic adds itself.
fn yaml_message(error: &serde_saphyr::Error) -> String {
    let rendered = error.without_snippet().to_string();
    // The rendering ends in " at line L, column C"; the diagnostic carries that already.
    let message = match rendered.rfind(" at line ") {
        Some(at) => &rendered[..at],
        None => &rendered,
    };
    message.trim().to_owned()
}

/// Replaces `${NAME}` and `${NAME:-default}` with environment values; `$${` stands for a
/// literal `${`.
///
/// Values may not hold line breaks, so interpolation can never add YAML structure and line
/// numbers stay those of the file.
///
/// # Errors
///
/// One diagnostic per unset variable without default, malformed reference, or multi-line
/// value, each at the line and column of its `${`.
pub fn interpolate(
    file: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, Vec<Diagnostic>> {
    let mut out = String::with_capacity(text.len());
    let mut errors = Vec::new();
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let line_no = index as u64 + 1;
        // A comment line is documentation: `${VAR}` there is not interpolated.
        if line.trim_start().starts_with('#') {
            out.push_str(line);
            continue;
        }
        let mut rest = line;
        let mut column = 1u64;
        while let Some(at) = rest.find('$') {
            out.push_str(&rest[..at]);
            column += rest[..at].chars().count() as u64;
            let tail = &rest[at..];
            if let Some(after) = tail.strip_prefix("$${") {
                out.push_str("${");
                rest = after;
                column += 3;
                continue;
            }
            if !tail.starts_with("${") {
                out.push('$');
                rest = &tail[1..];
                column += 1;
                continue;
            }
            let error = |message: String| {
                Diagnostic::error(file, message)
                    .at(line_no, column)
                    .with_code("environment")
            };
            let Some(end) = tail.find('}') else {
                errors.push(error(
                    "unterminated `${`: write `${NAME}`, or `$${` for a literal `${`".into(),
                ));
                out.push_str(tail);
                rest = "";
                break;
            };
            let reference = &tail[2..end];
            let (name, default) = match reference.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (reference, None),
            };
            if !is_variable_name(name) {
                errors.push(error(format!(
                    "invalid environment variable name \"{name}\""
                )));
            } else {
                match (env(name).filter(|v| !v.is_empty()), default) {
                    (Some(value), _) if value.contains(['\n', '\r']) => errors.push(error(format!(
                        "environment variable {name} holds a line break, which a flow value cannot"
                    ))),
                    (Some(value), _) => out.push_str(&value),
                    (None, Some(default)) => out.push_str(default),
                    (None, None) => errors.push(
                        error(format!("environment variable {name} is not set and has no default"))
                            .with_hint(format!("set {name}, or give a default: `${{{name}:-default}}`")),
                    ),
                }
            }
            column += tail[..=end].chars().count() as u64;
            rest = &tail[end + 1..];
        }
        out.push_str(rest);
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "LAB_URL" => Some("http://lab.test".into()),
            "EMPTY" => Some(String::new()),
            "MULTI" => Some("a\nb".into()),
            _ => None,
        }
    }

    fn run(text: &str) -> Result<String, Vec<String>> {
        interpolate(Path::new("f.yaml"), text, &env)
            .map_err(|d| d.into_iter().map(|d| d.to_string()).collect())
    }

    #[test]
    fn hidden_folders_are_passed_over() {
        // A ConfigMap mounted by Kubernetes: each file beside a hidden copy of it.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("..data")).unwrap();
        for file in ["a.yaml", "..data/a.yaml", ".b.yaml", "a.test.yaml"] {
            std::fs::write(dir.path().join(file), "").unwrap();
        }
        let (mut files, mut tests) = (Vec::new(), 0);
        find_flow_files(dir.path(), &mut files, &mut tests).unwrap();
        assert_eq!((files, tests), (vec![dir.path().join("a.yaml")], 1));
    }

    #[test]
    fn substitutes_values_and_defaults() {
        assert_eq!(
            run("url: ${LAB_URL}/orders").unwrap(),
            "url: http://lab.test/orders"
        );
        assert_eq!(run("url: ${NOPE:-http://x}").unwrap(), "url: http://x");
        assert_eq!(run("v: ${EMPTY:-d}").unwrap(), "v: d");
        assert_eq!(run("p: $.body.x $${LIT}").unwrap(), "p: $.body.x ${LIT}");
    }

    #[test]
    fn reports_every_unset_variable_with_its_position() {
        let errors = run("a: 1\nurl: ${A}/x/${B}\n").unwrap_err();
        assert_eq!(errors.len(), 2);
        assert!(errors[0].starts_with("f.yaml:2:6: error: environment variable A is not set"));
        assert!(errors[1].starts_with("f.yaml:2:13: error: environment variable B"));
    }

    #[test]
    fn comment_lines_are_left_alone() {
        assert_eq!(
            run("# set ${UNSET} first\nurl: ${LAB_URL}\n").unwrap(),
            "# set ${UNSET} first\nurl: http://lab.test\n"
        );
    }

    #[test]
    fn refuses_line_breaks_and_bad_names() {
        assert!(run("x: ${MULTI}").unwrap_err()[0].contains("line break"));
        assert!(run("x: ${1A}").unwrap_err()[0].contains("invalid environment variable name"));
        assert!(run("x: ${A").unwrap_err()[0].contains("unterminated"));
    }
}
