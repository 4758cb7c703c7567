//! Data stays data: whatever a partner puts in a string reaches the target unchanged, and
//! can never add a field or break the JSON around it.

use serde_json::json;

use crate::util::{Ferry, Partner, payload, post_json};

const HOSTILE: [&str; 9] = [
    "Acme \"Water\" Ltd",
    "{{meta.id}} {{{body}}} {{#each body}}x{{/each}}",
    "back\\slash \\\" \\u0000",
    "line one\nline two\r\n\ttab",
    "x\", \"admin\": true, \"y\": \"",
    "}]}, {\"injected\": 1",
    "Zoë Ångström — 水質検査 😀",
    "<script>alert(1)</script> &amp; ' `",
    "${LAB_URL} $.body %s %n",
];

#[tokio::test]
async fn hostile_strings_arrive_byte_for_byte_and_inject_nothing() {
    let lab = Partner::start(201, json!({})).await;
    let portal = Partner::start(200, json!({})).await;
    let ferry = Ferry::shipped(&lab, &portal).await;
    let url = format!("{}/api/v1/test-requests", ferry.url);

    for (i, hostile) in HOSTILE.iter().enumerate() {
        let mut request = payload("test-request.json");
        request["customer"]["name"] = json!(hostile);
        request["notes"] = json!(hostile);
        request["portal_ref"] = json!(format!("PR-{i}"));
        let (status, reply) = post_json(&url, &request).await;
        assert_eq!(status, 202, "{hostile:?}: {reply}");

        crate::util::wait_until("the lab has the order", || lab.received().len() == i + 1).await;
        let received = &lab.received()[i];
        let order = received.json();
        assert_eq!(order["client"]["name"].as_str(), Some(*hostile));
        assert_eq!(order["notes"].as_str(), Some(*hostile));
        let keys: Vec<&String> = order.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "client",
                "notes",
                "order_ref",
                "portal_ref",
                "samples",
                "submitted_at",
                "tests"
            ],
            "{hostile:?} changed the order's fields"
        );
        assert_eq!(order["client"].as_object().unwrap().len(), 3);
        // The bytes on the wire are exactly the JSON encoding of the hostile string.
        let encoded = serde_json::to_string(hostile).unwrap();
        assert!(
            std::str::from_utf8(&received.body)
                .unwrap()
                .contains(&encoded),
            "{hostile:?} is not on the wire as {encoded}"
        );
    }
}
