//! The cost of reshaping a large Test Request (50 samples, 200 tests) into a partner's format
//! with a structural template that uses every construct — `$each` with `$as`, `$where`,
//! `$value` and `$flatten`, `$if`, optional keys, a table, text, number, date-time and array
//! helpers, `@position` — beside the same mapping written by hand in Rust with serde structs.
//! Both start from the parsed body and end with the output as a JSON value; the template's
//! cost reads as the ratio of the two, measured in the same run.
#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ferry::message::{Message, Meta};
use ferry::project::{ProjectPaths, load_with_env};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

const FLOW: &str = r#"
name: reshape
trigger:
  http: { method: POST, path: /reshape, auth: none }
tables:
  urgency: { routine: RT, urgent: ST }
steps:
  - transform:
      body:
        submission:
          reference: "{{body.portal_ref}}"
          account_name: "{{upper (trim body.customer.name)}}"
          contact?: "{{body.customer.email}}"
          remarks?: "{{body.notes}}"
        specimens:
          $each: "{{body.samples}}"
          $as: sample
          barcode: "{{sample.sample_id}}"
          matrix: "{{upper sample.matrix}}"
          collected: "{{datetime sample.collected_at '%Y%m%d%H%M%S' 'UTC'}}"
          volume_ml?: "{{number sample.volume_ml}}"
          analyses:
            $each: "{{body.tests}}"
            $as: test
            $where: "{{eq test.sample_id sample.sample_id}}"
            $value: "{{test.code}}"
        analyses:
          $each: "{{body.samples}}"
          $as: sample
          $flatten: true
          $value:
            $each: "{{body.tests}}"
            $as: test
            $where: "{{eq test.sample_id sample.sample_id}}"
            line: "{{@position}}"
            analysis: "{{test.code}}"
            urgency: "{{table 'urgency' test.priority 'RT'}}"
        summary:
          count: "{{count body.tests}}"
          volume: "{{sum body.samples.volume_ml}}"
          stat: "{{includes body.tests.priority 'urgent'}}"
          size:
            $if: "{{gt (count body.tests) 100}}"
            $then: { large: true }
            $else: { large: false }
"#;

/// A Test Request with `samples` samples and four tests each, some without a priority.
fn request(samples: usize) -> Value {
    let samples_json: Vec<Value> = (0..samples)
        .map(|n| {
            let mut sample = json!({
                "sample_id": format!("S-{n}"),
                "matrix": if n % 2 == 0 { "water" } else { "soil" },
                "collected_at": "2026-11-20T09:30:00+02:00",
            });
            if n % 3 != 0 {
                sample["volume_ml"] = json!(250 + n);
            }
            sample
        })
        .collect();
    let tests: Vec<Value> = (0..samples * 4)
        .map(|n| {
            let mut test =
                json!({"code": format!("T{}", n % 7), "sample_id": format!("S-{}", n / 4)});
            match n % 3 {
                0 => test["priority"] = json!("urgent"),
                1 => test["priority"] = json!("routine"),
                _ => {}
            }
            test
        })
        .collect();
    json!({
        "portal_ref": "PR-2026-0420",
        "customer": {"id": "C-1", "name": "  Riverside Water Board ", "email": "lab@riverside.example"},
        "samples": samples_json,
        "tests": tests,
    })
}

#[derive(Deserialize)]
struct Input {
    portal_ref: String,
    customer: Customer,
    samples: Vec<Sample>,
    tests: Vec<Test>,
    notes: Option<String>,
}

#[derive(Deserialize)]
struct Customer {
    name: String,
    email: Option<String>,
}

#[derive(Deserialize)]
struct Sample {
    sample_id: String,
    matrix: String,
    collected_at: String,
    volume_ml: Option<i64>,
}

#[derive(Deserialize)]
struct Test {
    code: String,
    sample_id: String,
    priority: Option<String>,
}

#[derive(Serialize)]
struct Output {
    submission: Submission,
    specimens: Vec<Specimen>,
    analyses: Vec<Analysis>,
    summary: Summary,
}

