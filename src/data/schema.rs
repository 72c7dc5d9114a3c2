//! The Parquet layout of a teacher-sample file, defined once.
//!
//! One row per sample. Lists are per completion token unless named `prompt_*`;
//! list items are never null. Only `teacher_revision` is nullable.
//!
//! | column | type | meaning |
//! |---|---|---|
//! | `prompt_id` | `Utf8` | id of the prompt in the prompt file |
//! | `sample_index` | `UInt32` | which sample of this prompt (0-based) |
//! | `prompt` | `Utf8` | exactly the text the teacher saw (chat template applied) |
//! | `completion` | `Utf8` | the decoded completion |
//! | `prompt_token_ids` | `List<UInt32>` | token ids of `prompt` |
//! | `completion_token_ids` | `List<UInt32>` | sampled token ids, length N |
//! | `token_logprobs` | `List<Float32>` | teacher log p(sampled token) at T=1, length N |
//! | `topk_token_ids` | `List<List<UInt32>>` | per position, the K most likely ids, most likely first; N × K |
//! | `topk_logprobs` | `List<List<Float32>>` | their log-probs at T=1; N × K |
//! | `finish_reason` | `Utf8` | `stop` (end token) or `length` (token limit) |
//! | `teacher` | `Utf8` | teacher alias, hub repo id or path, as resolved |
//! | `teacher_revision` | `Utf8`, nullable | hub revision of the teacher, if any |
//!
//! File key-value metadata:
//!
//! | key | meaning |
//! |---|---|
//! | `kdllm.schema_version` | layout version, currently `1` |
//! | `kdllm.version` | kdllm version that wrote the file |
//! | `kdllm.tokenizer_hash` | hash of the tokenizer the ids belong to |
//! | `kdllm.logprobs_k` | K, entries per top-k row (decimal) |
//! | `kdllm.sampling` | sampling parameters (JSON object) |
//! | `kdllm.server` | optional: the serving engine that computed the log-probs, `{"engine", "version", "model"}` (JSON) |
//!
//! Log-probs are natural logs. Strings are dictionary encoded; the file is ZSTD compressed.

use std::path::Path;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema};
use parquet::file::metadata::KeyValue;

use super::error::DataError;
use super::sample::FileMetadata;

pub(crate) const PROMPT_ID: &str = "prompt_id";
pub(crate) const SAMPLE_INDEX: &str = "sample_index";
pub(crate) const PROMPT: &str = "prompt";
pub(crate) const COMPLETION: &str = "completion";
pub(crate) const PROMPT_TOKEN_IDS: &str = "prompt_token_ids";
pub(crate) const COMPLETION_TOKEN_IDS: &str = "completion_token_ids";
pub(crate) const TOKEN_LOGPROBS: &str = "token_logprobs";
pub(crate) const TOPK_TOKEN_IDS: &str = "topk_token_ids";
pub(crate) const TOPK_LOGPROBS: &str = "topk_logprobs";
pub(crate) const FINISH_REASON: &str = "finish_reason";
pub(crate) const TEACHER: &str = "teacher";
pub(crate) const TEACHER_REVISION: &str = "teacher_revision";

/// String columns; these get dictionary encoding (ids and teacher repeat across rows).
pub(crate) const STRING_COLUMNS: [&str; 6] = [PROMPT_ID, PROMPT, COMPLETION, FINISH_REASON, TEACHER, TEACHER_REVISION];

const KEY_SCHEMA_VERSION: &str = "kdllm.schema_version";
const KEY_VERSION: &str = "kdllm.version";
const KEY_TOKENIZER_HASH: &str = "kdllm.tokenizer_hash";
const KEY_LOGPROBS_K: &str = "kdllm.logprobs_k";
const KEY_SAMPLING: &str = "kdllm.sampling";
const KEY_SERVER: &str = "kdllm.server";
const SCHEMA_VERSION: &str = "1";

/// Non-null list items, so readers never have to decide what a null token means.
pub(crate) fn list_item(data_type: DataType) -> Arc<Field> {
    Arc::new(Field::new_list_field(data_type, false))
}

fn list_of(data_type: DataType) -> DataType {
    DataType::List(list_item(data_type))
}

