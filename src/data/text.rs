//! Shared plumbing for the line-oriented input files (prompts, examples).

use std::path::Path;

use serde::de::DeserializeOwned;

use super::error::DataError;

/// What a file is for and how to point kdllm at another one; used in error messages.
pub(crate) struct Kind {
    pub what: &'static str,
    pub hint: &'static str,
}

pub(crate) fn read_to_string(path: &Path, kind: &Kind) -> Result<String, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Read {
        path: path.to_path_buf(),
        what: kind.what,
        hint: kind.hint,
        source,
    })?;
    // Editors on Windows like to start UTF-8 files with a byte-order mark.
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    })
}

pub(crate) fn is_jsonl(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("jsonl"))
}

/// Non-blank lines with their 1-based line numbers (`\r\n` endings handled by `lines`).
pub(crate) fn numbered_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().map(|(i, line)| (i + 1, line)).filter(|(_, line)| !line.trim().is_empty())
}

/// Parses one JSONL line; the error carries `file:line` and serde's message.
pub(crate) fn parse_line<T: DeserializeOwned>(path: &Path, line: usize, text: &str) -> Result<T, DataError> {
    serde_json::from_str(text).map_err(|source| DataError::Json { path: path.to_path_buf(), line, source })
}

pub(crate) fn line_error(path: &Path, line: usize, message: impl Into<String>) -> DataError {
    DataError::Line { path: path.to_path_buf(), line, message: message.into() }
}

#[cfg(test)]
pub(crate) mod tests {
    /// A file with `content` in a fresh temporary folder (kept alive by the returned guard).
    pub(crate) fn file(name: &str, content: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        (dir, path)
    }
}
