//! Who may call, how often, and where ferry may be made to call: inbound authentication,
//! limits, outbound credentials and the SSRF guard, over real HTTP.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{KeyInit, Mac};
use serde_json::{Value, json};

use crate::util::{
    Ferry, LAB_SECRET, PORTAL_KEY, Partner, payload, post_json, repo, webhook_headers,
};

const GITHUB_SECRET: &str = "github-test-secret";
const JWT_SECRET: &str = "jwt-test-secret-0123456789abcdef";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn security_flows(env: &[(&str, &str)], options: ferry::server::ServeOptions) -> Ferry {
    let mut all = vec![
        ("GITHUB_SECRET", GITHUB_SECRET),
        ("JWT_SECRET", JWT_SECRET),
        ("PARTNER_URL", "http://127.0.0.1:9"),
        ("TOKEN_URL", "http://127.0.0.1:9/token"),
        ("PARTNER_TOKEN", "partner-token"),
        ("PARTNER_PASSWORD", "p@ss:word"),
        ("OAUTH_SECRET", "oauth:se cret%"),
        ("SIGNING_SECRET", "whsec_c2lnbmluZy1zZWNyZXQ="),
    ];
    all.retain(|(k, _)| !env.iter().any(|(n, _)| n == k));
    all.extend(env);
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}/ferry.db", dir.path().display());
    let flows = [repo().join("tests/fixtures/security/flows")];
    Ferry::start_guarded(&flows, &all, &store, dir, options).await
}