/// The schema of a sample file; the table in the module doc describes it.
pub(crate) fn sample_schema() -> Arc<Schema> {
    let ids = || list_of(DataType::UInt32);
    let logprobs = || list_of(DataType::Float32);
    Arc::new(Schema::new(vec![
        Field::new(PROMPT_ID, DataType::Utf8, false),
        Field::new(SAMPLE_INDEX, DataType::UInt32, false),
        Field::new(PROMPT, DataType::Utf8, false),
        Field::new(COMPLETION, DataType::Utf8, false),
        Field::new(PROMPT_TOKEN_IDS, ids(), false),
        Field::new(COMPLETION_TOKEN_IDS, ids(), false),
        Field::new(TOKEN_LOGPROBS, logprobs(), false),
        Field::new(TOPK_TOKEN_IDS, list_of(ids()), false),
        Field::new(TOPK_LOGPROBS, list_of(logprobs()), false),
        Field::new(FINISH_REASON, DataType::Utf8, false),
        Field::new(TEACHER, DataType::Utf8, false),
        Field::new(TEACHER_REVISION, DataType::Utf8, true),
    ]))
}

/// Checks that every expected column is present with the expected type.
/// Extra columns are allowed (and ignored) so later versions can add some.
pub(crate) fn check_schema(path: &Path, actual: &Schema) -> Result<(), DataError> {
    for expected in sample_schema().fields() {
        let problem = match actual.field_with_name(expected.name()) {
            Err(_) => "is missing".to_string(),
            Ok(found) if !same_type(expected.data_type(), found.data_type()) => {
                format!("has type {} but kdllm expects {}", found.data_type(), expected.data_type())
            }
            Ok(_) => continue,
        };
        return Err(DataError::Schema { path: path.to_path_buf(), column: expected.name().clone(), problem });
    }
    Ok(())
}

/// Type equality that ignores list item names and nullability: other writers (pyarrow: `element`)
/// name list items differently, and nulls are checked on the data itself.
fn same_type(expected: &DataType, actual: &DataType) -> bool {
    match (expected, actual) {
        (DataType::List(e), DataType::List(a)) => same_type(e.data_type(), a.data_type()),
        _ => expected == actual,
    }
}

pub(crate) fn to_key_value(meta: &FileMetadata) -> Vec<KeyValue> {
    [
        (KEY_SCHEMA_VERSION, SCHEMA_VERSION.to_string()),
        (KEY_VERSION, meta.kdllm_version.clone()),
        (KEY_TOKENIZER_HASH, meta.tokenizer_hash.clone()),
        (KEY_LOGPROBS_K, meta.logprobs_k.to_string()),
        (KEY_SAMPLING, meta.sampling.to_string()),
    ]
    .into_iter()
    .chain(meta.server.as_ref().map(|s| (KEY_SERVER, s.to_string())))
    .map(|(k, v)| KeyValue::new(k.to_string(), v))
    .collect()
}

pub(crate) fn from_key_value(path: &Path, kv: Option<&Vec<KeyValue>>) -> Result<FileMetadata, DataError> {
    let bad = |key: &'static str, problem: String| DataError::Metadata { path: path.to_path_buf(), key, problem };
    let get = |key: &'static str| -> Result<&str, DataError> {
        kv.into_iter()
            .flatten()
            .find(|e| e.key == key)
            .and_then(|e| e.value.as_deref())
            .ok_or_else(|| bad(key, "is missing".to_string()))
    };
    let version = get(KEY_SCHEMA_VERSION)?;
    if version != SCHEMA_VERSION {
        return Err(bad(
            KEY_SCHEMA_VERSION,
            format!("is `{version}` but this kdllm reads version {SCHEMA_VERSION} (upgrade kdllm?)"),
        ));
    }
    let k = get(KEY_LOGPROBS_K)?;
    let logprobs_k = k.parse().map_err(|_| bad(KEY_LOGPROBS_K, format!("is `{k}`, not a non-negative integer")))?;
    let sampling =
        serde_json::from_str(get(KEY_SAMPLING)?).map_err(|e| bad(KEY_SAMPLING, format!("is not valid JSON: {e}")))?;
    let server = match get(KEY_SERVER) {
        Ok(text) => Some(serde_json::from_str(text).map_err(|e| bad(KEY_SERVER, format!("is not valid JSON: {e}")))?),
        Err(_) => None,
    };
    Ok(FileMetadata {
        server,
        tokenizer_hash: get(KEY_TOKENIZER_HASH)?.to_string(),
        logprobs_k,
        sampling,
        kdllm_version: get(KEY_VERSION)?.to_string(),
    })
}
