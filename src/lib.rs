//! ferry: a declarative integration runtime.
//!
//! Integrators describe flows in YAML: a trigger, steps and targets. ferry loads them,
//! compiles every schema, template and JSONPath once, and serves them.
//!
//! # Layout
//!
//! - [`config`]: the flow file format (serde types) and reading flow files.
//! - [`compile`]: from flow files to a [`compile::Project`] of runnable flows, collecting
//!   every [`diagnostic::Diagnostic`].
//! - [`flow`]: a compiled flow and how it handles one message.
//! - [`message`]: what moves through a flow (`body`, `vars`, `meta`).
//! - [`steps`]: `validate`, `set`, `transform`, `route`.
//! - [`targets`]: where messages go (`http`), and how outcomes are classified.
//! - [`template`], [`jsonpath`], [`schema`]: the compilers steps and targets share.
//! - [`server`]: the HTTP server that runs flows' triggers; [`auth`] decides who may call
//!   them and [`json`] reads their bodies strictly.
//! - [`error`]: errors and their single mapping to HTTP replies; [`redact`] keeps secrets
//!   and unbounded values out of them.
//! - [`store`]: the durable store; [`delivery`] drains its outbox, [`queue`] consumes and
//!   publishes queues, [`fault`] lets tests stop ferry in the narrowest windows of both.
//! - [`cli`]: the `ferry` command.

pub mod admin;
pub mod auth;
pub mod cli;
pub mod compile;
pub mod config;
pub mod delivery;
pub mod demo;
pub mod diagnostic;
pub mod error;
pub mod fault;
pub mod flow;
pub mod json;
pub mod jsonpath;
pub mod message;
pub mod observe;
pub mod project;
pub mod queue;
pub mod redact;
pub mod reload;
pub mod retry;
pub mod runtime;
pub mod schema;
pub mod server;
pub mod steps;
pub mod store;
pub mod targets;
pub mod template;
pub mod testing;
