//! ferry: a declarative integration runtime.
//!
//! Integrators describe flows in YAML: a trigger, steps and targets. ferry loads them,
//! compiles every schema, template and JSONPath once, and serves them.
//!
//! # Layout
//!
//! Modules form layers: each uses its own layer and those below, never one above, and no
//! modules use each other in a cycle (`tests/integration/layers.rs` keeps it so). From the
//! bottom:
//!
//! 1. **Foundations.** [`message`]: what moves through a flow (`body`, `vars`, `meta`, and
//!    the one constructor of `meta` per way in). [`diagnostic`]: a problem at a file's line
//!    and column. [`redact`]: what must not leave by an error path. [`retry`]: retry budgets,
//!    backoff and what an answer means. [`fault`]: the points where tests stop ferry.
//!    [`observe`]: metrics and trace export. [`hl7`]: HL7 v2 bodies (ER7) read into JSON,
//!    and values escaped for them. [`tls`]: the certificate a server presents.
//! 2. **The flow format and the leaf compilers.** [`config`]: the flow file format (serde
//!    types) and reading flow files. [`error`]: errors and their one mapping to HTTP replies.
//!    [`jsonpath`], [`template`] (structural and text templates, expressions and helpers),
//!    [`schema`] (JSON Schemas, their defaults and declared fields), [`json`] (strict bodies).
//! 3. **[`compile`]**: what compiling any part of a flow has at hand (`compile::Ctx`).
//! 4. **Components**, each compiling its own config: [`auth`] (who may call a trigger),
//!    [`steps`] (`validate`, `set`, `transform`, `route`, `correlate`), [`targets`] (HTTP,
//!    MLLP, queue and flow targets, each making its own attempt, and their mocks),
//!    [`mllp`] (HL7 v2 over TCP: frames and acknowledgements), [`queue`]
//!    (embedded, AMQP and NATS queues), [`store`] (the durable store on SQLite or PostgreSQL),
//!    [`handoff`] (accepted messages on their way to a delivery worker without a claim).
//! 5. **[`flow`]**: a compiled flow, and what it does to one message.
//! 6. **[`project`]**: the compiler of flows and projects, every problem at once.
//! 7. **[`engine`]**: the message path every entry point goes through.
//! 8. **Workers**: [`delivery`] drains the outbox; [`consume`] feeds queue messages in.
//! 9. **[`runtime`]**: starts and stops the engine's workers together.
//! 10. **What serves and tests it**: [`server`] (the HTTP server), [`mllp_server`] (the
//!     MLLP listeners), [`openapi`] (the endpoints described for partners), [`lsp`] (the
//!     language server for editors), [`admin`] (the admin API), [`session`] and
//!     [`console`] (the operator's console in a browser), [`testing`] (`ferry test` and `ferry run`, on the engine with mocks), then
//!     [`reload`] (swapping the flows being served), [`demo`] and, on top, [`cli`].

pub mod admin;
pub mod auth;
pub mod cli;
pub mod compile;
pub mod config;
pub mod console;
pub mod consume;
pub mod delivery;
pub mod demo;
pub mod diagnostic;
pub mod engine;
pub mod error;
pub mod fault;
pub mod flow;
pub mod handoff;
pub mod hl7;
pub mod json;
pub mod jsonpath;
pub mod lsp;
pub mod message;
pub mod mllp;
pub mod mllp_server;
pub mod observe;
pub mod openapi;
pub mod project;
pub mod queue;
pub mod redact;
pub mod reload;
pub mod retry;
pub mod runtime;
pub mod schema;
pub mod server;
pub mod session;
pub mod steps;
pub mod store;
pub mod targets;
pub mod template;
pub mod testing;
pub mod tls;
