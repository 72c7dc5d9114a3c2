//! Reads teacher-sample files: one `.parquet` file, or a directory of part files.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use arrow::array::{Array, ArrowPrimitiveType, ListArray, PrimitiveArray, RecordBatch, StringArray};
use arrow::datatypes::{Float32Type, UInt32Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;

use super::error::DataError;
use super::manifest::Manifest;
use super::sample::{FileMetadata, FinishReason, Sample};
use super::schema::{
    self, COMPLETION, COMPLETION_TOKEN_IDS, FINISH_REASON, PROMPT, PROMPT_ID, PROMPT_TOKEN_IDS, SAMPLE_INDEX, TEACHER,
    TEACHER_REVISION, TOKEN_LOGPROBS, TOPK_LOGPROBS, TOPK_TOKEN_IDS,
};
use super::shards::shard_set;

const WHAT: &str = "sample file";
const HINT: &str = "pass a .parquet file or a directory written by `kdllm generate`";

/// All samples of a file (or of a directory of parts) and their shared metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleSet {
    pub meta: FileMetadata,
    pub samples: Vec<Sample>,
}

/// Reads every sample. `path` is one `.parquet` file or a directory: with a `manifest.json`
/// (what `generate` and `score` write), the parts it lists, and only once the run is complete;
/// a folder of shard folders, their parts in shard order once every shard is there and complete;
/// else its `*.parquet` files in file-name order. Parts must agree on tokenizer, K and sampling
/// parameters.
pub fn read_samples(path: &Path) -> Result<SampleSet, DataError> {
    let parts = parts(path)?;
    let meta = agreed_metadata(&parts)?;
    let mut samples = Vec::new();
    for part in &parts {
        read_file(part, &mut samples)?;
    }
    Ok(SampleSet { meta, samples })
}

/// Reads only the metadata (the footer), checking the schema; same `path` rules as [`read_samples`].
pub fn read_metadata(path: &Path) -> Result<FileMetadata, DataError> {
    agreed_metadata(&parts(path)?)
}

/// The files behind `path`: itself, or the sorted `*.parquet` files of a directory.
fn parts(path: &Path) -> Result<Vec<PathBuf>, DataError> {
    let read_err = |source| DataError::Read { path: path.to_path_buf(), what: WHAT, hint: HINT, source };
    if !fs::metadata(path).map_err(read_err)?.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    if let Some(m) = Manifest::read(path)? {
        let parts = complete_parts(path, &m)?;
        if parts.is_empty() {
            return Err(DataError::Empty { path: path.to_path_buf(), what: "samples", hint: HINT });
        }
        return Ok(parts);
    }
    if let Some(shards) = shard_set(path)? {
        // A shard may be empty (more shards than batches); the set may not.
        let mut parts = Vec::new();
        for (dir, m) in &shards {
            parts.extend(complete_parts(dir, m)?);
        }
        if parts.is_empty() {
            return Err(DataError::Empty { path: path.to_path_buf(), what: "samples", hint: HINT });
        }
        return Ok(parts);
    }
    let mut parts = Vec::new();
    for entry in fs::read_dir(path).map_err(read_err)? {
        let p = entry.map_err(read_err)?.path();
        if p.extension().is_some_and(|e| e == "parquet") && p.is_file() {
            parts.push(p);
        }
    }
    if parts.is_empty() {
        return Err(DataError::Empty { path: path.to_path_buf(), what: "*.parquet files", hint: HINT });
    }
    parts.sort();
    Ok(parts)
}

/// The parts of a `kdllm generate` / `kdllm score` folder, once it is complete.
fn complete_parts(dir: &Path, m: &Manifest) -> Result<Vec<PathBuf>, DataError> {
    if !m.is_complete() {
        return Err(DataError::Incomplete { path: dir.to_path_buf(), done: m.done(), total: m.size() });
    }
    Ok(m.part_paths(dir))
}

