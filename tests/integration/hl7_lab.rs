//! A lab that speaks HL7 v2 over MLLP (`examples/hl7-lab`), added beside the shipped flows:
//! orders go to it as OML^O21 and its ORU^R01 results come back to the portal, against a
//! real MLLP peer on loopback. The lab down, `AR`, `AE`, a message sent again, and ferry
//! killed between storing a message and acknowledging it: nothing lost, nothing handled
//! twice.

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::util::process::terminate;
use crate::util::{
    FAST_RETRY, Ferry, Partner, SECRETS, payload, post_json, repo, wait_for_state, wait_until,
};

/// How the mock lab answers a message.
#[derive(Debug, Clone)]
enum Answer {
    /// An `ACK` with this code.
    Ack(&'static str),
    /// An `ORL^O22` accepting the order under the lab's own id (ORC-3).
    Orl(&'static str),
}

/// A laboratory system on loopback that takes MLLP messages and answers each as planned.
struct MllpLab {
    address: String,
    received: Arc<Mutex<Vec<String>>>,
    answers: Arc<Mutex<Vec<Answer>>>,
}

impl MllpLab {
    /// A lab answering `answers` in turn, then the last one forever.
    async fn start(answers: Vec<Answer>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, answers)
    }

    /// The same, on `address` (a lab that was down and comes up).
    async fn start_on(address: &str, answers: Vec<Answer>) -> Self {
        Self::serve(TcpListener::bind(address).await.unwrap(), answers)
    }

    fn serve(listener: TcpListener, answers: Vec<Answer>) -> Self {
        let address = listener.local_addr().unwrap().to_string();
        let (received, answers) = (Arc::default(), Arc::new(Mutex::new(answers)));
        let lab = Self {
            address,
            received: Arc::clone(&received),
            answers: Arc::clone(&answers),
        };
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (received, answers) = (Arc::clone(&received), Arc::clone(&answers));
                tokio::spawn(async move {
                    while let Some(message) = read_frame(&mut stream).await {
                        received.lock().unwrap().push(message.clone());
                        let answer = {
                            let mut answers = answers.lock().unwrap();
                            if answers.len() > 1 {
                                answers.remove(0)
                            } else {
                                answers[0].clone()
                            }
                        };
                        let reply = lab_answer(&message, &answer);
                        if write_frame(&mut stream, &reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        lab
    }

    fn received(&self) -> Vec<String> {
        self.received.lock().unwrap().clone()
    }
}

/// Field `n` of segment `id` of an ER7 message, as written (`MSH-10` is `field(m, "MSH", 10)`).
fn field(message: &str, id: &str, n: usize) -> String {
    let segment = message
        .split('\r')
        .find(|s| s.starts_with(id))
        .unwrap_or_default();
    // MSH-1 is the separator itself, so MSH's fields are one further along.
    let n = if id == "MSH" { n - 1 } else { n };
    segment.split('|').nth(n).unwrap_or_default().to_owned()
}

/// What the lab answers to `message`.
fn lab_answer(message: &str, answer: &Answer) -> String {
    let control_id = field(message, "MSH", 10);
    let header = "MSH|^~\\&|LIS|HELIX|FERRY|PORTAL|20261128093001||";
    match answer {
        Answer::Ack(code) => format!(
            "{header}ACK^O21^ACK|A-{control_id}|P|2.5.1\rMSA|{code}|{control_id}\rERR|||207^Application internal error^HL70357|E||||the lab says {code}\r"
        ),
        Answer::Orl(lab_id) => format!(
            "{header}ORL^O22^ORL_O22|A-{control_id}|P|2.5.1\rMSA|AA|{control_id}\rORC|OK|{}|{lab_id}\r",
            field(message, "ORC", 2)
        ),
    }
}

async fn write_frame(stream: &mut TcpStream, message: &str) -> std::io::Result<()> {
    let mut framed = vec![0x0b];
    framed.extend_from_slice(message.as_bytes());
    framed.extend_from_slice(&[0x1c, 0x0d]);
    stream.write_all(&framed).await
}

/// The next framed message on `stream`; `None` once it closes.
async fn read_frame(stream: &mut TcpStream) -> Option<String> {
    let mut bytes = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        bytes.push(byte[0]);
        if bytes.ends_with(&[0x1c, 0x0d]) {
            let start = bytes.iter().position(|b| *b == 0x0b)?;
            return Some(String::from_utf8_lossy(&bytes[start + 1..bytes.len() - 2]).into_owned());
        }
    }
}

/// Sends `message` to ferry's MLLP listener at `address` and returns its acknowledgement
/// (`None` when the connection closed without one).
async fn send_to_ferry(address: &str, message: &str) -> Option<String> {
    let mut stream = TcpStream::connect(address).await.unwrap();
    write_frame(&mut stream, message).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), read_frame(&mut stream))
        .await
        .expect("no acknowledgement within 10 s")
}

/// An ORU^R01 for the request `order_ref`, under control id `control_id`.
fn oru(order_ref: &str, control_id: &str) -> String {
    format!(
        "MSH|^~\\&|LIS|HELIX|FERRY|PORTAL|20261122160405+0100||ORU^R01^ORU_R01|{control_id}|P|2.5.1\r\
         PID|1||C-1001^^^PORTAL||ACME WATER LTD\r\
         OBR|1|{order_ref}|HX-4711|PH^pH|||20261120093000+0200|||||||||||||||20261122160405+0100|||F\r\
         OBX|1|NM|PH^pH|S-1|7.20|pH|6.5-8.5|N|||F\r\
         OBX|2|NM|PB-ICPMS^Lead|S-1|12.5|ug/L|0-10|H|||F\r"
    )
}

/// The shipped flows with the HL7 lab's, ordering from `lab` (an MLLP address), results
/// delivered to `portal`.
async fn serve_with_hl7_lab(helix: &str, default_lab: &Partner, portal: &Partner) -> Ferry {
    let mut env = vec![
        ("LAB_URL", default_lab.url.as_str()),
        ("PORTAL_URL", portal.url.as_str()),
        ("HELIX_MLLP", helix),
        ("HELIX_RESULTS_LISTEN", "127.0.0.1:0"),
    ];
    env.extend(FAST_RETRY);
    let flows = [repo().join("flows"), repo().join("examples/hl7-lab/flows")];
    Ferry::start_many(&flows, &env).await
}

/// Submits a Test Request for `lab` (the default lab when `None`); its request id.
async fn submit(ferry: &Ferry, lab: Option<&str>, portal_ref: &str) -> String {
    let mut request = payload("test-request.json");
    request["portal_ref"] = json!(portal_ref);
    if let Some(lab) = lab {
        request["lab"] = json!(lab);
    }
    let (status, reply) = post_json(&format!("{}/api/v1/test-requests", ferry.url), &request).await;
    assert_eq!(status, 202, "{reply}");
    reply["request_id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn an_hl7_lab_takes_orders_over_mllp_and_its_results_reach_the_portal_once() {
    let helix = MllpLab::start(vec![Answer::Orl("HX-4711")]).await;
    let (default_lab, portal) = (
        Partner::start(201, json!({})).await,
        Partner::start(200, json!({})).await,
    );
    let ferry = serve_with_hl7_lab(&helix.address, &default_lab, &portal).await;
    let request_id = submit(&ferry, Some("helix"), "PR-HL7-1").await;

    // The order: an OML^O21 whose placer order number is ferry's id of the request.
    let state = wait_for_state(&ferry.url, &request_id, "delivered_to_lab").await;
    assert_eq!(
        state["lab_order_id"], "HX-4711",
        "captured from the ORL^O22"
    );
    let orders = helix.received();
    assert_eq!(orders.len(), 1);
    assert_eq!(field(&orders[0], "MSH", 9), "OML^O21^OML_O21");
    assert_eq!(field(&orders[0], "ORC", 2), request_id);
    assert_eq!(field(&orders[0], "PID", 3), "C-1001^^^PORTAL");
    assert!(default_lab.received().is_empty());

    // The results: acknowledged AA, naming the message's control id, once stored.
    let results = ferry.mllp_address("helix-results").to_string();
    let message = oru(&request_id, "HX-90001");
    let ack = send_to_ferry(&results, &message).await.unwrap();
    assert_eq!(field(&ack, "MSA", 1), "AA", "{ack}");
    assert_eq!(field(&ack, "MSA", 2), "HX-90001");
    assert_eq!(field(&ack, "MSH", 9), "ACK^R01^ACK");
    assert_eq!(field(&ack, "MSH", 5), "LIS", "addressed back to the sender");
    wait_until("the portal has the results", || {
        portal.accepted().len() == 1
    })
    .await;
    let delivered = portal.accepted()[0].json();
    assert_eq!(delivered["request_id"], request_id.as_str());
    assert_eq!(delivered["portal_ref"], "PR-HL7-1");
    assert_eq!(delivered["lab_order_id"], "HX-4711");
    assert_eq!(delivered["status"], "completed");
    assert_eq!(delivered["completed_at"], "2026-11-22T15:04:05Z");
    assert_eq!(
        delivered["results"][1],
        json!({"sample_id": "S-1", "code": "PB-ICPMS", "value": 12.5, "unit": "ug/L", "flag": "high", "comment": "Lead"})
    );
    wait_for_state(&ferry.url, &request_id, "delivered_to_portal").await;

    // Sent again (the lab never saw the first ACK): acknowledged again, handled once.
    let again = send_to_ferry(&results, &message).await.unwrap();
    assert_eq!(field(&again, "MSA", 1), "AA", "{again}");
    assert_eq!(field(&again, "MSA", 2), "HX-90001");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(portal.received().len(), 1, "handled once");
}

#[tokio::test]
async fn results_ferry_cannot_take_are_answered_ae_with_the_reason_in_err() {
    let helix = MllpLab::start(vec![Answer::Ack("AA")]).await;
    let (default_lab, portal) = (
        Partner::start(201, json!({})).await,
        Partner::start(200, json!({})).await,
    );
    let ferry = serve_with_hl7_lab(&helix.address, &default_lab, &portal).await;
    let results = ferry.mllp_address("helix-results").to_string();

    // Results for a request nobody knows: HL7's "unknown key identifier".
    let ack = send_to_ferry(
        &results,
        &oru("0193a1b2-0000-7000-8000-0000000dead0", "HX-1"),
    )
    .await
    .unwrap();
    assert_eq!(field(&ack, "MSA", 1), "AE", "{ack}");
    assert_eq!(field(&ack, "MSA", 2), "HX-1");
    assert!(field(&ack, "ERR", 3).starts_with("204^"), "{ack}");
    assert!(
        field(&ack, "ERR", 8).contains("no test-request matches"),
        "{ack}"
    );

    // Not an ORU^R01: the schema's violations, in the ERR segment.
    let adt = "MSH|^~\\&|LIS|HELIX|FERRY|PORTAL|20261122160405||ADT^A01^ADT_A01|HX-2|P|2.5.1\rPID|1||C-1\r";
    let ack = send_to_ferry(&results, adt).await.unwrap();
    assert_eq!(field(&ack, "MSA", 1), "AE", "{ack}");
    assert!(
        field(&ack, "ERR", 8).contains("oru-r01.schema.json"),
        "{ack}"
    );

    // Not HL7 at all: still answered, with HL7's "data type error", on the same connection.
    let mut stream = TcpStream::connect(&results).await.unwrap();
    write_frame(&mut stream, "hello").await.unwrap();
    let ack = read_frame(&mut stream).await.unwrap();
    assert_eq!(field(&ack, "MSA", 1), "AE", "{ack}");
    assert!(field(&ack, "ERR", 3).starts_with("102^"), "{ack}");
    write_frame(&mut stream, adt).await.unwrap();
    assert_eq!(
        field(&read_frame(&mut stream).await.unwrap(), "MSA", 2),
        "HX-2"
    );
    assert!(portal.received().is_empty());
}

#[tokio::test]
async fn an_hl7_lab_that_is_down_or_answers_ar_gets_the_order_again_and_ae_makes_a_dead_letter() {
    // A lab that is down: its port refuses connections until it comes up.
    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = down.local_addr().unwrap().to_string();
    drop(down);
    let (default_lab, portal) = (
        Partner::start(201, json!({})).await,
        Partner::start(200, json!({})).await,
    );
    let ferry = serve_with_hl7_lab(&address, &default_lab, &portal).await;
    let request_id = submit(&ferry, Some("helix"), "PR-HL7-DOWN").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, status) = crate::util::status_of(&ferry.url, &request_id).await;
    assert_ne!(status["status"], "delivered_to_lab", "{status}");

    // It comes up answering AR twice, then takes the order.
    let helix = MllpLab::start_on(
        &address,
        vec![Answer::Ack("AR"), Answer::Ack("AR"), Answer::Orl("HX-9")],
    )
    .await;
    let state = wait_for_state(&ferry.url, &request_id, "delivered_to_lab").await;
    assert_eq!(state["lab_order_id"], "HX-9");
    let sent = helix.received();
    assert_eq!(sent.len(), 3, "AR, AR, AA");
    let control_ids: BTreeSet<String> = sent.iter().map(|m| field(m, "MSH", 10)).collect();
    assert_eq!(control_ids.len(), 1, "every attempt under one control id");

    // AE: refused for what it holds; a dead letter, the lab's acknowledgement kept.
    *helix.answers.lock().unwrap() = vec![Answer::Ack("AE")];
    let refused = submit(&ferry, Some("helix"), "PR-HL7-AE").await;
    wait_for_state(&ferry.url, &refused, "failed").await;
    assert_eq!(helix.received().len(), 4, "AE is not tried again");
    let (status, detail) = ferry.admin(&format!("/messages/{refused}")).await;
    assert_eq!(status, 200, "{detail}");
    let text = detail.to_string();
    assert!(
        text.contains("MSA|AE|"),
        "the acknowledgement is kept: {text}"
    );
    assert!(text.contains("the lab says AE"), "{text}");
}

/// ferry serving the shipped flows and the HL7 lab's as a child process on `store`, with
/// `env`; its URL and the address of the results' MLLP listener.
fn spawn_with_hl7_lab(store: &str, env: &[(&str, &str)]) -> (Child, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["serve", "--listen", "127.0.0.1:0", "--store", store])
        .args(["--flows", "flows", "--flows", "examples/hl7-lab/flows"])
        .current_dir(repo())
        .envs(env.iter().copied())
        .envs(FAST_RETRY)
        .envs(SECRETS)
        .env("HELIX_RESULTS_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (url, mllp) = addresses(&mut child);
    (child, url, mllp)
}

/// The URL and the MLLP address `child` says it listens on.
fn addresses(child: &mut Child) -> (String, String) {
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut mllp = String::new();
    loop {
        let line = lines.next().unwrap().unwrap();
        if let Some(rest) = line.strip_prefix("ferry mllp listening on mllp://") {
            mllp = rest.split_whitespace().next().unwrap().to_owned();
        } else if let Some(url) = line.strip_prefix("ferry listening on ") {
            // Keep reading stdout, so ferry never writes to a closed pipe.
            std::thread::spawn(move || lines.for_each(drop));
            return (url.to_owned(), mllp);
        }
    }
}

#[tokio::test]
async fn ferry_killed_between_storing_results_and_acknowledging_them_handles_them_once() {
    let (lab, portal) = (
        Partner::start(201, json!({"lab_order_id": "LAB-K9"})).await,
        Partner::start(200, json!({})).await,
    );
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}/ferry.db", dir.path().display());
    let env = [
        ("LAB_URL", lab.url.as_str()),
        ("PORTAL_URL", portal.url.as_str()),
        ("HELIX_MLLP", "127.0.0.1:9"),
    ];
    let (child, url, _) = spawn_with_hl7_lab(&store, &env);
    let request = payload("test-request.json");
    let (status, reply) = post_json(&format!("{url}/api/v1/test-requests"), &request).await;
    assert_eq!(status, 202, "{reply}");
    let request_id = reply["request_id"].as_str().unwrap().to_owned();
    wait_for_state(&url, &request_id, "delivered_to_lab").await;
    terminate(child).await;

    // Armed: ferry dies once the results are stored, before their acknowledgement leaves.
    let mut armed = env.to_vec();
    armed.push(("FERRY_FAULT", "before-mllp-ack"));
    let (mut child, _, mllp) = spawn_with_hl7_lab(&store, &armed);
    let message = oru(&request_id, "HX-K9");
    assert!(
        send_to_ferry(&mllp, &message).await.is_none(),
        "no acknowledgement from a process that died"
    );
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&exit),
        Some(6),
        "the fault point was not reached: {exit:?}"
    );

    // The lab, unanswered, sends the message again to the restarted ferry.
    let (child, url, mllp) = spawn_with_hl7_lab(&store, &env);
    let ack = send_to_ferry(&mllp, &message).await.unwrap();
    assert_eq!(field(&ack, "MSA", 1), "AA", "{ack}");
    assert_eq!(field(&ack, "MSA", 2), "HX-K9");
    wait_for_state(&url, &request_id, "delivered_to_portal").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Stored once: every delivery to the portal carries the one message's key.
    let keys = portal.idempotency_keys();
    assert_eq!(keys.len(), 1, "handled once: {keys:?}");
    terminate(child).await;
}

