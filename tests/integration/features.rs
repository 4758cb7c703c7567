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
async fn hl7_v2_bodies_are_read_into_json_and_rendered_with_every_value_escaped() {
    let sink = Partner::start(200, json!({})).await;
    let ferry = features(&[("SINK_URL", &sink.url)]).await;
    let client = reqwest::Client::new();

    // JSON in, ER7 out: a value holding delimiters and a line break stays one value.
    let order = json!({
        "control_id": "CTRL-1",
        "customer_id": "CUST-7",
        "family": "Doe|X^Y~Z&W\\",
        "given": "Jane\rPID|2||EVIL",
        "portal_ref": "PR-2026-0417",
    });
    let (status, reply) = post_json(&format!("{}/exports/hl7", ferry.url), &order).await;
    assert_eq!(status, 200, "{reply}");
    let sent = &sink.received()[0];
    assert_eq!(sent.headers["content-type"], "x-application/hl7-v2+er7");
    assert_eq_text!(
        "MSH|^~\\&|FERRY|PORTAL|LAB|HELIX|20260417120000||OML^O21^OML_O21|CTRL-1|P|2.5.1\r\
         PID|1||CUST-7^^^PORTAL||Doe\\F\\X\\S\\Y\\R\\Z\\T\\W\\E\\^Jane\\X0D\\PID\\F\\2\\F\\\\F\\EVIL\r\
         ORC|NW|PR-2026-0417\r",
        String::from_utf8_lossy(&sent.body)
    );
    let read = ferry::hl7::parse(&String::from_utf8_lossy(&sent.body)).unwrap();
    assert_eq!(
        read["PID"].as_array().unwrap().len(),
        1,
        "no segment was added"
    );
    assert_eq!(read["PID"][0]["5"]["1"], "Doe|X^Y~Z&W\\");
    assert_eq!(read["PID"][0]["5"]["2"], "Jane\rPID|2||EVIL");

    // ER7 in, validated against a schema, JSON out.
    let oru = "MSH|^~\\&|LAB|HELIX|FERRY|PORTAL|20260417130000||ORU^R01|MSG-9|P|2.5.1\r\
               PID|1||CUST-7^^^PORTAL\r\
               OBR|1|PR-2026-0417|LAB-88\r\
               OBX|1|NM|HGB^Hemoglobin||13.5|g/dL\r\
               OBX|2|ST|NOTE^Note||A \\T\\ B\r";
    let post = |body: &'static str, content_type: &'static str| {
        client
            .post(format!("{}/results/hl7", ferry.url))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let response = post(oru, "x-application/hl7-v2+er7").await.unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let results: serde_json::Value = serde_json::from_slice(&sink.received()[1].body).unwrap();
    assert_eq!(
        results,
        json!({
            "portal_ref": "PR-2026-0417",
            "control_id": "MSG-9",
            "results": [
                {"code": "HGB", "value": "13.5", "unit": "g/dL"},
                {"code": "NOTE", "value": "A & B"},
            ],
        })
    );

    // A message the schema refuses, and one that is not ER7: each says why, nothing is sent.
    let response = post(
        "MSH|^~\\&|LAB|HELIX|||||ADT^A01|MSG-10\rOBR|1|X\rOBX|1|NM|A||1\r",
        "x-application/hl7-v2+er7",
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 422);
    let refused: serde_json::Value = response.json().await.unwrap();
    assert_eq!(refused["details"][0]["pointer"], "/MSH/0/9/1", "{refused}");
    let response = post("MSH|^~\\&|A\rOBX|1|ST|||open \\F\r", "application/hl7-v2")
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let malformed: serde_json::Value = response.json().await.unwrap();
    assert_eq!(malformed["error"], "malformed_hl7");
    assert!(
        malformed["message"]
            .as_str()
            .unwrap()
            .contains("segment 2 (OBX), field 5: the escape sequence"),
        "{malformed}"
    );
    assert_eq!(sink.received().len(), 2);
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