async fn status_and_body(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_portal_needs_one_of_its_api_keys() {
    let lab = Partner::start(201, json!({})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = Ferry::start(
        &repo().join("flows"),
        &[
            ("LAB_URL", &lab.url),
            ("PORTAL_URL", &portal.url),
            ("PORTAL_API_KEY_PREVIOUS", "the-old-key"),
        ],
    )
    .await;
    let url = format!("{}/api/v1/test-requests", ferry.url);
    let request = payload("test-request.json");
    let plain = reqwest::Client::new();
    for key in [None, Some("wrong"), Some("test-portal-ke"), Some("")] {
        let mut attempt = plain.post(&url).json(&request);
        if let Some(key) = key {
            attempt = attempt.header("x-api-key", key);
        }
        let (status, body) = status_and_body(attempt.send().await.unwrap()).await;
        assert_eq!(status, 401, "{key:?}");
        assert_eq!(
            body,
            json!({"error": "unauthorized", "message": "missing or invalid credentials", "details": []})
        );
    }
    for key in [PORTAL_KEY, "the-old-key"] {
        let response = plain
            .post(&url)
            .header("x-api-key", key)
            .json(&json!({"portal_ref": format!("PR-{key}")}))
            .send()
            .await
            .unwrap();
        // Past authentication: the body is checked (and refused) next.
        assert_eq!(response.status(), 422, "{key}");
    }
    let status = plain
        .get(format!("{}/api/v1/test-requests/anything", ferry.url))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 401, "the status endpoint is the portal's too");
    assert!(lab.received().is_empty());
}

#[tokio::test]
async fn lab_webhooks_must_be_signed_fresh_and_new() {
    let lab = Partner::start(201, json!({})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = Ferry::shipped(&lab, &portal).await;
    let url = format!("{}/api/v1/lab-results", ferry.url);
    let body = serde_json::to_vec(&payload("test-result.json")).unwrap();
    let send = |headers: Vec<(&'static str, String)>, body: Vec<u8>| {
        let url = url.clone();
        async move {
            let mut request = reqwest::Client::new()
                .post(url)
                .header("content-type", "application/json")
                .body(body);
            for (name, value) in headers {
                request = request.header(name, value);
            }
            status_of(request).await
        }
    };
    // Signed right, the result reaches the flow (and matches no request: 404).
    let good = webhook_headers(LAB_SECRET, &body);
    assert_eq!(send(good.clone(), body.clone()).await, 404);
    // The same delivery again is a replay.
    assert_eq!(send(good, body.clone()).await, 401);
    // Forged: another secret; or the right signature over another body.
    assert_eq!(
        send(webhook_headers("not-the-secret", &body), body.clone()).await,
        401
    );
    let mut tampered = body.clone();
    tampered[1] = b' ';
    assert_eq!(
        send(webhook_headers(LAB_SECRET, &body), tampered).await,
        401
    );
    // Stale: signed ten minutes ago.
    let stale_at = now() as i64 - 600;
    let stale =
        ferry::auth::webhook_headers(LAB_SECRET.as_bytes(), "msg_stale", stale_at, &body).to_vec();
    assert_eq!(send(stale, body.clone()).await, 401);
    // Unsigned.
    assert_eq!(send(Vec::new(), body.clone()).await, 401);
    assert!(portal.received().is_empty());
}

#[tokio::test]
async fn generic_signatures_cover_the_body() {
    let ferry = security_flows(&[], Default::default()).await;
    let body = br#"{"action":"opened"}"#.to_vec();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(GITHUB_SECRET.as_bytes()).unwrap();
    mac.update(&body);
    let good = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    let send = |signature: Option<String>, body: Vec<u8>| {
        let url = format!("{}/github", ferry.url);
        async move {
            let mut request = reqwest::Client::new()
                .post(url)
                .header("content-type", "application/json")
                .body(body);
            if let Some(signature) = signature {
                request = request.header("x-hub-signature-256", signature);
            }
            status_of(request).await
        }
    };
    assert_eq!(send(Some(good.clone()), body.clone()).await, 200);
    assert_eq!(
        send(Some(good.replace("sha256=", "")), body.clone()).await,
        401
    );
    assert_eq!(
        send(Some(good), br#"{"action":"closed"}"#.to_vec()).await,
        401
    );
    assert_eq!(send(None, body).await, 401);
}

fn jwt(claims: &Value, secret: &str, kid: Option<&str>) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = kid.map(str::to_owned);
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).unwrap();
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

#[tokio::test]
async fn bearer_tokens_are_checked_and_scoped() {
    let ferry = security_flows(&[], Default::default()).await;
    let send = |token: String| {
        let url = format!("{}/jwt", ferry.url);
        async move {
            status_of(
                reqwest::Client::new()
                    .post(url)
                    .bearer_auth(token)
                    .json(&json!({})),
            )
            .await
        }
    };
    let valid = json!({"iss": "https://idp.example", "aud": "ferry", "exp": now() + 300, "scope": "results:read results:write"});
    assert_eq!(send(jwt(&valid, JWT_SECRET, None)).await, 200);
    // Valid, but without the scope: authenticated, not allowed.
    let mut unscoped = valid.clone();
    unscoped["scope"] = json!("results:read");
    assert_eq!(send(jwt(&unscoped, JWT_SECRET, None)).await, 403);
    let mut expired = valid.clone();
    expired["exp"] = json!(now() - 3600);
    assert_eq!(send(jwt(&expired, JWT_SECRET, None)).await, 401);
    let mut elsewhere = valid.clone();
    elsewhere["aud"] = json!("another-service");
    assert_eq!(send(jwt(&elsewhere, JWT_SECRET, None)).await, 401);
    assert_eq!(send(jwt(&valid, "a-guessed-secret", None)).await, 401);
    // Every claim the flow configures is required: missing is refused like wrong.
    for (claim, wrong) in [
        ("iss", json!("https://another-idp.example")),
        ("aud", json!("another-service")),
        ("exp", json!(now() - 3600)),
    ] {
        let mut missing = valid.clone();
        missing.as_object_mut().unwrap().remove(claim);
        assert_eq!(
            send(jwt(&missing, JWT_SECRET, None)).await,
            401,
            "no {claim}"
        );
        let mut other = valid.clone();
        other[claim] = wrong;
        assert_eq!(
            send(jwt(&other, JWT_SECRET, None)).await,
            401,
            "wrong {claim}"
        );
    }
    // Not before: an hour ahead is refused; within the 30 s leeway, or past, it passes.
    for (nbf, status) in [(now() + 3600, 401), (now() + 10, 200), (now() - 60, 200)] {
        let mut early = valid.clone();
        early["nbf"] = json!(nbf);
        assert_eq!(
            send(jwt(&early, JWT_SECRET, None)).await,
            status,
            "nbf {nbf}"
        );
    }
    // `alg: none`: an unsigned token claiming everything.
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let unsigned = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&valid)
    );
    assert_eq!(send(unsigned).await, 401);
    assert_eq!(send("not.a.token".into()).await, 401);

    // A JWKS file: the kid picks the key.
    let jwks = |token: String| {
        let url = format!("{}/jwks", ferry.url);
        async move { status_of(reqwest::Client::new().post(url).bearer_auth(token)).await }
    };
    let claims = json!({"exp": now() + 300});
    let secret = "jwks-test-secret-0123456789abcdef";
    assert_eq!(jwks(jwt(&claims, secret, Some("k1"))).await, 200);
    assert_eq!(jwks(jwt(&claims, secret, Some("k2"))).await, 401);
}

