//! `ferry lsp` driven as an editor drives it: LSP messages over the child's stdin and stdout.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::util::repo;

/// A running `ferry lsp` and what it sent that no request asked for.
struct Editor {
    child: Child,
    stdin: ChildStdin,
    incoming: mpsc::Receiver<Value>,
    next_id: u64,
}

impl Editor {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .arg("lsp")
            .args(args)
            .current_dir(repo())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let (sender, incoming) = mpsc::channel();
        std::thread::spawn(move || {
            loop {
                let mut length = 0;
                loop {
                    let mut header = String::new();
                    if stdout.read_line(&mut header).unwrap_or(0) == 0 {
                        return;
                    }
                    let header = header.trim();
                    if header.is_empty() {
                        break;
                    }
                    if let Some(value) = header.strip_prefix("Content-Length: ") {
                        length = value.parse().unwrap();
                    }
                }
                let mut body = vec![0; length];
                stdout.read_exact(&mut body).unwrap();
                if sender.send(serde_json::from_slice(&body).unwrap()).is_err() {
                    return;
                }
            }
        });
        let mut editor = Self {
            child,
            stdin,
            incoming,
            next_id: 0,
        };
        let capabilities = editor.request("initialize", &json!({"capabilities": {}}));
        assert_eq!(capabilities["capabilities"]["hoverProvider"], true);
        editor.notify("initialized", &json!({}));
        editor
    }

    fn send(&mut self, message: &Value) {
        let body = message.to_string();
        write!(self.stdin, "Content-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        self.stdin.flush().unwrap();
    }

    fn notify(&mut self, method: &str, params: &Value) {
        self.send(&json!({"jsonrpc": "2.0", "method": method, "params": params}));
    }

    fn next(&self) -> Value {
        self.incoming
            .recv_timeout(Duration::from_secs(20))
            .expect("ferry lsp answered nothing in 20 s")
    }

    fn request(&mut self, method: &str, params: &Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        loop {
            let message = self.next();
            if message["id"] == id {
                return message["result"].clone();
            }
        }
    }

    /// The next diagnostics published for `uri`.
    fn diagnostics(&self, uri: &str) -> Vec<Value> {
        loop {
            let message = self.next();
            if message["method"] == "textDocument/publishDiagnostics"
                && message["params"]["uri"] == uri
            {
                return message["params"]["diagnostics"].as_array().unwrap().clone();
            }
        }
    }

    /// The labels of the completions at `(line, character)` of `uri`.
    fn completions(&mut self, uri: &str, (line, character): (usize, usize)) -> Vec<String> {
        let result = self.request(
            "textDocument/completion",
            &json!({"textDocument": {"uri": uri}, "position": position((line, character))}),
        );
        result["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["label"].as_str().unwrap().to_owned())
            .collect()
    }
}

const FLOW: &str = "name: orders
trigger:
  http: { method: POST, path: /orders, auth: none }
steps:
  - validate: { schema: test-request.schema.json }
  - set:
      ref: $.body.portal_ref
  - transform:
      body:
        ref: \"{{upper body.portal_ref}}\"
        who: \"{{body.customer.name}}\"
        seen: \"{{vars.ref}}\"
targets:
  lab:
    http: { url: \"http://lab.example/orders\", timout: 5s }
";

/// The place in [`FLOW`] just after the first `needle` (its line, and its end on that line).
fn after(needle: &str) -> (usize, usize) {
    FLOW.lines()
        .enumerate()
        .find_map(|(line, text)| Some((line, text.find(needle)? + needle.len())))
        .unwrap_or_else(|| panic!("{needle} is not in the flow"))
}

fn position((line, character): (usize, usize)) -> Value {
    json!({"line": line, "character": character})
}

#[test]
fn an_editor_gets_diagnostics_as_it_types_and_completion_and_hover_inside_templates() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("orders.yaml");
    std::fs::write(&file, "name: orders\n").unwrap();
    let uri = reqwest::Url::from_file_path(&file).unwrap().to_string();
    let mut editor = Editor::start(&["--schemas", "schemas"]);

    // Unsaved text is checked as `ferry check` would check it, each problem at its place.
    editor.notify(
        "textDocument/didOpen",
        &json!({"textDocument": {"uri": uri, "languageId": "yaml", "version": 1, "text": FLOW}}),
    );
    let found = editor.diagnostics(&uri);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["code"], "unknown-key");
    let (line, end) = after("timout");
    assert_eq!(
        found[0]["range"]["start"],
        json!({"line": line, "character": end - 6})
    );
    assert_eq!(
        found[0]["range"]["end"],
        json!({"line": line, "character": end})
    );
    assert!(
        found[0]["message"]
            .as_str()
            .unwrap()
            .contains("did you mean `timeout`?")
    );

    // Fixed as you type: the diagnostics clear.
    let fixed = FLOW.replace("timout", "timeout");
    editor.notify(
        "textDocument/didChange",
        &json!({"textDocument": {"uri": uri, "version": 2}, "contentChanges": [{"text": fixed}]}),
    );
    assert_eq!(editor.diagnostics(&uri), Vec::<Value>::new());

    // Inside `{{…}}`: the fields of the schema in force, level by level, vars set earlier,
    // helpers.
    let body = editor.completions(&uri, after("{{upper body."));
    assert!(body.contains(&"portal_ref".to_owned()), "{body:?}");
    assert!(body.contains(&"customer".to_owned()), "{body:?}");
    let customer = editor.completions(&uri, after("{{body.customer."));
    assert!(customer.contains(&"name".to_owned()), "{customer:?}");
    assert!(!customer.contains(&"portal_ref".to_owned()), "{customer:?}");
    assert!(
        editor
            .completions(&uri, after("{{vars."))
            .contains(&"ref".to_owned())
    );
    let roots = editor.completions(&uri, after("ref: \"{{"));
    for expected in ["upper", "coalesce", "body", "vars", "meta"] {
        assert!(
            roots.contains(&expected.to_owned()),
            "{expected}: {roots:?}"
        );
    }
    // Flow keys: a step's kinds, a target's keys, schema files.
    let kinds = editor.completions(&uri, (after("  - set").0, 4));
    assert!(kinds.contains(&"transform".to_owned()), "{kinds:?}");
    let http = editor.completions(&uri, after("    http: { "));
    assert!(http.contains(&"capture".to_owned()), "{http:?}");
    let schemas = editor.completions(&uri, after("schema: "));
    assert!(
        schemas.contains(&"test-result.schema.json".to_owned()),
        "{schemas:?}"
    );

    // Hover: what a helper does, what a key means.
    let hover = editor.request(
        "textDocument/hover",
        &json!({"textDocument": {"uri": uri}, "position": position(after("{{up"))}),
    );
    let text = hover["contents"]["value"].as_str().unwrap_or_default();
    assert!(text.contains("the text in upper case"), "{hover}");
    let hover = editor.request("textDocument/hover", &json!({"textDocument": {"uri": uri}, "position": position((after(" path").0, after(" path").1 - 2))}),
    );
    let text = hover["contents"]["value"].as_str().unwrap_or_default();
    assert!(text.contains("Path, starting with"), "{hover}");

    let hover = editor.request(
        "textDocument/hover",
        &json!({"textDocument": {"uri": uri}, "position": position(after("schema: test-req"))}),
    );
    let text = hover["contents"]["value"].as_str().unwrap_or_default();
    assert!(text.contains("**Test Request**"), "{hover}");

    editor.request("shutdown", &Value::Null);
    editor.notify("exit", &Value::Null);
    let status = editor.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}
