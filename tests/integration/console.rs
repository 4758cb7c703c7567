//! The operator's console: in a real browser (Debian's Chromium, headless) against ferry
//! serving the shipped flows, and its guards over plain HTTP.

use fantoccini::Locator;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_SECURITY_POLICY, LOCATION, SET_COOKIE};
use serde_json::json;

use crate::util::{
    ADMIN_TOKEN, Browser, Ferry, Partner, payload, post_json, wait_for_state, wait_until,
};

/// A customer name that would run script and add an element, were it not rendered as text.
const HOSTILE_NAME: &str = r#"Acme <script>window.pwned=1</script><img id="xss" src="x">"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_finds_a_request_sees_both_directions_and_replays_its_dead_letter() {
    // The lab quotes the order's contact e-mail (sensitive) in its refusal.
    let refusal = "unknown test code PB-ICPMS in the order of qa@acme-water.example";
    let lab = Partner::start(400, json!({"error": refusal})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = Ferry::shipped(&lab, &portal).await;
    let mut request = payload("test-request.json");
    request["portal_ref"] = json!("PR-2026-0417");
    request["customer"]["name"] = json!(HOSTILE_NAME);
    let (status, reply) = post_json(&format!("{}/api/v1/test-requests", ferry.url), &request).await;
    assert_eq!(status, 202, "{reply}");
    let id = reply["request_id"].as_str().unwrap().to_owned();
    wait_for_state(&ferry.url, &id, "failed").await;

    let browser = Browser::start().await;
    let console = format!("{}/console", ferry.url);

    // Logging in: the token goes in a form, never into the address.
    browser.client.goto(&format!("{console}/")).await.unwrap();
    assert_eq!(
        browser.path().await,
        "/console/login",
        "{}",
        browser.client.source().await.unwrap()
    );
    browser.type_into("#token", ADMIN_TOKEN).await;
    browser.click(".login button").await;
    assert_eq!(browser.path().await, "/console/flows");
    let cookie_from_script: serde_json::Value = browser
        .client
        .execute("return document.cookie", vec![])
        .await
        .unwrap();
    assert_eq!(
        cookie_from_script,
        json!(""),
        "the session cookie is HttpOnly"
    );

    // Flows: the dead letter is counted, and the lab's row says so.
    assert_eq!(browser.text("#flow-portal-to-lab dd.dead").await, "1");
    let lab_row = browser
        .text("#flow-portal-to-lab tr[data-target=lab]")
        .await;
    assert!(lab_row.starts_with("lab http 0 0 1"), "{lab_row}");
    browser.screenshot("flows").await;

    // The counts are live: a second dead letter shows up without reloading the page.
    let mut another = payload("test-request.json");
    another["portal_ref"] = json!("PR-2026-0418");
    let (_, reply) = post_json(&format!("{}/api/v1/test-requests", ferry.url), &another).await;
    let second = reply["request_id"].as_str().unwrap().to_owned();
    wait_for_state(&ferry.url, &second, "failed").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while browser.text("#flow-portal-to-lab dd.dead").await != "2" {
        assert!(
            std::time::Instant::now() < deadline,
            "the count never refreshed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(browser.path().await, "/console/flows");

    // Dead letters: the lab is fixed; replay both, selected at once, with a reason.
    browser
        .client
        .goto(&format!("{console}/dead-letters"))
        .await
        .unwrap();
    assert!(browser.text("form.dead-letters").await.contains(&id));
    browser.screenshot("dead-letters").await;
    lab.set_reply(201, json!({"lab_order_id": "LAB-417"}));
    // "Select all" is the console's script at work: it runs under the CSP.
    browser
        .client
        .find(Locator::Css("#all"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let ticked = browser
        .client
        .find(Locator::Css(&format!("input[name=id][value=\"{id}\"]")))
        .await
        .unwrap()
        .is_selected()
        .await
        .unwrap();
    assert!(ticked, "select all ticked the dead letters");
    browser
        .type_into("#reason", "the lab added PB-ICPMS to its catalogue")
        .await;
    browser.click("#replay-selected").await;
    let summary = browser.text("#summary").await;
    assert!(summary.starts_with("2 replayed — by admin"), "{summary}");
    wait_until("the lab took the replayed orders", || {
        lab.accepted().len() == 2
    })
    .await;
    wait_for_state(&ferry.url, &id, "delivered_to_lab").await;
    wait_for_state(&ferry.url, &second, "delivered_to_lab").await;

    // The lab sends the results back: the other direction of the same journey.
    let mut result = payload("test-result.json");
    result["order_ref"] = json!(id);
    result["lab_order_id"] = json!("LAB-417");
    let (status, reply) = post_json(&format!("{}/api/v1/lab-results", ferry.url), &result).await;
    assert_eq!(status, 202, "{reply}");
    wait_until("the portal has the results", || {
        portal.accepted().len() == 1
    })
    .await;
    // The portal's answer is recorded after the portal has the results.
    wait_for_state(&ferry.url, &id, "delivered_to_portal").await;

    // Search by the portal's reference, from the box on every page.
    browser.type_into("#find", "PR-2026-0417").await;
    browser.click(".find button").await;
    assert_eq!(browser.path().await, "/console/messages");
    assert!(
        browser
            .text("#journey")
            .await
            .contains("journey of 2 messages"),
        "both directions are found"
    );
    browser
        .click(&format!(
            "table.messages a[href=\"/console/messages/{id}\"]"
        ))
        .await;
    assert_eq!(browser.path().await, format!("/console/messages/{id}"));

    // One story: the request, its dead letter, the replay (who and why), the delivery, and
    // the results going back to the portal.
    let story = browser.text("#story").await;
    for line in [
        "portal-to-lab",
        "steps: validate, correlate, set, route, transform, validate",
        "lab attempt 1: answered 400",
        "replayed by admin: the lab added PB-ICPMS to its catalogue",
        "lab attempt 1: answered 201",
        "lab-to-portal",
        "portal attempt 1: answered 200",
        "test-request is now delivered_to_portal",
    ] {
        assert!(story.contains(line), "no \"{line}\" in the story:\n{story}");
    }
    assert!(
        story.contains("unknown test code PB-ICPMS in the order of [redacted]"),
        "the lab's answer is shown, without the e-mail it quotes:\n{story}"
    );
    // Values from the message are text: no script ran, no element was added.
    let inbound = browser.text("#inbound").await;
    let as_json = serde_json::to_string(HOSTILE_NAME).unwrap();
    assert!(inbound.contains(&as_json), "{inbound}");
    assert!(inbound.contains("[redacted]"), "the e-mail is sensitive");
    assert!(!inbound.contains("qa@acme-water.example"));
    // The lab order carries the e-mail elsewhere: it is hidden there too.
    let after_steps = browser.text("#after-steps").await;
    assert!(after_steps.contains("\"body\""), "{after_steps}");
    assert!(
        !after_steps.contains("qa@acme-water.example"),
        "{after_steps}"
    );
    let injected: serde_json::Value = browser
        .client
        .execute(
            "return [typeof window.pwned, document.getElementById('xss') === null]",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(injected, json!(["undefined", true]));
    browser.screenshot("message").await;
    let source = browser.client.source().await.unwrap();
    assert!(!source.contains(ADMIN_TOKEN), "the token is in no page");
    browser.close().await;
}

/// A client that keeps redirects to itself, to see where the console sends it.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// The value of the page's first hidden `csrf` field.
fn csrf_of(page: &str) -> String {
    let start = page
        .find(r#"name="csrf" value=""#)
        .expect("a form with a CSRF token")
        + 19;
    page[start..].split('"').next().unwrap().to_owned()
}

#[tokio::test]
async fn the_console_keeps_its_session_and_its_forms_to_itself() {
    let lab = Partner::start(201, json!({})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = Ferry::shipped(&lab, &portal).await;
    let console = format!("{}/console", ferry.url);
    let http = client();

    let answer = http.get(format!("{console}/flows")).send().await.unwrap();
    assert_eq!(answer.status(), StatusCode::SEE_OTHER);
    assert_eq!(answer.headers()[LOCATION], "/console/login");
    let csp = answer.headers()[CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");

    let login = format!("{console}/login");
    let asked = std::time::Instant::now();
    let refused = http
        .post(&login)
        .form(&[("token", "guess")])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert!(refused.headers().get(SET_COOKIE).is_none());
    assert!(
        asked.elapsed() >= std::time::Duration::from_millis(500),
        "a wrong token is answered slowly"
    );
    let cross_site = http
        .post(&login)
        .header("origin", "https://attacker.example")
        .form(&[("token", ADMIN_TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(cross_site.status(), StatusCode::FORBIDDEN);
    assert!(cross_site.headers().get(SET_COOKIE).is_none());

    let origin = ferry.url.clone();
    let logged_in = http
        .post(&login)
        .header("origin", &origin)
        .form(&[("token", ADMIN_TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(logged_in.status(), StatusCode::SEE_OTHER);
    let set_cookie = logged_in.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    for part in ["HttpOnly", "SameSite=Strict", "Path=/console"] {
        assert!(set_cookie.contains(part), "{set_cookie}");
    }
    assert!(
        !set_cookie.contains("Secure"),
        "plain HTTP here: {set_cookie}"
    );
    assert!(!set_cookie.contains(ADMIN_TOKEN));
    let cookie = set_cookie.split(';').next().unwrap().to_owned();

    let flows = http
        .get(format!("{console}/flows"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(flows.status(), StatusCode::OK);
    let page = flows.text().await.unwrap();
    assert!(page.contains("portal-to-lab") && !page.contains(ADMIN_TOKEN));
    let csrf = csrf_of(&page);

    let replay = format!("{console}/dead-letters/replay");
    let forged = http
        .post(&replay)
        .header("cookie", &cookie)
        .form(&[("scope", "all"), ("reason", "because")])
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), StatusCode::FORBIDDEN, "no CSRF token");
    let from_elsewhere = http
        .post(&replay)
        .header("cookie", &cookie)
        .header("sec-fetch-site", "cross-site")
        .form(&[
            ("csrf", csrf.as_str()),
            ("scope", "all"),
            ("reason", "because"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(from_elsewhere.status(), StatusCode::FORBIDDEN);
    let no_reason = http
        .post(&replay)
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str()), ("scope", "all"), ("reason", " ")])
        .send()
        .await
        .unwrap();
    assert_eq!(no_reason.status(), StatusCode::BAD_REQUEST);

    let bad_time = http
        .get(format!("{console}/messages?since=yesterday"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(bad_time.status(), StatusCode::BAD_REQUEST);
    assert!(
        bad_time
            .text()
            .await
            .unwrap()
            .contains("From: &quot;yesterday&quot; is not a time")
    );

    let logged_out = http
        .post(format!("{console}/logout"))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(logged_out.status(), StatusCode::SEE_OTHER);
    let after = http
        .get(format!("{console}/flows"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), StatusCode::SEE_OTHER, "the session ended");
}

#[tokio::test]
async fn the_console_finds_a_message_by_each_of_its_keys_and_filters_by_time() {
    let lab = Partner::start(201, json!({"lab_order_id": "LAB-5"})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = Ferry::shipped(&lab, &portal).await;
    let mut request = payload("test-request.json");
    request["portal_ref"] = json!("PR-2026-0005");
    let answer = crate::util::client()
        .post(format!("{}/api/v1/test-requests", ferry.url))
        .header("x-correlation-id", "req-abc-5")
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 202);
    let id = answer.json::<serde_json::Value>().await.unwrap()["request_id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for_state(&ferry.url, &id, "delivered_to_lab").await;

    let http = client();
    let login = http
        .post(format!("{}/console/login", ferry.url))
        .form(&[("token", ADMIN_TOKEN)])
        .send()
        .await
        .unwrap();
    let cookie = login.headers()[SET_COOKIE].to_str().unwrap();
    let cookie = cookie.split(';').next().unwrap().to_owned();
    let console = format!("{}/console", ferry.url);
    let get = |path: String| {
        let (http, cookie, url) = (http.clone(), cookie.clone(), format!("{console}{path}"));
        async move {
            let answer = http.get(url).header("cookie", cookie).send().await.unwrap();
            let location = answer
                .headers()
                .get(LOCATION)
                .map(|l| l.to_str().unwrap().to_owned());
            (answer.status(), location, answer.text().await.unwrap())
        }
    };
    // A key naming this one message leads straight to it.
    // (The shipped flow's idempotency key is the portal_ref.)
    for key in [id.as_str(), "PR-2026-0005", "LAB-5", "req-abc-5"] {
        let (status, location, _) = get(format!("/messages?q={key}")).await;
        assert_eq!(status, StatusCode::SEE_OTHER, "{key}");
        assert_eq!(
            location.as_deref(),
            Some(format!("/console/messages/{id}").as_str()),
            "{key}"
        );
    }
    let (status, _, page) = get("/messages?q=PR-2099-0000".into()).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains("Nothing is known by “PR-2099-0000”"),
        "{page}"
    );

    let (_, _, listed) =
        get("/messages?flow=portal-to-lab&state=delivered&since=2000-01-01T00:00".into()).await;
    assert!(listed.contains(&id));
    let (_, _, none) = get("/messages?state=delivered&until=2000-01-01T00:00".into()).await;
    assert!(!none.contains(&id) && none.contains("No message matches."));
    let (_, _, dead) = get("/messages?state=dead".into()).await;
    assert!(!dead.contains(&id));
}

#[tokio::test]
async fn served_over_tls_the_session_cookie_is_secure() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let store = format!("sqlite://{}/ferry.db", dir.path().display());
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let (child, url) = crate::util::process::spawn_on(
        &store,
        &["--tls-cert", &cert, "--tls-key", &key],
        &[],
        std::process::Stdio::null(),
    );
    assert!(url.starts_with("https://"), "{url}");
    let url = url.replace("127.0.0.1", "localhost");
    let ca = reqwest::Certificate::from_pem(certified.cert.pem().as_bytes()).unwrap();
    let http = reqwest::Client::builder()
        .add_root_certificate(ca)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let logged_in = http
        .post(format!("{url}/console/login"))
        .form(&[("token", crate::util::process::TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(logged_in.status(), StatusCode::SEE_OTHER);
    let cookie = logged_in.headers()[SET_COOKIE].to_str().unwrap();
    assert!(cookie.ends_with("; Secure"), "{cookie}");
    crate::util::process::terminate(child).await;
}