#[tokio::test]
async fn a_client_over_its_rate_gets_429_with_retry_after() {
    let ferry = security_flows(&[], Default::default()).await;
    let url = format!("{}/limited", ferry.url);
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..4 {
        let response = reqwest::Client::new().post(&url).send().await.unwrap();
        if response.status() == 429 {
            retry_after = response.headers().get("retry-after").cloned();
        }
        statuses.push(response.status().as_u16());
    }
    // The burst of two passes; then the bucket is empty (one token comes back each second).
    assert_eq!(&statuses[..2], [200, 200]);
    assert!(statuses[2..].contains(&429), "{statuses:?}");
    assert_eq!(retry_after.unwrap(), "1");
}

#[tokio::test]
async fn over_the_concurrency_limit_ferry_sheds_load_with_503() {
    let partner = Partner::start(200, json!({"ok": true})).await;
    partner.set_delay(std::time::Duration::from_millis(500));
    let options = ferry::server::ServeOptions {
        max_concurrency: 1,
        ..Default::default()
    };
    let ferry = security_flows(&[("PARTNER_URL", &partner.url)], options).await;
    let url = format!("{}/outbound", ferry.url);
    let slow = tokio::spawn({
        let url = url.clone();
        async move {
            status_of(
                reqwest::Client::new()
                    .post(url)
                    .json(&json!({"kind": "basic"})),
            )
            .await
        }
    });
    crate::util::wait_until("the slow request is in flight", || {
        !partner.received().is_empty()
    })
    .await;
    let shed = reqwest::Client::new()
        .post(&url)
        .json(&json!({"kind": "basic"}))
        .send()
        .await
        .unwrap();
    assert_eq!(shed.status(), 503);
    assert_eq!(shed.headers()["retry-after"], "1");
    let live = reqwest::get(format!("{}/healthz", ferry.url))
        .await
        .unwrap();
    assert_eq!(live.status(), 200, "liveness answers however busy ferry is");
    assert_eq!(slow.await.unwrap(), 200);
}