fn agreed_metadata(parts: &[PathBuf]) -> Result<FileMetadata, DataError> {
    let first = open(&parts[0])?.0;
    for part in &parts[1..] {
        let other = open(part)?.0;
        // kdllm_version may differ (a run resumed by a newer build); the schema version cannot.
        let field = if other.tokenizer_hash != first.tokenizer_hash {
            "tokenizer_hash"
        } else if other.logprobs_k != first.logprobs_k {
            "logprobs_k"
        } else if other.sampling != first.sampling {
            "sampling"
        } else {
            continue;
        };
        return Err(DataError::MetadataMismatch { first: parts[0].clone(), second: part.clone(), field });
    }
    Ok(first)
}

/// Opens a file and checks its metadata and schema before any data is read.
fn open(path: &Path) -> Result<(FileMetadata, ParquetRecordBatchReaderBuilder<File>), DataError> {
    let file = File::open(path).map_err(|source| DataError::Read {
        path: path.to_path_buf(),
        what: WHAT,
        hint: HINT,
        source,
    })?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|source| DataError::Parquet { path: path.to_path_buf(), source })?;
    let kv = builder.metadata().file_metadata().key_value_metadata();
    let meta = schema::from_key_value(path, kv)?;
    schema::check_schema(path, builder.schema())?;
    // Codecs this build cannot decode (gzip, brotli, lz4): say so now instead of failing mid-read.
    for column in builder.metadata().row_groups().iter().flat_map(|g| g.columns()) {
        if !matches!(column.compression(), Compression::ZSTD(_) | Compression::SNAPPY | Compression::UNCOMPRESSED) {
            return Err(DataError::Compression {
                path: path.to_path_buf(),
                column: column.column_path().string(),
                codec: column.compression().to_string(),
            });
        }
    }
    Ok((meta, builder))
}

fn read_file(path: &Path, out: &mut Vec<Sample>) -> Result<(), DataError> {
    let (meta, builder) = open(path)?;
    let reader = builder.build().map_err(|source| DataError::Parquet { path: path.to_path_buf(), source })?;
    for batch in reader {
        let batch = batch.map_err(|source| DataError::Arrow { path: path.to_path_buf(), source })?;
        read_batch(path, &batch, meta.logprobs_k, out)?;
    }
    Ok(())
}

fn read_batch(path: &Path, batch: &RecordBatch, logprobs_k: usize, out: &mut Vec<Sample>) -> Result<(), DataError> {
    let c = Columns { path, batch };
    let prompt_id = c.strings(PROMPT_ID, false)?;
    let sample_index = c.primitive::<UInt32Type>(SAMPLE_INDEX)?;
    let prompt = c.strings(PROMPT, false)?;
    let completion = c.strings(COMPLETION, false)?;
    let prompt_token_ids = c.list::<UInt32Type>(PROMPT_TOKEN_IDS)?;
    let completion_token_ids = c.list::<UInt32Type>(COMPLETION_TOKEN_IDS)?;
    let token_logprobs = c.list::<Float32Type>(TOKEN_LOGPROBS)?;
    let topk_token_ids = c.nested::<UInt32Type>(TOPK_TOKEN_IDS)?;
    let topk_logprobs = c.nested::<Float32Type>(TOPK_LOGPROBS)?;
    let finish_reason = c.strings(FINISH_REASON, false)?;
    let teacher = c.strings(TEACHER, false)?;
    let teacher_revision = c.strings(TEACHER_REVISION, true)?;

    for row in 0..batch.num_rows() {
        let finish_reason = finish_reason.value(row).parse::<FinishReason>().map_err(|e| DataError::Schema {
            path: path.to_path_buf(),
            column: FINISH_REASON.to_string(),
            problem: format!("row {row}: {e}"),
        })?;
        let sample = Sample {
            prompt_id: prompt_id.value(row).to_string(),
            sample_index: sample_index.value(row),
            prompt: prompt.value(row).to_string(),
            completion: completion.value(row).to_string(),
            prompt_token_ids: prompt_token_ids.row(row).to_vec(),
            completion_token_ids: completion_token_ids.row(row).to_vec(),
            token_logprobs: token_logprobs.row(row).to_vec(),
            topk_token_ids: topk_token_ids.rows(row),
            topk_logprobs: topk_logprobs.rows(row),
            finish_reason,
            teacher: teacher.value(row).to_string(),
            teacher_revision: (!teacher_revision.is_null(row)).then(|| teacher_revision.value(row).to_string()),
        };
        sample.check(logprobs_k).map_err(|problem| DataError::InvalidSample {
            path: path.to_path_buf(),
            prompt_id: sample.prompt_id.clone(),
            sample_index: sample.sample_index,
            problem,
        })?;
        out.push(sample);
    }
    Ok(())
}

