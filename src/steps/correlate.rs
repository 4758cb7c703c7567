//! `correlate`: saves or finds a record that messages of several flows share.
//!
//! `save` creates the record under its keys (or updates the one an existing key names);
//! `find` looks it up by the first key that names one and puts it in a var. Either may add
//! data and a lifecycle state. Writes are committed with the message, so they happen exactly
//! when the message is accepted.

use serde_json::Value;

use super::StepState;
use crate::compile::Ctx;
use crate::config::CorrelateConfig;
use crate::error::FlowError;
use crate::message::Message;
use crate::store::{CorrelationWrite, Store};
use crate::template::{Escape, JsonTemplate, Templates, TextTemplate};

/// A compiled `correlate` step.
#[derive(Debug)]
pub struct Correlate {
    context: String,
    mode: Mode,
    keys: Vec<TextTemplate>,
    data: Option<JsonTemplate>,
    state: Option<String>,
}

#[derive(Debug)]
enum Mode {
    Save,
    Find { into: String },
}

impl Correlate {
    pub(crate) fn compile(config: &CorrelateConfig, ctx: &mut Ctx<'_>) -> Option<Self> {
        let (mode, keys) = match (&config.save, &config.find) {
            (Some(keys), None) => (Mode::Save, keys),
            (None, Some(keys)) => (
                Mode::Find {
                    into: config.into.clone().unwrap_or_else(|| "correlation".into()),
                },
                keys,
            ),
            _ => {
                ctx.error(
                    config.context.referenced,
                    "a correlate step has either `save` or `find`",
                );
                return None;
            }
        };
        if keys.is_empty() {
            ctx.error(config.context.referenced, "list at least one key template");
            return None;
        }
        if matches!(mode, Mode::Save) && config.into.is_some() {
            ctx.error(config.context.referenced, "`into` goes with `find`");
            return None;
        }
        let keys: Vec<_> = keys
            .iter()
            .map(|k| ctx.text_template(&k.value, Escape::Plain, k.referenced))
            .collect();
        let data = match &config.data {
            Some(data) => Some(ctx.json_template(&data.value, data.referenced)?),
            None => None,
        };
        Some(Self {
            context: config.context.value.clone(),
            mode,
            keys: keys.into_iter().collect::<Option<_>>()?,
            data,
            state: config.state.as_ref().map(|s| s.value.clone()),
        })
    }