#[tokio::test]
async fn an_mllp_listener_serves_tls_with_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let flows = dir.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(flows.join("cert.pem"), certified.cert.pem()).unwrap();
    std::fs::write(flows.join("key.pem"), certified.signing_key.serialize_pem()).unwrap();
    let sink = Partner::start(200, json!({})).await;
    std::fs::write(
        flows.join("tls-results.yaml"),
        "name: tls-results\ntrigger:\n  mllp:\n    listen: 127.0.0.1:0\n    tls: { cert_file: cert.pem, key_file: key.pem }\ntargets:\n  sink:\n    http: { url: \"${SINK_URL}/in\" }\n",
    )
    .unwrap();
    let ferry = Ferry::start(&flows, &[("SINK_URL", sink.url.as_str())]).await;
    let address = ferry.mllp_address("tls-results");

    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(address).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = connector.connect(name, tcp).await.unwrap();
    let message =
        "MSH|^~\\&|LIS|HELIX|FERRY|PORTAL|20261122160405||ORU^R01^ORU_R01|TLS-1|P|2.5.1\rOBR|1|X\r";
    let mut framed = vec![0x0b];
    framed.extend_from_slice(message.as_bytes());
    framed.extend_from_slice(&[0x1c, 0x0d]);
    stream.write_all(&framed).await.unwrap();
    let mut ack = Vec::new();
    while !ack.ends_with(&[0x1c, 0x0d]) {
        let mut byte = [0u8; 1];
        assert_eq!(
            stream.read(&mut byte).await.unwrap(),
            1,
            "closed before the ACK"
        );
        ack.push(byte[0]);
    }
    let ack = String::from_utf8_lossy(&ack[1..ack.len() - 2]).into_owned();
    assert_eq!(field(&ack, "MSA", 1), "AA", "{ack}");
    assert_eq!(field(&ack, "MSA", 2), "TLS-1");
    wait_until("the sink has the message", || sink.accepted().len() == 1).await;

    // Plain MLLP gets no answer from a TLS listener.
    assert!(send_to_ferry(&address.to_string(), message).await.is_none());
}

