//! Example files: task / fine-tuning data as prompt-completion pairs.
//!
//! - `*.jsonl`: one object per non-blank line, either `{"prompt", "completion"}` or
//!   `{"text"}` (a bare document: empty prompt). Other fields are ignored.
//! - anything else: plain-text documents separated by one or more blank lines (empty prompt).

use std::path::Path;

use serde::Deserialize;

use super::error::DataError;
use super::text::{self, line_error, Kind};

const KIND: Kind = Kind {
    what: "examples file",
    hint: "pass a .jsonl file of {\"prompt\", \"completion\"} or {\"text\"} objects, or a text file of blank-line separated documents",
};

/// One training example; the loss is taken on `completion` only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub prompt: String,
    pub completion: String,
}

#[derive(Deserialize)]
struct Line {
    prompt: Option<String>,
    completion: Option<String>,
    text: Option<String>,
}

/// Reads an examples file (format by extension, see the module doc); it must not be empty.
pub fn read_examples(path: &Path) -> Result<Vec<Example>, DataError> {
    let content = text::read_to_string(path, &KIND)?;
    let examples = if text::is_jsonl(path) {
        text::numbered_lines(&content).map(|(line, raw)| parse_jsonl(path, line, raw)).collect::<Result<Vec<_>, _>>()?
    } else {
        documents(&content)
    };
    if examples.is_empty() {
        return Err(DataError::Empty { path: path.to_path_buf(), what: "examples", hint: KIND.hint });
    }
    Ok(examples)
}

fn parse_jsonl(path: &Path, line: usize, raw: &str) -> Result<Example, DataError> {
    let parsed: Line = text::parse_line(path, line, raw)?;
    let (prompt, completion) = match (parsed.prompt, parsed.completion, parsed.text) {
        (Some(p), Some(c), None) => (p, c),
        (None, None, Some(t)) => (String::new(), t),
        _ => return Err(line_error(path, line, "needs either `prompt` and `completion`, or `text` alone")),
    };
    if completion.trim().is_empty() {
        return Err(line_error(path, line, "the completion (or `text`) is empty"));
    }
    Ok(Example { prompt, completion })
}

/// Splits text into documents at blank lines, keeping the line breaks inside each.
fn documents(content: &str) -> Vec<Example> {
    let mut docs = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    for line in content.lines().chain(std::iter::once("")) {
        if line.trim().is_empty() {
            if !current.is_empty() {
                docs.push(Example { prompt: String::new(), completion: current.join("\n") });
                current.clear();
            }
        } else {
            current.push(line);
        }
    }
    docs
}

#[cfg(test)]
mod tests {

    use super::{read_examples, Example};
    use crate::data::text::tests::file;
    use crate::data::DataError;

    fn ex(prompt: &str, completion: &str) -> Example {
        Example { prompt: prompt.into(), completion: completion.into() }
    }

    #[test]
    fn jsonl_reads_pairs_and_bare_text() {
        let (_d, path) = file(
            "e.jsonl",
            "{\"prompt\": \"2+2=\", \"completion\": \"4\", \"meta\": 1}\n\n{\"text\": \"a document\"}\n",
        );
        assert_eq!(read_examples(&path).unwrap(), vec![ex("2+2=", "4"), ex("", "a document")]);
    }

    #[test]
    fn jsonl_rejects_mixed_or_incomplete_lines() {
        let (_d, path) = file("e.jsonl", "{\"text\": \"ok\"}\n{\"prompt\": \"only a prompt\"}\n");
        let msg = read_examples(&path).unwrap_err().to_string();
        assert!(msg.contains("e.jsonl:2") && msg.contains("`completion`"), "{msg}");
        let (_d2, bad) = file("x.jsonl", "[1, 2]\n");
        assert!(matches!(read_examples(&bad), Err(DataError::Json { line: 1, .. })));
    }

    #[test]
    fn text_splits_documents_at_blank_lines() {
        let (_d, path) = file("docs.txt", "\nfirst doc\nsecond line\n\n\n  \nsecond doc\n");
        assert_eq!(read_examples(&path).unwrap(), vec![ex("", "first doc\nsecond line"), ex("", "second doc")]);
    }

    #[test]
    fn empty_file_is_an_error_naming_it() {
        let (_d, path) = file("none.txt", "\n\n");
        let msg = read_examples(&path).unwrap_err().to_string();
        assert!(msg.contains("none.txt") && msg.contains("no examples"), "{msg}");
    }
}
