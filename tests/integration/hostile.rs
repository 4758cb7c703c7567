//! The hostile input table: one row per bad input, each with the status and error code ferry
//! answers, and the proof that nothing was accepted or forwarded; then a flood of all of
//! them at once, after which ferry still answers a good request.

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::util::{Ferry, LAB_SECRET, PORTAL_KEY, Partner, payload, repo, webhook_headers};

/// How a row reaches ferry.
#[derive(Clone)]
enum Send {
    /// An HTTP request: method, path, headers, body.
    Http(&'static str, String, Vec<(&'static str, String)>, Vec<u8>),
    /// Bytes written to a socket as they are (for what HTTP clients refuse to send), after
    /// which the writing side is closed.
    Raw(Vec<u8>),
}

struct Row {
    name: &'static str,
    send: Send,
    status: u16,
    /// The error code, or `None` for a success.
    code: Option<&'static str>,
}

fn portal(body: Vec<u8>) -> Send {
    Send::Http(
        "POST",
        "/api/v1/test-requests".into(),
        vec![
            ("x-api-key", PORTAL_KEY.into()),
            ("content-type", "application/json".into()),
        ],
        body,
    )
}

fn lab(headers: Vec<(&'static str, String)>, body: Vec<u8>) -> Send {
    let mut headers = headers;
    headers.push(("content-type", "application/json".into()));
    Send::Http("POST", "/api/v1/lab-results".into(), headers, body)
}

fn jwt(claims: &Value, header: &Value) -> String {
    use base64::Engine as _;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!("{}.{}.", b64(header), b64(claims))
}

fn rows() -> Vec<Row> {
    let request = payload("test-request.json");
    let with = |f: &dyn Fn(&mut Value)| {
        let mut r = request.clone();
        f(&mut r);
        serde_json::to_vec(&r).unwrap()
    };
    let result = serde_json::to_vec(&payload("test-result.json")).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let stale = ferry::auth::webhook_headers(LAB_SECRET.as_bytes(), "msg_old", now - 3600, &result)
        .to_vec();
    let replayed = webhook_headers(LAB_SECRET, br#"{"replayed": true}"#);
    let expired = {
        let key =
            jsonwebtoken::EncodingKey::from_secret(b"jwt-test-secret-0123456789abcdef").unwrap();
        let claims = json!({"iss": "https://idp.example", "aud": "ferry", "exp": now - 3600, "scope": "results:write"});
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
    };
    let unsigned = jwt(
        &json!({"iss": "https://idp.example", "aud": "ferry", "exp": now + 3600, "scope": "results:write"}),
        &json!({"alg": "none", "typ": "JWT"}),
    );
    let bearer = |token: String| {
        Send::Http(
            "POST",
            "/jwt".into(),
            vec![("authorization", format!("Bearer {token}"))],
            Vec::new(),
        )
    };
    let callback = |url: &str| {
        Send::Http(
            "POST",
            "/callback".into(),
            vec![("content-type", "application/json".into())],
            serde_json::to_vec(&json!({"callback_url": url})).unwrap(),
        )
    };
    let huge_head = b"POST /api/v1/test-requests HTTP/1.1\r\nhost: ferry\r\nx-api-key: test-portal-key\r\ncontent-type: application/json\r\ncontent-length: 100000000\r\n\r\n{\"portal_ref\": \"".to_vec();
    let truncated = b"POST /api/v1/test-requests HTTP/1.1\r\nhost: ferry\r\nx-api-key: test-portal-key\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"portal_ref\": \"PR-".to_vec();
    vec![
        Row {
            name: "malformed JSON",
            send: portal(b"{\"portal_ref\": }".to_vec()),
            status: 400,
            code: Some("malformed_json"),
        },
        Row {
            name: "a JSON document cut short",
            send: portal(br#"{"portal_ref": "PR-1", "custo"#.to_vec()),
            status: 400,
            code: Some("malformed_json"),
        },
        Row {
            name: "a body shorter than its declared length",
            send: Send::Raw(truncated),
            status: 400,
            code: Some("malformed_json"),
        },
        Row {
            name: "wrong content type",
            send: Send::Http(
                "POST",
                "/api/v1/test-requests".into(),
                vec![
                    ("x-api-key", PORTAL_KEY.into()),
                    ("content-type", "text/plain".into()),
                ],
                b"portal_ref=1".to_vec(),
            ),
            status: 415,
            code: Some("unsupported_media_type"),
        },
        Row {
            name: "a 100 MB body",
            send: Send::Raw(huge_head),
            status: 413,
            code: Some("payload_too_large"),
        },
        Row {
            name: "10,000-deep nesting",
            send: portal(format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes()),
            status: 400,
            code: Some("refused_json"),
        },
        Row {
            name: "duplicate keys",
            send: portal(br#"{"portal_ref": "PR-1", "portal_ref": "PR-2"}"#.to_vec()),
            status: 400,
            code: Some("refused_json"),
        },
        Row {
            name: "invalid UTF-8",
            send: portal(b"{\"portal_ref\": \"PR-\xff\xfe\"}".to_vec()),
            status: 400,
            code: Some("malformed_json"),
        },
        Row {
            name: "a number too large for JSON readers",
            send: portal(br#"{"portal_ref": 1e400}"#.to_vec()),
            status: 400,
            code: Some("malformed_json"),
        },
        Row {
            name: "a raw NUL byte",
            send: portal(b"{\"portal_ref\": \"PR-\x00\"}".to_vec()),
            status: 400,
            code: Some("malformed_json"),
        },
        Row {
            name: "a Test Request breaking its schema",
            send: portal(with(&|r| r["customer"]["email"] = json!("not an email"))),
            status: 422,
            code: Some("validation_failed"),
        },
        Row {
            name: "a path-traversal id",
            send: Send::Http(
                "GET",
                "/api/v1/test-requests/..%2F..%2F..%2Fetc%2Fpasswd".into(),
                vec![("x-api-key", PORTAL_KEY.into())],
                Vec::new(),
            ),
            status: 404,
            code: Some("not_correlated"),
        },
        Row {
            name: "no API key",
            send: Send::Http(
                "POST",
                "/api/v1/test-requests".into(),
                vec![("content-type", "application/json".into())],
                serde_json::to_vec(&request).unwrap(),
            ),
            status: 401,
            code: Some("unauthorized"),
        },
        Row {
            name: "a forged webhook signature",
            send: lab(webhook_headers("guessed-secret", &result), result.clone()),
            status: 401,
            code: Some("unauthorized"),
        },
        Row {
            name: "a stale webhook signature",
            send: lab(stale, result.clone()),
            status: 401,
            code: Some("unauthorized"),
        },
        Row {
            name: "a webhook signature for another body",
            send: lab(webhook_headers(LAB_SECRET, b"{}"), result.clone()),
            status: 401,
            code: Some("unauthorized"),
        },
        Row {
            name: "a replayed webhook (first use)",
            send: lab(replayed.clone(), br#"{"replayed": true}"#.to_vec()),
            status: 422,
            code: Some("validation_failed"),
        },
        Row {
            name: "a replayed webhook (again)",
            send: lab(replayed, br#"{"replayed": true}"#.to_vec()),
            status: 401,
            code: Some("unauthorized"),
        },
        Row {
            name: "an expired JWT",
            send: bearer(expired),
            status: 401,
            code: Some("unauthorized"),
        },
        Row {
            name: "an alg: none JWT",
            send: bearer(unsigned),
            status: 401,
            code: Some("unauthorized"),
        },
        Row {
            name: "an SSRF callback to loopback",
            send: callback("http://127.0.0.1:22/"),
            status: 422,
            code: Some("unprocessable"),
        },
        Row {
            name: "an SSRF callback to cloud metadata",
            send: callback("http://169.254.169.254/latest/meta-data/iam/"),
            status: 422,
            code: Some("unprocessable"),
        },
    ]
}

async fn send(base: &str, how: &Send) -> (u16, Value) {
    match how {
        Send::Http(method, path, headers, body) => {
            let mut request = reqwest::Client::new()
                .request(method.parse().unwrap(), format!("{base}{path}"))
                .body(body.clone());
            for (name, value) in headers {
                request = request.header(*name, value);
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json().await.unwrap_or(Value::Null))
        }
        Send::Raw(bytes) => {
            let address = base.trim_start_matches("http://");
            let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
            stream.write_all(bytes).await.unwrap();
            let _ = stream.shutdown().await;
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer).await;
            let answer = String::from_utf8_lossy(&answer).into_owned();
            let status = answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
            let body = answer
                .split_once("\r\n\r\n")
                .and_then(|(_, body)| serde_json::from_str(body).ok())
                .unwrap_or(Value::Null);
            (status, body)
        }
    }
}

async fn hostile_ferry(lab: &Partner, portal: &Partner) -> Ferry {
    let mut env = vec![
        ("LAB_URL", lab.url.as_str()),
        ("PORTAL_URL", portal.url.as_str()),
        ("JWT_SECRET", "jwt-test-secret-0123456789abcdef"),
        ("GITHUB_SECRET", "unused"),
        ("PARTNER_URL", "http://127.0.0.1:9"),
        ("TOKEN_URL", "http://127.0.0.1:9/token"),
        ("PARTNER_TOKEN", "unused"),
        ("PARTNER_PASSWORD", "unused"),
        ("OAUTH_SECRET", "unused"),
        ("SIGNING_SECRET", "unused"),
    ];
    env.extend(crate::util::FAST_RETRY);
    let flows = [
        repo().join("flows"),
        repo().join("tests/fixtures/security/flows"),
    ];
    Ferry::start_many(&flows, &env).await
}

#[tokio::test]
async fn every_hostile_input_is_refused_and_nothing_is_accepted_or_forwarded() {
    let lab = Partner::start(201, json!({})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = hostile_ferry(&lab, &portal).await;
    let mut wrong = Vec::new();
    for row in rows() {
        let (status, body) = send(&ferry.url, &row.send).await;
        let code = body["error"].as_str();
        if status != row.status || code != row.code {
            wrong.push(format!(
                "{}: expected {} {:?}, got {status} {body}",
                row.name, row.status, row.code
            ));
        }
        // An error never echoes secrets or internals.
        let text = body.to_string();
        for secret in [PORTAL_KEY, LAB_SECRET, "panicked", "src/"] {
            assert!(!text.contains(secret), "{}: {text}", row.name);
        }
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
    let (_, accepted) = ferry.admin("/messages?status=accepted").await;
    assert_eq!(accepted["messages"], json!([]), "nothing was accepted");
    assert!(lab.received().is_empty(), "nothing reached the lab");
    assert!(portal.received().is_empty(), "nothing reached the portal");
}

#[tokio::test]
async fn template_syntax_in_data_arrives_literally() {
    let lab = Partner::start(201, json!({})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = hostile_ferry(&lab, &portal).await;
    let mut request = payload("test-request.json");
    request["customer"]["name"] =
        json!("{{env.SECRET}} {{{meta.headers}}} {{#each vars}}x{{/each}}");
    request["notes"] = json!("NUL \u{0} inside");
    let (status, reply) =
        crate::util::post_json(&format!("{}/api/v1/test-requests", ferry.url), &request).await;
    assert_eq!(status, 202, "{reply}");
    crate::util::wait_until("the lab has the order", || lab.received().len() == 1).await;
    let order = lab.received()[0].json();
    assert_eq!(order["client"]["name"], request["customer"]["name"]);
    assert_eq!(order["notes"], "NUL \u{0} inside");
}

#[tokio::test]
async fn a_flood_of_hostile_inputs_leaves_ferry_answering() {
    let lab = Partner::start(201, json!({})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = hostile_ferry(&lab, &portal).await;
    let rows = rows();
    let mut flood = tokio::task::JoinSet::new();
    for round in 0..10 {
        for row in &rows {
            let (url, how, name, expected) =
                (ferry.url.clone(), row.send.clone(), row.name, row.status);
            flood.spawn(async move { (round, name, expected, send(&url, &how).await.0) });
        }
    }
    let mut answered = 0;
    let mut replays = Vec::new();
    while let Some(outcome) = flood.join_next().await {
        let (round, name, expected, status) = outcome.unwrap();
        answered += 1;
        // One webhook id sent twenty times at once: whichever comes first is handled, every
        // other is a replay.
        if name.starts_with("a replayed webhook") {
            replays.push(status);
            continue;
        }
        // Under the flood, each gets the answer it gets alone: no 5xx from ferry's own
        // trouble stands in for the refusal the input deserves.
        assert_eq!(status, expected, "round {round}, {name}");
    }
    replays.sort_unstable();
    let mut expected = vec![401; replays.len() - 1];
    expected.push(422);
    assert_eq!(replays, expected, "the replayed webhook");
    assert_eq!(answered, 10 * rows.len());
    let (status, reply) = crate::util::post_json(
        &format!("{}/api/v1/test-requests", ferry.url),
        &payload("test-request.json"),
    )
    .await;
    assert_eq!(status, 202, "{reply}");
    let health = reqwest::get(format!("{}/healthz", ferry.url))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    crate::util::wait_until("the good request reaches the lab", || {
        lab.received().len() == 1
    })
    .await;
}
