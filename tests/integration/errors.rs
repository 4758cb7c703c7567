//! Every error ferry answers has the shape `{"error", "message", "details"}` and a stable
//! status; a refused message is never forwarded.

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::util::{Ferry, Partner, payload, post_json};

fn assert_error_shape(body: &Value, code: &str) {
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(body["details"].is_array(), "{body}");
}

async fn send(
    url: &str,
    method: reqwest::Method,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (u16, Value) {
    let mut request = crate::util::client().request(method, url).body(body);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test]
async fn malformed_requests_get_4xx_and_nothing_is_forwarded() {
    let lab = Partner::start(201, json!({})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = Ferry::shipped(&lab, &portal).await;
    let url = format!("{}/api/v1/test-requests", ferry.url);
    let post = reqwest::Method::POST;

    let (status, body) = send(
        &url,
        post.clone(),
        Some("application/json"),
        b"{\"portal_ref\": ".to_vec(),
    )
    .await;
    assert_eq!(status, 400);
    assert_error_shape(&body, "malformed_json");
    assert_eq!(body["details"], json!([{"line": 1, "column": 15}]));

    let (status, body) = send(&url, post.clone(), Some("text/plain"), b"{}".to_vec()).await;
    assert_eq!(status, 415);
    assert_error_shape(&body, "unsupported_media_type");

    let mut big = b"{\"notes\": \"".to_vec();
    big.resize(1024 * 1024 + 1, b'a');
    let (status, body) = send(&url, post.clone(), Some("application/json"), big).await;
    assert_eq!(status, 413);
    assert_error_shape(&body, "payload_too_large");
    assert_eq!(body["details"], json!([{"limit_bytes": 1_048_576}]));

    let (status, body) = send(
        &format!("{}/api/v1/nowhere", ferry.url),
        post.clone(),
        None,
        Vec::new(),
    )
    .await;
    assert_eq!(status, 404);
    assert_error_shape(&body, "not_found");

    let (status, body) = send(&url, reqwest::Method::DELETE, None, Vec::new()).await;
    assert_eq!(status, 405);
    assert_error_shape(&body, "method_not_allowed");

    assert!(lab.received().is_empty(), "nothing may reach the lab");
}

#[tokio::test]
async fn a_body_streamed_past_the_limit_without_length_is_refused() {
    let lab = Partner::start(201, json!({})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = Ferry::shipped(&lab, &portal).await;
    let address = ferry.url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let head = "POST /api/v1/test-requests HTTP/1.1\r\nhost: ferry\r\nx-api-key: test-portal-key\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b' '; 64 * 1024];
    for _ in 0..17 {
        let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
        framed.extend_from_slice(&chunk);
        framed.extend_from_slice(b"\r\n");
        if stream.write_all(&framed).await.is_err() {
            break; // ferry may answer and close before the last chunk
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"payload_too_large\""), "{answer}");
    assert!(lab.received().is_empty());
}

#[tokio::test]
async fn schema_violations_are_all_listed_with_json_pointers() {
    let lab = Partner::start(201, json!({})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = Ferry::shipped(&lab, &portal).await;
    let mut request = payload("test-request.json");
    request["customer"]["email"] = json!("not-an-email");
    request["tests"][1]["priority"] = json!("yesterday");
    request["samples"][0]
        .as_object_mut()
        .unwrap()
        .remove("matrix");
    request["extra"] = json!(true);

    let (status, body) = post_json(&format!("{}/api/v1/test-requests", ferry.url), &request).await;
    assert_eq!(status, 422);
    assert_error_shape(&body, "validation_failed");
    let mut pointers: Vec<&str> = body["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["pointer"].as_str().unwrap())
        .collect();
    pointers.sort_unstable();
    assert_eq!(
        pointers,
        [
            "",
            "/customer/email",
            "/samples/0/matrix",
            "/tests/1/priority"
        ],
        "{body:#}"
    );
    for detail in body["details"].as_array().unwrap() {
        assert!(!detail["message"].as_str().unwrap().is_empty());
        assert_eq!(detail["schema"], "test-request.schema.json");
    }
    assert!(
        lab.received().is_empty(),
        "an invalid request must not reach the lab"
    );
}

#[tokio::test]
async fn synchronous_target_failures_answer_502_without_internal_details() {
    let north = Partner::start(500, json!({"error": "database on fire"})).await;
    let ferry = crate::util::features(&[("NORTH_URL", &north.url)]).await;
    let url = format!("{}/partners/p/orders?mode=m", ferry.url);
    let order = json!({"lab": "north", "tests": []});

    let (status, body) = post_json(&url, &order).await;
    assert_eq!(status, 502);
    assert_error_shape(&body, "target_failed");
    assert_eq!(body["details"], json!([{"target": "north", "status": 500}]));
    assert!(!body.to_string().contains("database on fire"));

    north.set_reply(400, json!({"error": "unknown test code"}));
    let (status, body) = post_json(&url, &order).await;
    assert_eq!(status, 502);
    assert_eq!(body["details"], json!([{"target": "north", "status": 400}]));
    assert_eq!(north.received().len(), 2);
}

#[tokio::test]
async fn an_unreachable_synchronous_target_answers_502() {
    // Bind a port, then free it, so nothing listens there.
    let free = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let ferry = crate::util::features(&[("NORTH_URL", &format!("http://{free}"))]).await;
    let (status, body) = post_json(
        &format!("{}/partners/p/orders?mode=m", ferry.url),
        &json!({"lab": "north"}),
    )
    .await;
    assert_eq!(status, 502);
    assert_error_shape(&body, "target_failed");
    assert_eq!(
        body["details"],
        json!([{"target": "north", "status": null}])
    );
    assert!(
        !body.to_string().contains(&free.to_string()),
        "the target's address stays internal"
    );
}
