//! `--set KEY=VALUE`: a recipe's keys changed from the command line.
//!
//! An override is applied to the parsed step, not to the text: the step is turned into JSON,
//! the key set there, and the JSON read back into the step's struct, so unknown keys and wrong
//! types are refused as in the file, and every check of a recipe then runs on the result. The
//! step's configuration, and so its cache identity, changes with it. Errors name the flag, not a
//! line: the value is not in the file.

use serde_json::Value;

use super::{Step, StepConfig, StepKind};

/// One `--set`: `steps.NAME.KEY.PATH=VALUE`, or `name=…` / `workdir=…`.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// The flag's text, for errors.
    pub flag: String,
    /// The step it changes; `None` for the recipe's own `name` and `workdir`.
    pub step: Option<String>,
    /// The key inside the step (or the top-level key), e.g. `kd.alpha`.
    pub key: String,
    pub value: Value,
}

impl Override {
    /// Reads `KEY=VALUE`; the value is YAML (`0.3`, `true`, `reverse_kl`, `[0, 1]`, `{lambda: 1}`).
    pub fn parse(flag: &str) -> Result<Self, String> {
        let example = "write KEY=VALUE, e.g. `--set steps.student.kd.alpha=0.3`";
        let (key, raw) = flag.split_once('=').ok_or_else(|| format!("no `=`: {example}"))?;
        let value: Value = if raw.trim().is_empty() {
            return Err(format!("no value after `=`: {example}"));
        } else {
            serde_saphyr::from_str(raw).map_err(|e| format!("the value `{raw}` is not YAML: {e}"))?
        };
        let (step, key) = match key.split_once('.') {
            Some(("steps", rest)) => match rest.split_once('.') {
                Some((name, key)) if !name.is_empty() && !key.is_empty() => (Some(name.to_string()), key.to_string()),
                _ => return Err(format!("`{key}` names no key of a step: write `steps.NAME.KEY`, {example}")),
            },
            None if key == "name" || key == "workdir" => (None, key.to_string()),
            _ => {
                return Err(format!(
                    "`{key}` is not a recipe key: a step's keys are `steps.NAME.KEY`, the recipe's own are `name` \
                     and `workdir`"
                ))
            }
        };
        if key.split('.').any(str::is_empty) {
            return Err(format!("`{key}` has an empty part: {example}"));
        }
        Ok(Self { flag: flag.to_string(), step, key, value })
    }

    /// Whether an error message about `named` (a key as checks write it, e.g. `kd.alpha`) is
    /// about this override's key, or a key inside it, or one it is inside.
    pub fn covers(&self, named: &str) -> bool {
        let (a, b) = (self.key.as_str(), named);
        a == b || b.starts_with(&format!("{a}.")) || a.starts_with(&format!("{b}.")) || b.starts_with(&format!("{a}["))
    }
}

/// Sets `o`'s key in `step` (which `o` names).
pub fn apply(step: &mut Step, o: &Override) -> Result<(), String> {
    let mut json = step.config_json().map_err(|e| e.to_string())?;
    let parts: Vec<&str> = o.key.split('.').collect();
    let mut at = &mut json;
    for part in &parts[..parts.len() - 1] {
        if at.is_null() {
            *at = Value::Object(Default::default());
        }
        let Some(map) = at.as_object_mut() else {
            return Err(format!("`{}` holds a value, not keys: `{part}` cannot be set inside it", o.key));
        };
        at = map.entry(part.to_string()).or_insert(Value::Null);
    }
    match at {
        Value::Null => *at = Value::Object(Default::default()),
        Value::Object(_) => {}
        _ => return Err(format!("`{}` holds a value, not keys", o.key)),
    }
    let last = parts[parts.len() - 1];
    at.as_object_mut().expect("an object").insert(last.to_string(), o.value.clone());
    // Every struct of a step denies unknown keys, so a misspelt key fails here, as in the file.
    step.config = from_json(step.kind(), json).map_err(|e| format!("`{}`: {e}", o.key))?;
    Ok(())
}

/// A step's keys read back from JSON into the struct of its kind.
pub fn from_json(kind: StepKind, json: Value) -> serde_json::Result<StepConfig> {
    use serde_json::from_value as read;
    Ok(match kind {
        StepKind::Task => StepConfig::Task(read(json)?),
        StepKind::Finetune => StepConfig::Finetune(read(json)?),
        StepKind::Generate => StepConfig::Generate(read(json)?),
        StepKind::Score => StepConfig::Score(read(json)?),
        StepKind::Distill => StepConfig::Distill(read(json)?),
        StepKind::Eval => StepConfig::Eval(read(json)?),
        StepKind::Export => StepConfig::Export(read(json)?),
    })
}
