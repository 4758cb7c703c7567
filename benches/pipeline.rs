//! The cost of one Test Request through the shipped portal-to-lab flow, without the network:
//! parse, validate, transform, validate the lab order, render the lab request and the reply.
//!
//! The baseline parses and serializes the same body and nothing else, so the pipeline's own
//! cost reads as a ratio of the two, measured in the same run.
#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ferry::message::{Message, Meta};
use ferry::project::{ProjectPaths, load_with_env};
use serde_json::Value;

fn portal_to_lab(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let paths = ProjectPaths::new(&root.join("flows"), None);
    let project = load_with_env(&paths, &|_| None).expect("the shipped flows load");
    let flow = project
        .flow("portal-to-lab")
        .expect("portal-to-lab is shipped");
    let body = std::fs::read(root.join("tests/fixtures/payloads/test-request.json")).unwrap();

    let mut group = c.benchmark_group("portal-to-lab");
    group.throughput(Throughput::Elements(1));
    group.bench_function("baseline: parse + serialize", |b| {
        b.iter(|| {
            let value: Value = serde_json::from_slice(black_box(&body)).unwrap();
            black_box(serde_json::to_vec(&value).unwrap())
        });
    });
    // The steps are async (a correlation lookup may read the store); without a store, the
    // correlate step's save only records what to write, so this measures the pipeline alone.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    group.bench_function("pipeline: parse + steps + request + reply", |b| {
        b.iter(|| {
            let value: Value = serde_json::from_slice(black_box(&body)).unwrap();
            let mut message = Message::new(value, Meta::new(&flow.name));
            let processed = runtime
                .block_on(flow.run_steps(&mut message, None))
                .unwrap();
            let ferry::targets::Target::Http(target) = &flow.targets()[processed.targets[0]] else {
                unreachable!("portal-to-lab delivers over HTTP")
            };
            let request = flow.prepare(target, &message).unwrap();
            let reply = flow.render_reply(&message).unwrap();
            black_box((request, serde_json::to_vec(&reply.body).unwrap()))
        });
    });
    group.finish();
}

criterion_group!(benches, portal_to_lab);
criterion_main!(benches);