#[tokio::test]
async fn too_many_or_too_large_headers_get_431() {
    let ferry = security_flows(&[], Default::default()).await;
    let mut many = reqwest::header::HeaderMap::new();
    for i in 0..100 {
        many.insert(
            reqwest::header::HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap(),
            "v".parse().unwrap(),
        );
    }
    let url = format!("{}/limited", ferry.url);
    let response = reqwest::Client::new().post(&url).headers(many).send().await;
    assert_eq!(response.unwrap().status(), 431);
    let response = reqwest::Client::new()
        .post(&url)
        .header("x-big", "v".repeat(100 * 1024))
        .send()
        .await;
    assert_eq!(response.unwrap().status(), 431);
    // Still answering.
    let response = reqwest::Client::new().post(&url).send().await.unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn targets_present_credentials_and_sign_what_they_send() {
    let partner = Partner::start(200, json!({"ok": true})).await;
    let tokens = Partner::start(200, json!({"access_token": "token-1", "expires_in": 3600})).await;
    let token_url = format!("{}/token", tokens.url);
    let ferry = security_flows(
        &[("PARTNER_URL", &partner.url), ("TOKEN_URL", &token_url)],
        Default::default(),
    )
    .await;
    let send = |kind: &'static str| {
        post_json_plain(format!("{}/outbound", ferry.url), json!({"kind": kind}))
    };
    assert_eq!(send("bearer").await, 200);
    assert_eq!(send("basic").await, 200);
    assert_eq!(send("oauth2").await, 200);
    assert_eq!(send("oauth2").await, 200);
    let received = partner.received();
    assert_eq!(received[0].headers["authorization"], "Bearer partner-token");
    let expected = base64::engine::general_purpose::STANDARD.encode("ferry:p@ss:word");
    assert_eq!(
        received[1].headers["authorization"],
        format!("Basic {expected}").as_str()
    );
    assert_eq!(received[2].headers["authorization"], "Bearer token-1");
    assert_eq!(received[3].headers["authorization"], "Bearer token-1");
    assert_eq!(tokens.received().len(), 1, "the token is cached");
    // RFC 6749 §2.3.1: id and secret are form-encoded before Basic authentication.
    let client = base64::engine::general_purpose::STANDARD.encode("ferry:oauth%3Ase+cret%25");
    assert_eq!(
        tokens.received()[0].headers["authorization"],
        format!("Basic {client}").as_str()
    );
    let token_request = String::from_utf8_lossy(&tokens.received()[0].body).into_owned();
    assert!(
        token_request.contains("grant_type=client_credentials"),
        "{token_request}"
    );

    // The partner can verify ferry's signature with the shared secret.
    let signed = &received[0];
    let header = |name: &str| signed.headers[name].to_str().unwrap().to_owned();
    let key = ferry::auth::webhook_key("whsec_c2lnbmluZy1zZWNyZXQ=").unwrap();
    let timestamp: i64 = header("webhook-timestamp").parse().unwrap();
    assert_eq!(
        header("webhook-signature"),
        ferry::auth::standard_signature(&key, &header("webhook-id"), timestamp, &signed.body)
    );
    assert_eq!(header("webhook-id"), header("idempotency-key"));

    // A token the partner no longer takes is fetched again, once.
    tokens.set_reply(200, json!({"access_token": "token-2", "expires_in": 3600}));
    partner.answer_once(401, json!({"error": "expired token"}));
    assert_eq!(send("oauth2").await, 200);
    let received = partner.received();
    assert_eq!(received[4].headers["authorization"], "Bearer token-1");
    assert_eq!(received[5].headers["authorization"], "Bearer token-2");
    assert_eq!(tokens.received().len(), 2);
}

/// The status `request` is answered with.
async fn status_of(request: reqwest::RequestBuilder) -> u16 {
    request.send().await.unwrap().status().as_u16()
}

async fn post_json_plain(url: String, body: Value) -> u16 {
    status_of(reqwest::Client::new().post(url).json(&body)).await
}

#[tokio::test]
async fn message_data_cannot_make_ferry_call_private_or_unlisted_hosts() {
    let inside = Partner::start(200, json!({"ok": true})).await;
    let ferry = security_flows(&[], Default::default()).await;
    let url = format!("{}/callback", ferry.url);
    for callback in [
        format!("{}/steal", inside.url), // loopback, though listed
        "http://169.254.169.254/latest/meta-data/".into(), // cloud metadata, though listed
        "http://[::1]:9/x".into(),       // not listed
        "http://evil.test/x".into(),     // not listed
        "http://a.partner.example.evil.test/x".into(), // a suffix trick
        "file:///etc/passwd".into(),
    ] {
        let (status, body) = post_json(&url, &json!({"callback_url": callback})).await;
        assert_eq!(status, 422, "{callback}: {body}");
        assert_eq!(body["error"], "unprocessable", "{body}");
    }
    // A listed name that resolves to a private address is refused when connecting.
    let port = inside.url.rsplit(':').next().unwrap().to_owned();
    let (status, body) = post_json(
        &url,
        &json!({"callback_url": format!("http://localhost:{port}/x")}),
    )
    .await;
    assert_eq!(status, 502, "{body}");
    assert!(inside.received().is_empty());
}

