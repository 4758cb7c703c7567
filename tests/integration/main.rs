//! ferry's integration tests: one binary, real HTTP servers on 127.0.0.1:0.
//!
//! - `round_trip`: the shipped flows carry a Test Request to a mock lab and its results back
//!   to a mock portal.
//! - `errors`: every error status ferry answers, and that refused messages are not forwarded.
//! - `injection`: hostile strings arrive intact and cannot add fields.
//! - `delivery`: durable delivery, retries, dead letters, replay, idempotency, status.
//! - `features`: path parameters, routing, text templates and response capture.
//! - `partners`: a second lab added by YAML alone.
//! - `hl7_lab`: a lab speaking HL7 v2 over MLLP, added by YAML alone, against a real MLLP
//!   peer.
//! - `fhir_lab`: a lab whose system is a FHIR R4 server, added by YAML alone.
//! - `queues`: embedded, RabbitMQ and NATS queues, and the examples built on them.
//! - `check`: `ferry check` on broken flows reports every problem at its line and column.
//! - `cli`: the `ferry` binary serving the shipped flows.
//! - `console`: the operator's console in headless Chromium, and its guards.
//! - `faults`: brokers cut off, a full disk, silent connections, lost answers, ferry killed
//!   in the narrowest windows: nothing lost, nothing done twice.
//! - `lsp`: `ferry lsp` driven over stdio as an editor drives it.
//! - `layers`: the module graph of `src/` keeps its layers and has no cycle.
//! - `leaks`: secrets and hostile values never leave by an error path.
//! - `replicas`: several ferry processes sharing one PostgreSQL store.
//! - `store`: the store's conformance suite, on SQLite and on PostgreSQL.

#[macro_use]
mod util;

mod check;
mod cli;
mod console;
mod delivery;
mod errors;
mod faults;
mod features;
mod fhir_lab;
mod hl7_lab;
mod hostile;
mod injection;
mod layers;
mod leaks;
mod lsp;
mod partners;
mod queues;
mod replicas;
mod round_trip;
mod security;
mod store;