/// Typed, null-checked access to the columns of one batch (the schema was checked on open).
struct Columns<'a> {
    path: &'a Path,
    batch: &'a RecordBatch,
}

impl<'a> Columns<'a> {
    fn error(&self, column: &str, problem: &str) -> DataError {
        DataError::Schema { path: self.path.to_path_buf(), column: column.to_string(), problem: problem.to_string() }
    }

    fn get<T: Array + 'static>(&self, column: &str) -> Result<&'a T, DataError> {
        let batch: &'a RecordBatch = self.batch;
        batch
            .column_by_name(column)
            .and_then(|a| a.as_any().downcast_ref::<T>())
            .ok_or_else(|| self.error(column, "has an unexpected type"))
    }

    fn no_nulls(&self, column: &str, array: &dyn Array) -> Result<(), DataError> {
        match array.null_count() {
            0 => Ok(()),
            _ => Err(self.error(column, "contains nulls")),
        }
    }

    fn strings(&self, column: &str, nullable: bool) -> Result<&'a StringArray, DataError> {
        let array = self.get::<StringArray>(column)?;
        if !nullable {
            self.no_nulls(column, array)?;
        }
        Ok(array)
    }

    fn primitive<T: ArrowPrimitiveType>(&self, column: &str) -> Result<&'a PrimitiveArray<T>, DataError> {
        let array = self.get::<PrimitiveArray<T>>(column)?;
        self.no_nulls(column, array)?;
        Ok(array)
    }

    fn flat<T: ArrowPrimitiveType>(&self, column: &str, list: &'a ListArray) -> Result<Flat<'a, T::Native>, DataError> {
        self.no_nulls(column, list)?;
        let values = list
            .values()
            .as_any()
            .downcast_ref::<PrimitiveArray<T>>()
            .ok_or_else(|| self.error(column, "has an unexpected item type"))?;
        self.no_nulls(column, values)?;
        Ok(Flat { offsets: list.value_offsets(), values: values.values() })
    }

    fn list<T: ArrowPrimitiveType>(&self, column: &str) -> Result<Flat<'a, T::Native>, DataError> {
        self.flat::<T>(column, self.get::<ListArray>(column)?)
    }

    fn nested<T: ArrowPrimitiveType>(&self, column: &str) -> Result<Nested<'a, T::Native>, DataError> {
        let outer = self.get::<ListArray>(column)?;
        self.no_nulls(column, outer)?;
        let inner = outer
            .values()
            .as_any()
            .downcast_ref::<ListArray>()
            .ok_or_else(|| self.error(column, "has an unexpected item type"))?;
        Ok(Nested { offsets: outer.value_offsets(), inner: self.flat::<T>(column, inner)? })
    }
}

/// A `List<T>` column as offsets into one flat value slice.
struct Flat<'a, T> {
    offsets: &'a [i32],
    values: &'a [T],
}

impl<T: Copy> Flat<'_, T> {
    fn row(&self, i: usize) -> &[T] {
        &self.values[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }
}

/// A `List<List<T>>` column: outer offsets into the rows of an inner [`Flat`].
struct Nested<'a, T> {
    offsets: &'a [i32],
    inner: Flat<'a, T>,
}

impl<T: Copy> Nested<'_, T> {
    fn rows(&self, i: usize) -> Vec<Vec<T>> {
        let (start, end) = (self.offsets[i] as usize, self.offsets[i + 1] as usize);
        (start..end).map(|j| self.inner.row(j).to_vec()).collect()
    }
}
