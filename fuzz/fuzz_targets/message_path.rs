//! Arbitrary bytes as a request body for every shipped flow: strict JSON reading, then each
//! flow's steps and its target's request rendering must refuse or succeed, never panic.
#![no_main]

use std::sync::OnceLock;

use ferry::project::{Project, ProjectPaths, load_with_env};
use ferry::message::{Message, Meta};
use libfuzzer_sys::fuzz_target;

fn project() -> &'static Project {
    static PROJECT: OnceLock<Project> = OnceLock::new();
    PROJECT.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let paths = ProjectPaths::many(&[root.join("flows")], &[]);
        let env = |name: &str| match name {
            "PORTAL_API_KEY" | "LAB_WEBHOOK_SECRET" => Some("fuzz".to_owned()),
            _ => None,
        };
        load_with_env(&paths, &env).expect("the shipped flows load")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(body) = ferry::json::parse(data, ferry::json::DEFAULT_MAX_DEPTH) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    for flow in &project().flows {
        let mut message = Message::new(body.clone(), Meta::new(&flow.name));
        let Ok(processed) = runtime.block_on(flow.run_steps(&mut message, None)) else {
            continue;
        };
        for &index in &processed.targets {
            if let ferry::targets::Target::Http(http) = &flow.targets()[index] {
                let _ = http.prepare(&message, flow.templates());
            }
        }
    }
});
