//! Reading a recipe file: YAML → typed steps, with errors that point at the file, line and column.
//!
//! serde-saphyr reports the line and column of every error raised while it drives the
//! deserializer (unknown keys, wrong types, missing keys, malformed YAML), including inside
//! nested structs. It cannot do so through an internally tagged enum (`#[serde(tag = "kind")]`):
//! serde buffers the whole step before looking at the tag, and every error inside it then points
//! at the step's first line. So a recipe is read in two passes over the same text:
//!
//! 1. `Head`: only each step's `name` and `kind`, with the step's location (other keys ignored).
//! 2. `RecipeSeed`: the whole file, each step deserialized straight into the struct of its kind,
//!    which denies unknown keys; no buffering, so every error keeps its exact location.

use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::de::{self, DeserializeOwned, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_saphyr::{MessageFormatter, Spanned, UserMessageFormatter};

use super::{RecipeError, Step, StepConfig, StepKind};

/// Pass 1: the steps' names and kinds, and where each step starts.
#[derive(Deserialize)]
struct Head {
    // Optional here so that a misspelt `steps:` is reported by pass 2 as an unknown key.
    #[serde(default)]
    steps: Vec<Spanned<StepHead>>,
}

#[derive(Deserialize)]
struct StepHead {
    name: String,
    kind: StepKind,
}

/// Pass 2: everything but the steps' `name` and `kind` (already read by pass 1).
pub(super) struct Body {
    pub name: String,
    pub workdir: PathBuf,
    pub steps: Vec<StepConfig>,
}

/// Parses a recipe's text. `path` only names the file in errors.
pub(super) fn parse(path: &Path, text: &str) -> Result<(String, PathBuf, Vec<Step>), RecipeError> {
    let located = |e: serde_saphyr::Error| yaml_error(path, text, &e);
    let head: Head = serde_saphyr::from_str(text).map_err(located)?;
    let kinds: Vec<StepKind> = head.steps.iter().map(|s| s.value.kind).collect();
    let body = serde_saphyr::with_deserializer_from_str(text, |d| {
        de::Deserializer::deserialize_map(d, RecipeSeed { kinds: &kinds })
    })
    .map_err(located)?;
    let steps = head
        .steps
        .into_iter()
        .zip(body.steps)
        .map(|(h, config)| Step {
            name: h.value.name,
            config,
            line: h.referenced.line() as usize,
            column: h.referenced.column() as usize,
        })
        .collect();
    Ok((body.name, body.workdir, steps))
}

/// `path:line:column: message` and the offending line, from a serde-saphyr error.
fn yaml_error(path: &Path, text: &str, e: &serde_saphyr::Error) -> RecipeError {
    let e = e.without_snippet();
    let message = UserMessageFormatter.format_message(e).into_owned();
    match e.location() {
        Some(loc) if loc.line() > 0 => {
            let (line, column) = (loc.line() as usize, loc.column() as usize);
            // Type errors ("invalid u64", "expected sequence start") do not say which key; the
            // source does.
            let message = match key_before(text, line, column) {
                Some(key) if !message.contains('`') || message.starts_with("unknown variant") => {
                    format!("`{key}`: {message}")
                }
                _ => message,
            };
            // "invalid u64" is serde's word for a count that is negative or not a whole number.
            let message = if ["invalid u64", "invalid usize", "invalid u32"].iter().any(|t| message.contains(t)) {
                format!("{message}: expected a whole number ≥ 0")
            } else {
                message
            };
            at(path, text, line, column, message)
        }
        _ => RecipeError::Invalid { path: path.to_path_buf(), message },
    }
}

/// The key whose value starts at `line:column`, as in `  steps: ten` or `{steps: ten`.
fn key_before(text: &str, line: usize, column: usize) -> Option<&str> {
    let src = text.lines().nth(line.checked_sub(1)?)?;
    let before = src.get(..column.checked_sub(1)?)?.trim_end().strip_suffix(':')?;
    let key = before.rsplit(|c: char| c.is_whitespace() || c == '{' || c == ',').next()?;
    (!key.is_empty()).then_some(key)
}

/// The first `needle` on lines `from..to` (1-based, `to` excluded), as `(line, column)`. A key
/// (`name:`) matches only as a whole word: `layers:` is not found in `num_hidden_layers:`.
pub(super) fn find(text: &str, from: usize, to: usize, needle: &str) -> Option<(usize, usize)> {
    let is_key = needle.ends_with(':');
    let whole = |l: &str, c: usize| !is_key || !l[..c].ends_with(|ch: char| ch.is_alphanumeric() || ch == '_');
    text.lines().enumerate().skip(from.saturating_sub(1)).take_while(|(i, _)| i + 1 < to).find_map(|(i, l)| {
        l.match_indices(needle).map(|(c, _)| c).find(|&c| whole(l, c)).map(|c| (i + 1, l[..c].chars().count() + 1))
    })
}

/// An error at `line:column` of the recipe, with that line quoted under it.
pub(super) fn at(path: &Path, text: &str, line: usize, column: usize, message: String) -> RecipeError {
    RecipeError::At { path: path.to_path_buf(), line, column, message, snippet: snippet(text, line, column) }
}

/// The source line and a caret under the column, rustc-style.
fn snippet(text: &str, line: usize, column: usize) -> String {
    let Some(src) = text.lines().nth(line.saturating_sub(1)) else {
        return String::new();
    };
    let num = line.to_string();
    let pad = " ".repeat(num.len());
    let caret = " ".repeat(column.saturating_sub(1));
    format!("{pad} |\n{num} | {src}\n{pad} | {caret}^")
}

/// Accepts and discards a value: lets the per-kind structs, which deny unknown keys, accept the
/// `name` and `kind` that pass 1 already read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Seen;

impl<'de> Deserialize<'de> for Seen {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        IgnoredAny::deserialize(d).map(|_| Seen)
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum TopKey {
    Name,
    Workdir,
    Steps,
}

struct RecipeSeed<'a> {
    kinds: &'a [StepKind],
}

impl<'de> Visitor<'de> for RecipeSeed<'_> {
    type Value = Body;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a recipe: a mapping with `name`, `workdir` and `steps`")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Body, A::Error> {
        let (mut name, mut workdir, mut steps) = (None, None, None);
        while let Some(key) = map.next_key::<TopKey>()? {
            match key {
                TopKey::Name => name = Some(map.next_value()?),
                TopKey::Workdir => workdir = Some(map.next_value()?),
                TopKey::Steps => steps = Some(map.next_value_seed(StepsSeed { kinds: self.kinds })?),
            }
        }
        Ok(Body {
            name: name.ok_or_else(|| de::Error::missing_field("name"))?,
            workdir: workdir.ok_or_else(|| de::Error::missing_field("workdir"))?,
            steps: steps.ok_or_else(|| de::Error::missing_field("steps"))?,
        })
    }
}

