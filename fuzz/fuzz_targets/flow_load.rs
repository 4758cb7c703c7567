//! Arbitrary text as a flow file: loading and checking it must report, never panic.
#![no_main]

use std::sync::OnceLock;

use ferry::project::{ProjectPaths, load_with_env};
use libfuzzer_sys::fuzz_target;

fn project() -> &'static (tempfile::TempDir, ProjectPaths) {
    static PROJECT: OnceLock<(tempfile::TempDir, ProjectPaths)> = OnceLock::new();
    PROJECT.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let flows = dir.path().join("flows");
        std::fs::create_dir(&flows).unwrap();
        let schemas = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas");
        let paths = ProjectPaths::many(&[flows], &[schemas]);
        (dir, paths)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (dir, paths) = project();
    std::fs::write(dir.path().join("flows/fuzzed.yaml"), text).unwrap();
    let env = |name: &str| (name == "SET").then(|| "value".to_owned());
    let _ = load_with_env(paths, &env);
});
