//! Checks of a parsed recipe that the types cannot make: names, references, the either-or
//! keys, bounds, and what a distill step's teachers must agree on. All run when the recipe
//! loads, before any step, so that a mistake in the last step is not found after hours.

use std::path::Path;

use super::{parse, parse_ref, DistillStep, Override, Recipe, RecipeError, StepConfig};
use crate::tokenizer::Tokenizer;
use crate::train::{self, ModelInit};

impl Recipe {
    /// Checks what the types cannot: names, references, and the either-or keys. An error about
    /// a key `overrides` set names the `--set` flag instead of a line.
    pub(super) fn validate(&self, text: &str, overrides: &[Override]) -> Result<(), RecipeError> {
        let whole = |message: String| RecipeError::Invalid { path: self.path.clone(), message };
        if self.name.trim().is_empty() {
            return Err(whole("the recipe `name` is empty; give the recipe a name".into()));
        }
        if self.steps.is_empty() {
            return Err(whole("the recipe has no `steps`; add at least one".into()));
        }
        for (i, step) in self.steps.iter().enumerate() {
            let err = |message: String| {
                parse::at(&self.path, text, step.line, step.column, format!("step `{}`: {message}", step.name))
            };
            // Errors about one value point at it: its first occurrence within the step's lines.
            let end = self.steps.get(i + 1).map_or(usize::MAX, |s| s.line);
            let err_at = |needle: &str, message: String| match parse::find(text, step.line, end, needle) {
                Some((line, column)) => {
                    parse::at(&self.path, text, line, column, format!("step `{}`: {message}", step.name))
                }
                None => err(message),
            };
            if step.name.is_empty() || !step.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(err("a step name must be non-empty and use only letters, digits, `-` and `_` \
                     (it names the step's output folder and appears in `steps.NAME.output`)"
                    .into()));
            }
            if let Some(first) = self.steps[..i].iter().find(|s| s.name == step.name) {
                return Err(err(format!(
                    "this name is already used by the step at line {}; step names must be unique",
                    first.line
                )));
            }
            let earlier: Vec<&str> = self.steps[..i].iter().map(|s| s.name.as_str()).collect();
            for (key, value) in step.inputs() {
                let Some(reference) = parse_ref(value) else {
                    continue;
                };
                // `key: value` when written so (block style), else the value alone (flow lists).
                let leaf = key.rsplit('.').next().unwrap_or(key);
                let keyed = format!("{leaf}: {value}");
                let at_value = |message: String| match parse::find(text, step.line, end, &keyed) {
                    Some((line, column)) => parse::at(
                        &self.path,
                        text,
                        line,
                        column + leaf.len() + 2,
                        format!("step `{}`: {message}", step.name),
                    ),
                    None => err_at(value, message),
                };
                let (target, sub) = reference.map_err(|m| at_value(format!("`{key}`: {m}")))?;
                let seeded = self.steps[..i].iter().find(|s| s.name == target).map_or(&[][..], |s| s.seeds());
                if let (Some(seed), "", false) = (seeded.first(), sub, key == "models") {
                    return Err(at_value(format!(
                        "`{key}: {value}`: step `{target}` trains once per seed (`seeds`), one folder each; \
                         name one, e.g. `steps.{target}.output/seed-{seed}`"
                    )));
                }
                if target == step.name {
                    return Err(at_value(format!(
                        "`{key}: {value}` refers to the step itself; use an earlier step's output"
                    )));
                }
                if !earlier.contains(&target) {
                    let message = if self.steps.iter().any(|s| s.name == target) {
                        format!("`{key}: {value}` refers to step `{target}`, which runs later; a step can only use the output of an earlier step (move it up)")
                    } else {
                        let known = if earlier.is_empty() { "none".to_string() } else { earlier.join(", ") };
                        format!("`{key}: {value}` refers to no step named `{target}`; steps before this one: {known}")
                    };
                    return Err(at_value(message));
                }
            }
            let model_init = |key: &str, init: &ModelInit, tokenizer: &Option<String>| {
                match (&init.from, &init.config) {
                (Some(_), Some(_)) | (None, None) => Err(err_at(&format!("{key}:"), format!(
                    "`{key}` needs exactly one of `from` (a pretrained model: folder, Hub id or alias) or `config` (a new model)"
                ))),
                (None, Some(_)) if tokenizer.is_none() => Err(err_at(&format!("{key}:"), format!(
                    "`{key}` is built from a `config`, so the step needs a `tokenizer` (a folder with tokenizer.json, e.g. `steps.task.output`)"
                ))),
                _ => Ok(()),
            }
            };
            match &step.config {
                StepConfig::Finetune(s) => model_init("model", &s.model, &s.tokenizer)?,
                StepConfig::Distill(s) => model_init("student", &s.student, &s.tokenizer)?,
                StepConfig::Eval(s) if s.models.is_empty() => {
                    return Err(err_at(
                        "models:",
                        "`models` is empty; list the models to evaluate, e.g. `[steps.teacher.output]`".into(),
                    ))
                }
                _ => {}
            }
            // Bounds, checked now rather than when the step runs after hours of earlier steps.
            let bounds = match &step.config {
                StepConfig::Finetune(s) => train::validate(&s.train, None).map_err(|e| e.to_string()),
                StepConfig::Distill(s) => train::validate(&s.train, Some(&s.kd))
                    .map_err(|e| e.to_string())
                    .and_then(|_| self.check_distill(s)),
                StepConfig::Generate(s) if s.part_size == 0 => Err("`part_size` must be >= 1".to_string()),
                StepConfig::Generate(s) => s
                    .sampling
                    .validate()
                    .map_err(|e| e.to_string())
                    .and_then(|_| s.server.validate().map_err(|e| e.to_string())),
                StepConfig::Score(s) if s.part_size == 0 => Err("`part_size` must be >= 1".to_string()),
                StepConfig::Score(s) if s.batch_size == 0 => Err("`batch_size` must be >= 1".to_string()),
                StepConfig::Score(s) => s.server.validate().map_err(|e| e.to_string()),
                StepConfig::Export(s) if s.types.is_empty() => {
                    Err("`types` is empty; list the encodings to write, e.g. [f16, q8_0]".to_string())
                }
                StepConfig::Export(s) => s
                    .types
                    .iter()
                    .try_for_each(|t| crate::export::parse_type(t).map(|_| ()).map_err(|e| format!("`types`: {e}"))),
                _ => Ok(()),
            };
            if let Err(message) = bounds {
                let named = message.split('`').nth(1).unwrap_or_default();
                let set = overrides.iter().find(|o| o.step.as_deref() == Some(&step.name) && o.covers(named));
                if let Some(o) = set {
                    return Err(RecipeError::Set {
                        path: self.path.clone(),
                        flag: o.flag.clone(),
                        message: format!("step `{}`: {message}", step.name),
                    });
                }
                // The first key the message names, e.g. `train.lr` → the line with `lr:`, or with
                // `lr: VALUE` when the message says `got VALUE` (one of several keys of that name).
                let key =
                    message.split('`').nth(1).and_then(|k| k.rsplit('.').next()).and_then(|k| k.split('[').next());
                let got = message.rsplit_once(", got ").map(|(_, v)| v.trim_end_matches(|c: char| !c.is_ascii_digit()));
                let end = self.steps.get(i + 1).map_or(usize::MAX, |s| s.line);
                return Err(match (key, got) {
                    (Some(k), Some(v)) if parse::find(text, step.line, end, &format!("{k}: {v}")).is_some() => {
                        err_at(&format!("{k}: {v}"), message)
                    }
                    (Some(k), _) => err_at(&format!("{k}:"), message),
                    (None, _) => err(message),
                });
            }
        }
        Ok(())
    }

    /// What a distill step's teachers must agree on, checked before any step runs: hidden-state
    /// alignment needs a teacher in memory and layers both models have; the mixture's weights;
    /// one tokenizer for every teacher.
    fn check_distill(&self, s: &DistillStep) -> Result<(), String> {
        if let Some(t) = s.teacher.as_deref().filter(|t| crate::engine::is_server(t)) {
            if s.kd.on_policy.is_none() {
                return Err(format!(
                    "`teacher`: {t} is a server, and a server teacher of a distill step grades only on-policy \
                     batches (`kd.on_policy`); to distill on its top-k, score the samples on it with a `kind: score` \
                     step and list its output under `teachers:`"
                ));
            }
            if s.kd.hidden.is_some() {
                return Err(format!(
                    "`kd.hidden` aligns hidden states with a teacher held in memory, but `teacher` is the server {t}"
                ));
            }
            if let Some(e) = s.server.engine.filter(|e| !e.scores_prompts()) {
                return Err(format!(
                    "`server.engine` is {e}, which cannot return the log-probs of a given text, and on-policy \
                     batches are graded with them: {}",
                    crate::engine::PROMPT_LOGPROB_ENGINES
                ));
            }
        }
        if let Some(o) = &s.kd.on_policy {
            if s.teacher.is_none() {
                return Err("`kd.on_policy` needs a teacher that can grade the student's samples: set the step's \
                     `teacher:` to the teacher model (e.g. `steps.teacher.output`), held in memory, or to a vLLM or \
                     SGLang server"
                    .into());
            }
            let context = s.student.config.as_ref().map(|c| c.max_position_embeddings);
            if let Some(c) = context.filter(|&c| o.max_new_tokens >= c) {
                return Err(format!(
                    "`kd.on_policy.max_new_tokens` is {}, but the student reads at most {c} positions, prompt \
                     included; lower it below {c}",
                    o.max_new_tokens
                ));
            }
        }
        if let Some(h) = &s.kd.hidden {
            let Some(teacher) = &s.teacher else {
                return Err("`kd.hidden` aligns hidden states with a teacher held in memory: set the step's \
                     `teacher:` to the teacher model (e.g. `steps.teacher.output`)"
                    .into());
            };
            if h.layers.is_empty() {
                return Err(
                    "`kd.hidden.layers` is empty; list [student_layer, teacher_layer] pairs, e.g. [[3, 4]]".into()
                );
            }
            let models = [("student", self.layers_of_init(&s.student)), ("teacher", self.layers_of(teacher))];
            for (i, pair) in h.layers.iter().enumerate() {
                for ((who, layers), index) in models.iter().zip(pair) {
                    if let Some(n) = layers.filter(|n| index > n) {
                        return Err(format!(
                            "`kd.hidden.layers[{i}]`: {who} layer {index} is out of range: the {who} has layers 0 \
                             (embeddings) to {n} (the last decoder layer, after the final norm)"
                        ));
                    }
                }
            }
        }
        if !s.teachers.is_empty() {
            train::mixture::check_weights(&s.teachers.iter().map(|t| t.weight).collect::<Vec<_>>())?;
        }
        // Every teacher's tokenizer, where it is known now: the samples' and each mixture member's.
        let mut sources = vec![("data", s.data.as_str())];
        sources.extend(s.teacher.as_deref().map(|t| ("teacher", t)));
        sources.extend(s.teachers.iter().map(|t| ("teachers.data", t.data.as_str())));
        let origins: Vec<(&str, &str, String)> =
            sources.iter().filter_map(|(k, v)| self.tokenizer_origin(v).map(|o| (*k, *v, o))).collect();
        for pair in origins.windows(2) {
            let ((ka, va, a), (kb, vb, b)) = (&pair[0], &pair[1]);
            if !same_tokenizer(a, b) {
                return Err(format!(
                    "`teachers`: the teachers have different tokenizers: {ka} `{va}` uses {a}, {kb} `{vb}` uses \
                     {b}; distillation needs one vocabulary (train or score every teacher with the same tokenizer)"
                ));
            }
        }
        Ok(())
    }

    /// Where the tokenizer behind a model or a sample set comes from: a task step's output or a
    /// folder; None where it cannot be known before running (servers, Hub ids, aliases).
    fn tokenizer_origin(&self, value: &str) -> Option<String> {
        match parse_ref(value) {
            Some(Ok((name, _))) => {
                let step = self.steps.iter().find(|s| s.name == name)?;
                let via = |tokenizer: &Option<String>, model: Option<&str>| {
                    tokenizer.as_deref().or(model).and_then(|v| self.tokenizer_origin(v))
                };
                match &step.config {
                    StepConfig::Task(_) => Some(format!("steps.{name}.output")),
                    StepConfig::Finetune(s) => via(&s.tokenizer, s.model.from.as_deref()),
                    StepConfig::Distill(s) => via(&s.tokenizer, s.student.from.as_deref()),
                    StepConfig::Generate(s) => via(&s.tokenizer, Some(&s.teacher)),
                    StepConfig::Score(s) => via(&s.tokenizer, Some(&s.teacher)),
                    StepConfig::Eval(_) | StepConfig::Export(_) => None,
                }
            }
            Some(Err(_)) => None,
            None => Path::new(value).join("tokenizer.json").is_file().then(|| value.to_string()),
        }
    }

    /// The number of decoder layers of a model value, where it is known before running.
    fn layers_of(&self, value: &str) -> Option<usize> {
        match parse_ref(value) {
            Some(Ok((name, _))) => match &self.steps.iter().find(|s| s.name == name)?.config {
                StepConfig::Finetune(s) => self.layers_of_init(&s.model),
                StepConfig::Distill(s) => self.layers_of_init(&s.student),
                _ => None,
            },
            Some(Err(_)) => None,
            None => crate::model::LlamaConfig::from_file(&Path::new(value).join("config.json"))
                .ok()
                .map(|c| c.num_hidden_layers),
        }
    }

    fn layers_of_init(&self, init: &ModelInit) -> Option<usize> {
        if let Some(layers) = &init.layers {
            return Some(layers.len());
        }
        match (&init.config, &init.from) {
            (Some(c), _) => Some(c.num_hidden_layers),
            (None, Some(from)) => self.layers_of(from),
            _ => None,
        }
    }
}

/// Two tokenizer origins (see [`Recipe::tokenizer_origin`]) name the same tokenizer: the same
/// step, or folders whose tokenizers have the same vocabulary.
fn same_tokenizer(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    if a.starts_with("steps.") || b.starts_with("steps.") {
        return false;
    }
    match (Tokenizer::from_folder(Path::new(a)), Tokenizer::from_folder(Path::new(b))) {
        (Ok(x), Ok(y)) => x.vocab_hash() == y.vocab_hash(),
        _ => true,
    }
}
