//! Arbitrary text as an HL7 v2 message: reading it must refuse or succeed, never panic; and
//! the text as a value, escaped into a field, must read back as itself in that one field.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = ferry::hl7::parse(text);
    if text.is_empty() {
        return;
    }
    let message = format!("MSH|^~\\&|A\rZZZ|{}|after\r", ferry::hl7::escape(text));
    let body = ferry::hl7::parse(&message).expect("an escaped value always reads");
    assert_eq!(body["ZZZ"].as_array().map(Vec::len), Some(1));
    assert_eq!(body["ZZZ"][0]["1"], Value::String(text.to_owned()));
    assert_eq!(body["ZZZ"][0]["2"], "after");
});
