//! Flow features beyond the shipped flows: routing, path and query parameters in templates,
//! response capture, text templates, and flows without targets.

use serde_json::json;

use crate::util::{Partner, features, post_json};

#[tokio::test]
async fn route_picks_the_target_by_content_and_templates_read_path_parameters() {
    let north = Partner::start(200, json!({"receipt": "N-1"})).await;
    let metals = Partner::start(200, json!({})).await;
    let south = Partner::start(200, json!({})).await;
    let ferry = features(&[
        ("NORTH_URL", &north.url),
        ("METALS_URL", &metals.url),
        ("SOUTH_URL", &south.url),
    ])
    .await;

    // An equality condition, a path parameter percent-encoded in the URL, captured fields.
    let response = reqwest::Client::new()
        .post(format!(
            "{}/partners/acme%2F..%3Fx/orders?mode=fast",
            ferry.url
        ))
        .json(&json!({"lab": "north", "tests": [{"code": "PH"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert!(response.headers().contains_key("x-request-id"));
    let reply: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        reply,
        json!({"partner": "acme/..?x", "receipt": "N-1", "codes": ["PH"]})
    );
    let got = &north.received()[0];
    assert_eq!(
        got.path, "/in/acme%2F..%3Fx/orders",
        "a value cannot add path segments or a query"
    );
    assert_eq!(got.headers["x-partner"], "acme/..?x");
    assert_eq!(got.headers["x-mode"], "fast");

    // A JSONPath filter condition.
    let (status, _) = post_json(
        &format!("{}/partners/p/orders", ferry.url),
        &json!({"tests": [{"code": "PB-ICPMS"}]}),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(metals.received().len(), 1);
    assert_eq!(metals.received()[0].method, "PUT");

    // An `in` condition.
    let (status, _) = post_json(
        &format!("{}/partners/p/orders", ferry.url),
        &json!({"lab": "east", "tests": []}),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(south.received().len(), 1);

    // No rule matches: refused, nothing sent.
    let (status, body) = post_json(
        &format!("{}/partners/p/orders", ferry.url),
        &json!({"lab": "west", "tests": []}),
    )
    .await;
    assert_eq!(status, 422);
    assert_eq!(body["error"], "no_route");
    assert_eq!(
        (
            north.received().len(),
            metals.received().len(),
            south.received().len()
        ),
        (1, 1, 1)
    );
}

#[tokio::test]
async fn text_templates_escape_values_for_csv_and_xml() {
    let sink = Partner::start(200, json!({})).await;
    let ferry = features(&[("SINK_URL", &sink.url)]).await;

    let rows = json!({"rows": [{"name": "Acme, \"Water\"", "code": "PH"}, {"name": "plain", "code": "PB"}]});
    let (status, reply) = post_json(&format!("{}/exports", ferry.url), &rows).await;
    assert_eq!(status, 200, "{reply}");
    let csv = &sink.received()[0];
    assert_eq!(csv.headers["content-type"], "text/csv");
    assert_eq_text!(
        "name,code\n\"Acme, \"\"Water\"\"\",PH\nplain,PB\n",
        String::from_utf8_lossy(&csv.body)
    );

    let (status, _) = post_json(
        &format!("{}/exports/xml", ferry.url),
        &json!({"name": "</name><admin>1</admin>&"}),
    )
    .await;
    assert_eq!(status, 200);
    let xml = &sink.received()[1];
    assert_eq!(xml.headers["content-type"], "application/xml");
    assert_eq_text!(
        "<order><name>&lt;/name&gt;&lt;admin&gt;1&lt;/admin&gt;&amp;</name></order>",
        String::from_utf8_lossy(&xml.body)
    );
}

#[tokio::test]
async fn a_flow_without_target_answers_from_the_message() {
    let sink = Partner::start(200, json!({})).await;
    let ferry = features(&[("SINK_URL", &sink.url)]).await;
    let response = reqwest::get(format!("{}/things/42?verbose=yes", ferry.url))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"id": "42", "verbose": "yes", "label": "thing 42"})
    );
}