#[test]
fn serve_refuses_to_start_without_the_secrets_its_flows_name() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            "sqlite::memory:",
        ])
        .current_dir(repo())
        .env_remove("PORTAL_API_KEY")
        .env_remove("PORTAL_API_KEY_PREVIOUS")
        .env_remove("LAB_WEBHOOK_SECRET")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("warning[secret-unset]"), "{stderr}");
    assert!(stderr.contains("LAB_WEBHOOK_SECRET"), "{stderr}");
    assert!(
        stderr.contains("ferry serve needs the secrets above"),
        "{stderr}"
    );
}

/// A self-signed certificate for `localhost`, as PEM files in `dir`.
fn certificate(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

#[tokio::test]
async fn ferry_serves_https_and_verifies_its_targets_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path());
    let tls = ferry::server::ServeOptions {
        tls: Some(ferry::server::tls_config(&cert, &key).unwrap()),
        ..Default::default()
    };
    // A partner serving HTTPS with that certificate.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let partner = axum::Router::new().route("/in", axum::routing::post(|| async { "taken" }));
    tokio::spawn(ferry::server::run(
        listener,
        partner,
        tls.clone(),
        std::future::pending(),
    ));

    let flows = dir.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::copy(&cert, flows.join("partner-ca.pem")).unwrap();
    let flow = |name: &str, tls: &str| {
        format!(
            "name: {name}\ntrigger:\n  http: {{ method: POST, path: /{name}, auth: none }}\ntargets:\n  partner:\n    http:\n      url: https://localhost:{port}/in\n{tls}delivery:\n  mode: sync\n"
        )
    };
    std::fs::write(
        flows.join("trusting.yaml"),
        flow("trusting", "      tls: { ca_file: partner-ca.pem }\n"),
    )
    .unwrap();
    std::fs::write(flows.join("default.yaml"), flow("default", "")).unwrap();
    std::fs::write(
        flows.join("insecure.yaml"),
        flow("insecure", "      tls: { insecure_skip_verify: true }\n"),
    )
    .unwrap();
    let store = format!("sqlite://{}/ferry.db", dir.path().display());
    let ferry =
        Ferry::start_guarded(&[flows], &[], &store, tempfile::tempdir().unwrap(), tls).await;
    assert!(ferry.url.starts_with("https://"));

    let trusting = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap(),
        )
        .build()
        .unwrap();
    let url = ferry.url.replace("127.0.0.1", "localhost");
    let status = |path: &'static str| {
        let (client, url) = (trusting.clone(), format!("{url}/{path}"));
        async move { status_of(client.post(url).json(&json!({}))).await }
    };
    assert_eq!(
        status("trusting").await,
        200,
        "a target trusted through ca_file"
    );
    assert_eq!(
        status("default").await,
        502,
        "an unknown certificate is refused"
    );
    assert_eq!(
        status("insecure").await,
        200,
        "unless verification is explicitly off"
    );
    // A client that does not trust ferry's certificate gets no answer.
    assert!(
        reqwest::Client::new()
            .get(format!("{url}/healthz"))
            .send()
            .await
            .is_err()
    );
}

