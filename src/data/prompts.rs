//! Prompt files: the inputs `kdllm generate` sends to the teacher.
//!
//! - `*.jsonl`: one object per non-blank line with an optional `id` (string or integer;
//!   default: the line number) and exactly one of `prompt` (a string) or `messages`
//!   (an array of `{"role", "content"}`). Other fields are ignored.
//! - anything else: plain text, one prompt per non-blank line, id = line number.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use super::error::DataError;
use super::text::{self, line_error, Kind};
use super::ChatMessage;

const KIND: Kind = Kind { what: "prompt file", hint: "pass --prompts FILE (.jsonl, or text with one prompt per line)" };

/// What the teacher is asked: raw text, or a conversation the chat template will render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptInput {
    Text(String),
    Chat(Vec<ChatMessage>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptRecord {
    /// Unique within the file.
    pub id: String,
    pub input: PromptInput,
}

/// One JSONL line as written; unknown fields are ignored.
#[derive(Deserialize)]
struct Line {
    id: Option<serde_json::Value>,
    prompt: Option<String>,
    messages: Option<Vec<ChatMessage>>,
}

/// Reads a prompt file (format by extension, see the module doc). Ids must be unique and
/// the file must hold at least one prompt.
pub fn read_prompts(path: &Path) -> Result<Vec<PromptRecord>, DataError> {
    let content = text::read_to_string(path, &KIND)?;
    let mut records = Vec::new();
    // id -> line it was first seen on, to name both lines of a duplicate.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (line, raw) in text::numbered_lines(&content) {
        let record = if text::is_jsonl(path) {
            parse_jsonl(path, line, raw)?
        } else {
            PromptRecord { id: line.to_string(), input: PromptInput::Text(raw.to_string()) }
        };
        if let Some(first) = seen.insert(record.id.clone(), line) {
            return Err(line_error(
                path,
                line,
                format!("duplicate id `{}` (first used on line {first}); ids must be unique", record.id),
            ));
        }
        records.push(record);
    }
    if records.is_empty() {
        return Err(DataError::Empty { path: path.to_path_buf(), what: "prompts", hint: KIND.hint });
    }
    Ok(records)
}

fn parse_jsonl(path: &Path, line: usize, raw: &str) -> Result<PromptRecord, DataError> {
    let parsed: Line = text::parse_line(path, line, raw)?;
    let id = match parsed.id {
        None => line.to_string(),
        Some(serde_json::Value::String(s)) if !s.is_empty() => s,
        Some(serde_json::Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
        Some(other) => {
            return Err(line_error(path, line, format!("`id` must be a non-empty string or an integer, got {other}")))
        }
    };
    let input = match (parsed.prompt, parsed.messages) {
        (Some(p), None) if !p.trim().is_empty() => PromptInput::Text(p),
        (Some(_), None) => return Err(line_error(path, line, "`prompt` is empty")),
        (None, Some(m)) if !m.is_empty() => PromptInput::Chat(m),
        (None, Some(_)) => return Err(line_error(path, line, "`messages` is empty")),
        (None, None) => {
            return Err(line_error(path, line, "needs a `prompt` (string) or `messages` (array of {role, content})"))
        }
        (Some(_), Some(_)) => return Err(line_error(path, line, "has both `prompt` and `messages`; keep exactly one")),
    };
    Ok(PromptRecord { id, input })
}

#[cfg(test)]
mod tests {

    use super::{read_prompts, PromptInput, PromptRecord};
    use crate::data::text::tests::file;
    use crate::data::{ChatMessage, DataError};

    #[test]
    fn jsonl_reads_prompt_messages_and_numeric_ids() {
        let (_d, path) = file(
            "p.jsonl",
            concat!(
                "{\"id\": \"a\", \"prompt\": \"Hi\", \"source\": \"ignored\"}\n",
                "\n",
                "{\"id\": 7, \"messages\": [{\"role\": \"user\", \"content\": \"Yo\"}]}\r\n",
                "{\"prompt\": \"no id\"}\n",
            ),
        );
        let got = read_prompts(&path).unwrap();
        let chat = vec![ChatMessage { role: "user".into(), content: "Yo".into() }];
        assert_eq!(
            got,
            vec![
                PromptRecord { id: "a".into(), input: PromptInput::Text("Hi".into()) },
                PromptRecord { id: "7".into(), input: PromptInput::Chat(chat) },
                PromptRecord { id: "4".into(), input: PromptInput::Text("no id".into()) },
            ]
        );
    }

    #[test]
    fn text_is_one_prompt_per_non_blank_line_numbered_by_line() {
        let (_d, path) = file("p.txt", "first\n\n  \nsecond line\n");
        let got = read_prompts(&path).unwrap();
        assert_eq!(
            got,
            vec![
                PromptRecord { id: "1".into(), input: PromptInput::Text("first".into()) },
                PromptRecord { id: "4".into(), input: PromptInput::Text("second line".into()) },
            ]
        );
    }

    #[test]
    fn empty_file_is_an_error_naming_it() {
        let (_d, path) = file("empty.jsonl", "\n \n");
        let err = read_prompts(&path).unwrap_err();
        assert!(matches!(err, DataError::Empty { .. }), "{err:?}");
        assert!(err.to_string().contains("empty.jsonl"), "{err}");
    }

    #[test]
    fn missing_file_says_how_to_pass_one() {
        let err = read_prompts(std::path::Path::new("/nonexistent/prompts.txt")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/prompts.txt") && msg.contains("--prompts FILE"), "{msg}");
    }

    #[test]
    fn duplicate_id_names_both_lines() {
        let (_d, path) = file("d.jsonl", "{\"id\": 1, \"prompt\": \"a\"}\n{\"id\": \"1\", \"prompt\": \"b\"}\n");
        let msg = read_prompts(&path).unwrap_err().to_string();
        assert!(msg.contains("d.jsonl:2") && msg.contains("duplicate id `1`") && msg.contains("line 1"), "{msg}");
    }

    #[test]
    fn bad_json_reports_file_and_line() {
        let (_d, path) = file("bad.jsonl", "{\"prompt\": \"ok\"}\n{\"prompt\": \n");
        let err = read_prompts(&path).unwrap_err();
        assert!(matches!(err, DataError::Json { line: 2, .. }), "{err:?}");
        assert!(err.to_string().contains("bad.jsonl:2: invalid JSON"), "{err}");
    }

    #[test]
    fn line_needs_exactly_one_of_prompt_and_messages() {
        let (_d, neither) = file("n.jsonl", "{\"id\": \"x\"}\n");
        let msg = read_prompts(&neither).unwrap_err().to_string();
        assert!(msg.contains("n.jsonl:1") && msg.contains("needs a `prompt`"), "{msg}");
        let (_d2, both) =
            file("b.jsonl", "{\"prompt\": \"a\", \"messages\": [{\"role\": \"user\", \"content\": \"b\"}]}\n");
        let msg = read_prompts(&both).unwrap_err().to_string();
        assert!(msg.contains("b.jsonl:1") && msg.contains("both"), "{msg}");
    }

    #[test]
    fn float_id_is_rejected() {
        let (_d, path) = file("f.jsonl", "{\"id\": 1.5, \"prompt\": \"a\"}\n");
        let msg = read_prompts(&path).unwrap_err().to_string();
        assert!(msg.contains("f.jsonl:1") && msg.contains("`id`"), "{msg}");
    }
}
