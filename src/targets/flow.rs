//! `flow` target: hands the message to another flow, in-process. The called flow's reply
//! fields become the caller's vars; in a `sync` flow without its own `reply`, the called
//! flow's reply is the caller's. `ferry check` refuses unknown flows and call cycles.

/// A compiled `flow` target.
#[derive(Debug)]
pub struct FlowTarget {
    name: String,
    /// The flow it calls.
    pub flow: String,
}

impl FlowTarget {
    pub(crate) fn new(name: &str, flow: &str) -> Self {
        Self {
            name: name.to_owned(),
            flow: flow.to_owned(),
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }
}