#[tokio::test]
async fn sensitive_fields_stay_out_of_errors_and_the_admin_api() {
    let lab = Partner::start(201, json!({})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = Ferry::shipped(&lab, &portal).await;
    let url = format!("{}/api/v1/test-requests", ferry.url);
    let mut broken = payload("test-request.json");
    broken["customer"]["email"] = json!("ana.private@@example");
    let (status, reply) = post_json(&url, &broken).await;
    assert_eq!(status, 422);
    assert!(
        reply["details"].to_string().contains("/customer/email"),
        "{reply}"
    );
    assert!(!reply.to_string().contains("ana.private"), "{reply}");

    let (status, reply) = post_json(&url, &payload("test-request.json")).await;
    assert_eq!(status, 202, "{reply}");
    let id = reply["request_id"].as_str().unwrap();
    let (_, detail) = ferry.admin(&format!("/messages/{id}")).await;
    assert_eq!(detail["inbound"]["customer"]["email"], "[redacted]");
    assert_eq!(detail["inbound"]["customer"]["name"], "Acme Water Ltd");
    assert!(
        !detail.to_string().contains("qa@acme-water.example"),
        "{detail}"
    );
    crate::util::wait_until("the lab has the order", || lab.received().len() == 1).await;
    assert_eq!(
        lab.received()[0].json()["client"]["contact_email"],
        "qa@acme-water.example"
    );
}

#[tokio::test]
async fn a_request_that_takes_too_long_gets_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let options = ferry::server::ServeOptions {
        request_timeout: std::time::Duration::from_millis(300),
        ..Default::default()
    };
    let ferry = security_flows(&[], options).await;
    let mut stream = tokio::net::TcpStream::connect(ferry.url.trim_start_matches("http://"))
        .await
        .unwrap();
    // The head arrives; the promised body never does.
    let head = "POST /limited HTTP/1.1\r\nhost: ferry\r\ncontent-type: application/json\r\ncontent-length: 10\r\n\r\n{";
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0; 1024];
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut answer))
        .await
        .expect("ferry answers instead of waiting forever")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..read]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"timeout\""), "{answer}");
}

#[tokio::test]
async fn the_result_callbacks_example_takes_rs256_tokens_from_its_partner() {
    // The private half of examples/result-callbacks/flows/keys/partner-idp.pem, for tests only.
    let private =
        std::fs::read(repo().join("tests/fixtures/security/keys/partner-idp.test-only.key"))
            .unwrap();
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&private).unwrap();
    let token = |scope: &str| {
        let claims = json!({"iss": "https://idp.partner.example", "aud": "ferry", "exp": now() + 300, "scope": scope});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            &claims,
            &key,
        )
        .unwrap()
    };
    let env = [
        ("PARTNER_CLIENT_SECRET", "secret"),
        ("PARTNER_SIGNING_SECRET", "secret"),
    ];
    let ferry = Ferry::start(&repo().join("examples/result-callbacks/flows"), &env).await;
    let subscribe = |token: String, callback: &str| {
        let url = format!("{}/api/v1/result-subscriptions", ferry.url);
        let body = json!({"request_id": "R-1", "callback_url": callback, "contact": {"email": "desk@clinic.partner.example"}});
        async move {
            let response = reqwest::Client::new()
                .post(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        }
    };
    // Authenticated and allowed: the body is checked next, and a callback outside the
    // partner's hosts is refused before anything is sent.
    let (status, body) = subscribe(token("results:subscribe"), "https://evil.test/x").await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"], "unprocessable");
    let (status, _) = subscribe(token("results:read"), "https://a.partner.example/x").await;
    assert_eq!(status, 403);
    let (status, _) = subscribe("e30.e30.".into(), "https://a.partner.example/x").await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn a_webhook_that_failed_on_our_side_may_come_again_with_its_id() {
    let partner = Partner::start(503, json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let flow = format!(
        "name: hook\ntrigger:\n  http:\n    method: POST\n    path: /hook\n    auth:\n      \
         webhook_signature:\n        from_env: [LAB_WEBHOOK_SECRET]\ntargets:\n  partner:\n    \
         http:\n      url: {}/in\ndelivery:\n  mode: sync\n",
        partner.url
    );
    std::fs::write(dir.path().join("hook.yaml"), flow).unwrap();
    let ferry = Ferry::start(dir.path(), &[]).await;
    let body = br#"{"n": 1}"#.to_vec();
    let headers = webhook_headers(LAB_SECRET, &body);
    let send = || {
        let mut request = reqwest::Client::new()
            .post(format!("{}/hook", ferry.url))
            .header("content-type", "application/json")
            .body(body.clone());
        for (name, value) in &headers {
            request = request.header(*name, value);
        }
        status_of(request)
    };
    // The partner fails, so ferry answers 502 and the sender tries again with the same id.
    assert_eq!(send().await, 502);
    partner.set_reply(200, json!({"ok": true}));
    assert_eq!(send().await, 200, "a retry after our failure is no replay");
    assert_eq!(send().await, 401, "once handled, the same id is a replay");
}