#[derive(Serialize)]
struct Submission {
    reference: String,
    account_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    contact: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remarks: Option<String>,
}

#[derive(Serialize)]
struct Specimen {
    barcode: String,
    matrix: String,
    collected: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    volume_ml: Option<i64>,
    analyses: Vec<String>,
}

#[derive(Serialize)]
struct Analysis {
    line: usize,
    analysis: String,
    urgency: &'static str,
}

#[derive(Serialize)]
struct Summary {
    count: usize,
    volume: i64,
    stat: bool,
    size: Size,
}

#[derive(Serialize)]
struct Size {
    large: bool,
}

/// The same mapping, by hand.
fn by_hand(body: &Value) -> Value {
    let input = Input::deserialize(body).unwrap();
    let utc = |text: &str| {
        let instant: jiff::Timestamp = text.parse().unwrap();
        instant.strftime("%Y%m%d%H%M%S").to_string()
    };
    let specimens = input
        .samples
        .iter()
        .map(|s| Specimen {
            barcode: s.sample_id.clone(),
            matrix: s.matrix.to_uppercase(),
            collected: utc(&s.collected_at),
            volume_ml: s.volume_ml,
            analyses: input
                .tests
                .iter()
                .filter(|t| t.sample_id == s.sample_id)
                .map(|t| t.code.clone())
                .collect(),
        })
        .collect();
    let mut analyses = Vec::new();
    for sample in &input.samples {
        let tests = input
            .tests
            .iter()
            .filter(|t| t.sample_id == sample.sample_id);
        for (index, test) in tests.enumerate() {
            analyses.push(Analysis {
                line: index + 1,
                analysis: test.code.clone(),
                urgency: match test.priority.as_deref() {
                    Some("urgent") => "ST",
                    _ => "RT",
                },
            });
        }
    }
    let output = Output {
        submission: Submission {
            reference: input.portal_ref.clone(),
            account_name: input.customer.name.trim().to_uppercase(),
            contact: input.customer.email.clone(),
            remarks: input.notes.clone(),
        },
        specimens,
        analyses,
        summary: Summary {
            count: input.tests.len(),
            volume: input.samples.iter().filter_map(|s| s.volume_ml).sum(),
            stat: input
                .tests
                .iter()
                .any(|t| t.priority.as_deref() == Some("urgent")),
            size: Size {
                large: input.tests.len() > 100,
            },
        },
    };
    serde_json::to_value(output).unwrap()
}

fn mapping(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("flows")).unwrap();
    std::fs::write(dir.path().join("flows/reshape.yaml"), FLOW).unwrap();
    let paths = ProjectPaths::new(&dir.path().join("flows"), None);
    let project = load_with_env(&paths, &|_| None).expect("the flow loads");
    let flow = project.flow("reshape").unwrap();
    let body = request(50);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let template = |body: &Value| {
        let mut message = Message::new(body.clone(), Meta::new("reshape"));
        runtime
            .block_on(flow.run_steps(&mut message, None))
            .unwrap();
        message.body().clone()
    };
    // Same input, same output: the comparison is of equals.
    assert_eq!(
        template(&body),
        by_hand(&body),
        "the template and the hand-written mapping disagree"
    );

    let mut group = c.benchmark_group("mapping 50 samples, 200 tests");
    group.throughput(Throughput::Elements(1));
    group.bench_function("baseline: serde structs by hand", |b| {
        b.iter(|| black_box(by_hand(black_box(&body))));
    });
    // The message is made outside the timing: in `serve`, the parsed body becomes the
    // message as it is, with no copy.
    group.bench_function("structural template, every construct", |b| {
        b.iter_batched(
            || Message::new(body.clone(), Meta::new("reshape")),
            |mut message| {
                runtime
                    .block_on(flow.run_steps(&mut message, None))
                    .unwrap();
                black_box(message)
            },
            criterion::BatchSize::SmallInput,
        );
    });
    group.finish();
}

criterion_group!(benches, mapping);
criterion_main!(benches);
