//! The module graph of `src/`: no module imports one of a higher layer, and no modules
//! import each other in a cycle. The layers are `src/lib.rs`'s layout map; this test reads
//! every `crate::` path in the code (comments and unit tests left out) and checks each
//! against them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::util::repo;

/// Each top-level module of `src/` and its layer: a module may use its own layer and those
/// below, never those above.
const LAYERS: &[(&str, u8)] = &[
    // Foundations: what everything speaks.
    ("redact", 0),
    ("fault", 0),
    ("diagnostic", 0),
    ("retry", 0),
    ("message", 0),
    ("observe", 0),
    ("hl7", 0),
    ("tls", 0),
    // The flow format, errors, and the leaf compilers.
    ("error", 1),
    ("config", 1),
    ("jsonpath", 1),
    ("json", 1),
    ("template", 1),
    ("schema", 1),
    // What compiling a component needs.
    ("compile", 2),
    // Components: each compiles its own part of a flow.
    ("auth", 3),
    ("steps", 3),
    ("store", 3),
    ("handoff", 3),
    ("queue", 3),
    ("mllp", 3),
    ("targets", 3),
    // A compiled flow, and the project compiler.
    ("flow", 4),
    ("project", 5),
    // The message path, and the workers that drive it.
    ("engine", 6),
    ("delivery", 7),
    ("consume", 7),
    ("runtime", 8),
    // What serves and tests it.
    ("server", 9),
    ("mllp_server", 9),
    ("openapi", 9),
    ("lsp", 9),
    ("admin", 9),
    ("session", 9),
    ("console", 9),
    ("reload", 10),
    ("testing", 9),
    ("demo", 11),
    ("cli", 12),
];

/// The top-level modules each file of `src/` uses, by module.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = Vec::new();
    collect(&repo().join("src"), &mut files);
    for file in files {
        let relative = file.strip_prefix(repo().join("src")).unwrap();
        let module = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let used = graph.entry(module.clone()).or_default();
        for line in code.lines() {
            let line = line.trim_start();
            if line.starts_with("//") {
                continue;
            }
            let mut rest = line;
            while let Some(at) = rest.find("crate::") {
                rest = &rest[at + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if rest.starts_with('{') {
                    // `use crate::{a, b::c}`: each name before its `::`.
                    let list = &rest[1..rest.find('}').unwrap_or(rest.len())];
                    for item in list.split(',') {
                        let item = item.trim();
                        let first = item.split("::").next().unwrap_or_default().trim();
                        if !first.is_empty() && first != module {
                            used.insert(first.to_owned());
                        }
                    }
                } else if !name.is_empty() && name != module {
                    used.insert(name);
                }
            }
        }
    }
    graph
}

fn collect(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

#[test]
fn modules_import_only_their_own_layer_and_those_below_and_no_cycle() {
    let layers: BTreeMap<&str, u8> = LAYERS.iter().copied().collect();
    let graph = graph();
    let mut wrong = Vec::new();
    for (module, used) in &graph {
        let Some(own) = layers.get(module.as_str()) else {
            wrong.push(format!(
                "module `{module}` has no layer: add it to LAYERS and lib.rs's map"
            ));
            continue;
        };
        for name in used {
            match layers.get(name.as_str()) {
                Some(layer) if layer <= own => {}
                Some(layer) => wrong.push(format!(
                    "`{module}` (layer {own}) uses `{name}` (layer {layer})"
                )),
                None => wrong.push(format!("`{module}` uses `{name}`, which has no layer")),
            }
        }
    }
    // Within a layer, no cycle either: a depth-first search for a back edge.
    fn visit<'a>(
        node: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
        cycles: &mut Vec<String>,
    ) {
        if let Some(start) = path.iter().position(|n| *n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node);
            cycles.push(cycle.join(" → "));
            return;
        }
        if !done.insert(node) {
            return;
        }
        path.push(node);
        for next in graph.get(node).into_iter().flatten() {
            visit(next, graph, path, done, cycles);
        }
        path.pop();
    }
    let mut cycles = Vec::new();
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        visit(module, &graph, &mut Vec::new(), &mut done, &mut cycles);
    }
    wrong.extend(cycles.into_iter().map(|c| format!("cycle: {c}")));
    assert!(
        wrong.is_empty(),
        "the module graph breaks its layers:\n{}",
        wrong.join("\n")
    );
    // Every module of lib.rs is in the map.
    let lib = std::fs::read_to_string(repo().join("src/lib.rs")).unwrap();
    for (module, _) in LAYERS {
        assert!(
            lib.contains(&format!("pub mod {module};")),
            "`{module}` is in LAYERS but not a module of lib.rs"
        );
        assert!(
            lib.contains(&format!("[`{module}`]")),
            "lib.rs's layout map does not describe `{module}`"
        );
    }
}