struct StepsSeed<'a> {
    kinds: &'a [StepKind],
}

impl<'de> DeserializeSeed<'de> for StepsSeed<'_> {
    type Value = Vec<StepConfig>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for StepsSeed<'_> {
    type Value = Vec<StepConfig>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of steps")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        fn next<'de, A: SeqAccess<'de>, T: DeserializeOwned>(
            seq: &mut A,
            wrap: fn(T) -> StepConfig,
        ) -> Result<Option<StepConfig>, A::Error> {
            Ok(seq.next_element_seed(PhantomData::<T>)?.map(wrap))
        }
        let mut out = Vec::with_capacity(self.kinds.len());
        for (i, kind) in self.kinds.iter().enumerate() {
            let step = match kind {
                StepKind::Task => next(&mut seq, StepConfig::Task)?,
                StepKind::Finetune => next(&mut seq, StepConfig::Finetune)?,
                StepKind::Generate => next(&mut seq, StepConfig::Generate)?,
                StepKind::Score => next(&mut seq, StepConfig::Score)?,
                StepKind::Distill => next(&mut seq, StepConfig::Distill)?,
                StepKind::Eval => next(&mut seq, StepConfig::Eval)?,
                StepKind::Export => next(&mut seq, StepConfig::Export)?,
            };
            out.push(step.ok_or_else(|| de::Error::invalid_length(i, &self))?);
        }
        Ok(out)
    }
}