    pub(crate) async fn apply(
        &self,
        message: &mut Message,
        templates: &Templates,
        state: &mut StepState,
        store: Option<&Store>,
        label: &str,
    ) -> Result<(), FlowError> {
        let unprocessable = |reason: String| FlowError::Unprocessable {
            context: label.to_owned(),
            reason,
        };
        let mut keys = Vec::with_capacity(self.keys.len());
        for key in &self.keys {
            let key = templates.render_text(key, message).map_err(unprocessable)?;
            if !key.is_empty() {
                keys.push(key);
            }
        }
        let data = match &self.data {
            Some(template) => templates
                .render_json(template, message)
                .map_err(unprocessable)?,
            None => Value::Null,
        };
        match &self.mode {
            Mode::Save => {
                if keys.is_empty() {
                    return Err(unprocessable("every key template rendered empty".into()));
                }
                state.correlation.push(CorrelationWrite::Save {
                    context: self.context.clone(),
                    keys,
                    data,
                    state: self.state.clone(),
                });
            }
            Mode::Find { into } => {
                let store = store
                    .ok_or_else(|| FlowError::Unavailable("correlation needs a store".into()))?;
                let found = store
                    .find_correlation(&self.context, &keys)
                    .await
                    .map_err(|e| FlowError::Unavailable(e.to_string()))?;
                let Some(record) = found else {
                    return Err(FlowError::NotCorrelated {
                        context: self.context.clone(),
                        keys,
                    });
                };
                message.set_var(into, record.to_value());
                state.correlation.push(CorrelationWrite::Update {
                    record_id: record.id,
                    keys: Vec::new(),
                    data,
                    state: self.state.clone(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::Correlate;
    use crate::compile::bench::{Bench, message};
    use crate::error::FlowError;
    use crate::steps::StepState;
    use crate::store::{CorrelationWrite, Store};

    const SAVE: &str = r#"
context: test-request
save: ["{{body.ref}}", "{{body.lab_ref}}"]
data: {patient: "{{body.patient}}"}
state: sent
"#;

    const FIND: &str = r#"
context: test-request
find: ["{{body.lab_ref}}", "{{body.ref}}"]
into: request
state: resulted
"#;

    #[tokio::test]
    async fn save_writes_with_the_message_and_find_reads_it_back() {
        let mut bench = Bench::new();
        let save = bench.compile(SAVE, Correlate::compile).unwrap();
        let find = bench.compile(FIND, Correlate::compile).unwrap();
        let store = Store::open("sqlite::memory:").await.unwrap();

        let mut state = StepState::default();
        let mut sent = message(json!({"ref": "R-1", "lab_ref": "", "patient": "P-9"}));
        save.apply(
            &mut sent,
            &bench.templates,
            &mut state,
            Some(&store),
            "step 1",
        )
        .await
        .unwrap();
        // The empty key is left out; nothing is written until the message is committed.
        let [
            CorrelationWrite::Save {
                keys,
                data,
                state: s,
                ..
            },
        ] = &state.correlation[..]
        else {
            panic!("{:?}", state.correlation);
        };
        assert_eq!(
            (keys, data, s.as_deref()),
            (
                &vec!["R-1".to_owned()],
                &json!({"patient": "P-9"}),
                Some("sent")
            )
        );
        let mut early = message(json!({"lab_ref": "", "ref": "R-1"}));
        let not_yet = find
            .apply(
                &mut early,
                &bench.templates,
                &mut StepState::default(),
                Some(&store),
                "step 1",
            )
            .await;
        assert!(
            matches!(not_yet, Err(FlowError::NotCorrelated { .. })),
            "{not_yet:?}"
        );

        store
            .correlate(state.correlation, Vec::new())
            .await
            .unwrap();
        let mut result = message(json!({"lab_ref": "L-7", "ref": "R-1"}));
        let mut found = StepState::default();
        find.apply(
            &mut result,
            &bench.templates,
            &mut found,
            Some(&store),
            "step 1",
        )
        .await
        .unwrap();
        let record = &result.root()["vars"]["request"];
        assert_eq!(record["key"], "R-1");
        assert_eq!(record["data"], json!({"patient": "P-9"}));
        assert_eq!(record["state"], "sent");
        assert!(matches!(
            &found.correlation[..],
            [CorrelationWrite::Update { state: Some(s), .. }] if s == "resulted"
        ));
    }

    #[tokio::test]
    async fn save_needs_a_key_and_find_needs_a_store() {
        let mut bench = Bench::new();
        let save = bench.compile(SAVE, Correlate::compile).unwrap();
        let find = bench.compile(FIND, Correlate::compile).unwrap();
        let keyless = save
            .apply(
                &mut message(json!({"ref": "", "lab_ref": "", "patient": ""})),
                &bench.templates,
                &mut StepState::default(),
                None,
                "step 2",
            )
            .await
            .unwrap_err();
        assert!(
            keyless
                .to_string()
                .contains("every key template rendered empty"),
            "{keyless}"
        );
        let storeless = find
            .apply(
                &mut message(json!({"ref": "R", "lab_ref": ""})),
                &bench.templates,
                &mut StepState::default(),
                None,
                "step 2",
            )
            .await;
        assert!(
            matches!(storeless, Err(FlowError::Unavailable(_))),
            "{storeless:?}"
        );
    }

    #[test]
    fn a_step_saves_or_finds_by_at_least_one_key() {
        let mut bench = Bench::new();
        for (yaml, says) in [
            ("context: c", "either `save` or `find`"),
            (
                "context: c\nsave: [a]\nfind: [b]",
                "either `save` or `find`",
            ),
            ("context: c\nsave: []", "at least one key"),
            ("context: c\nsave: [a]\ninto: x", "`into` goes with `find`"),
        ] {
            let error = bench.compile(yaml, Correlate::compile).unwrap_err();
            assert!(error.contains(says), "{yaml}: {error}");
        }
    }
}