#[tokio::test]
async fn an_mllp_target_speaks_tls_to_a_partner_whose_ca_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    // The lab: MLLP over TLS with that certificate, answering AA.
    let identity = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![certified.cert.der().clone()],
        rustls_pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(identity));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let received: Arc<Mutex<Vec<String>>> = Arc::default();
    let taken = Arc::clone(&received);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, taken) = (acceptor.clone(), Arc::clone(&taken));
            tokio::spawn(async move {
                let Ok(mut stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut bytes = Vec::new();
                while !bytes.ends_with(&[0x1c, 0x0d]) {
                    let mut byte = [0u8; 1];
                    if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    bytes.push(byte[0]);
                }
                let message = String::from_utf8_lossy(&bytes[1..bytes.len() - 2]).into_owned();
                let ack = lab_answer(&message, &Answer::Ack("AA"));
                taken.lock().unwrap().push(message);
                let mut framed = vec![0x0b];
                framed.extend_from_slice(ack.as_bytes());
                framed.extend_from_slice(&[0x1c, 0x0d]);
                let _ = stream.write_all(&framed).await;
                let _ = stream.flush().await;
            });
        }
    });

    let flows = dir.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::write(flows.join("lab-ca.pem"), certified.cert.pem()).unwrap();
    let flow = |name: &str, tls: &str| {
        format!(
            "name: {name}\ntrigger:\n  http: {{ method: POST, path: /{name}, auth: none }}\nsteps:\n  - transform:\n      content_type: x-application/hl7-v2+er7\n      text: |\n        MSH|^~\\&|FERRY|PORTAL|LIS|HELIX|20261128093000||OML^O21^OML_O21|{{{{body.id}}}}|P|2.5.1\ntargets:\n  lab:\n    mllp:\n      address: localhost:{port}\n      timeout: 5s\n      tls: {tls}\ndelivery: {{ mode: sync }}\n"
        )
    };
    std::fs::write(
        flows.join("trusting.yaml"),
        flow("trusting", "{ ca_file: lab-ca.pem }"),
    )
    .unwrap();
    std::fs::write(flows.join("public.yaml"), flow("public", "{}")).unwrap();
    let ferry = Ferry::start(&flows, &[]).await;
    let client = reqwest::Client::new();
    let post = |path: &str, id: &str| {
        client
            .post(format!("{}/{path}", ferry.url))
            .json(&json!({"id": id}))
            .send()
    };
    assert_eq!(post("trusting", "TLS-1").await.unwrap().status(), 200);
    assert_eq!(field(&received.lock().unwrap()[0], "MSH", 10), "TLS-1");
    // Trusting the public web's authorities alone, the lab's own certificate is refused.
    assert_eq!(post("public", "TLS-2").await.unwrap().status(), 502);
    assert_eq!(received.lock().unwrap().len(), 1);
}
