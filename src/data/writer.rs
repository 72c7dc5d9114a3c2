//! Writes teacher samples to a Parquet file, atomically: the data goes to `<name>.partial`
//! and is renamed to `<name>` only by [`SampleWriter::finish`].

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Float32Builder, ListBuilder, RecordBatch, StringBuilder, UInt32Builder};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use super::error::DataError;
use super::sample::{FileMetadata, Sample};
use super::schema::{self, list_item, COMPLETION_TOKEN_IDS, TOKEN_LOGPROBS, TOPK_LOGPROBS, TOPK_TOKEN_IDS};

/// zstd's own default level; parquet-rs defaults to 1.
const ZSTD_LEVEL: i32 = 3;

/// Rows per row group: small enough that a reader can stream, large enough to compress well.
const ROW_GROUP_ROWS: usize = 1024;

/// Streams [`Sample`]s into a Parquet file with the layout of `schema.rs`.
///
/// Dropping the writer without calling [`finish`](Self::finish) deletes the partial file,
/// so an interrupted run never leaves a half-written file under the final name.
pub struct SampleWriter {
    path: PathBuf,
    partial: PathBuf,
    logprobs_k: usize,
    schema: Arc<Schema>,
    /// Taken by `finish`.
    writer: Option<ArrowWriter<File>>,
    columns: Columns,
    row_group_rows: usize,
    rows: u64,
    /// Set once the file has been renamed to `path`; until then Drop deletes `partial`.
    finished: bool,
}

impl SampleWriter {
    /// Creates `<path>.partial` (and missing parent directories).
    pub fn create(path: &Path, meta: &FileMetadata) -> Result<Self, DataError> {
        let write_err = |source| DataError::Write { path: path.to_path_buf(), source };
        let name = path.file_name().ok_or_else(|| {
            write_err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "the output path has no file name"))
        })?;
        let mut partial_name = name.to_os_string();
        partial_name.push(".partial");
        let partial = path.with_file_name(partial_name);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(write_err)?;
        }
        let file = File::create(&partial).map_err(|source| DataError::Write { path: partial.clone(), source })?;

        let key_values = schema::to_key_value(meta);
        // Also on the Arrow schema: pyarrow's `read_table().schema.metadata` shows only that.
        let schema_metadata: HashMap<String, String> =
            key_values.iter().map(|kv| (kv.key.clone(), kv.value.clone().unwrap_or_default())).collect();
        let schema = Arc::new(schema::sample_schema().as_ref().clone().with_metadata(schema_metadata));
        let level = ZstdLevel::try_new(ZSTD_LEVEL).expect("3 is a valid zstd level");
        let mut props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(level))
            .set_key_value_metadata(Some(key_values))
            // Numbers are near-random (ids, log-probs): a dictionary only costs time there.
            .set_dictionary_enabled(false);
        for column in schema::STRING_COLUMNS {
            props = props.set_column_dictionary_enabled(ColumnPath::from(column), true);
        }
        // Measured on random K=20 data: -7% file size each. Byte-stream split lets zstd see
        // the float exponents together; delta bit-packing stores ids in ~16 bits, not 32.
        for (column, depth) in [(TOKEN_LOGPROBS, 1), (TOPK_LOGPROBS, 2)] {
            props = props.set_column_encoding(leaf(column, depth), Encoding::BYTE_STREAM_SPLIT);
        }
        for (column, depth) in [(COMPLETION_TOKEN_IDS, 1), (TOPK_TOKEN_IDS, 2)] {
            props = props.set_column_encoding(leaf(column, depth), Encoding::DELTA_BINARY_PACKED);
        }
        let writer = match ArrowWriter::try_new(file, schema.clone(), Some(props.build())) {
            Ok(writer) => writer,
            Err(source) => {
                let _ = fs::remove_file(&partial);
                return Err(DataError::ParquetWrite { path: partial, source });
            }
        };
        Ok(SampleWriter {
            path: path.to_path_buf(),
            partial,
            logprobs_k: meta.logprobs_k,
            schema,
            writer: Some(writer),
            columns: Columns::new(),
            row_group_rows: ROW_GROUP_ROWS,
            rows: 0,
            finished: false,
        })
    }

    /// Validates and buffers one sample; a full row group is written out.
    pub fn write(&mut self, s: &Sample) -> Result<(), DataError> {
        s.check(self.logprobs_k).map_err(|problem| DataError::InvalidSample {
            path: self.path.clone(),
            prompt_id: s.prompt_id.clone(),
            sample_index: s.sample_index,
            problem,
        })?;
        self.columns.append(s);
        self.rows += 1;
        if self.columns.len >= self.row_group_rows {
            self.flush_row_group()?;
        }
        Ok(())
    }

    /// Writes the footer, fsyncs, renames `<path>.partial` to `<path>`; returns the row count.
    pub fn finish(mut self) -> Result<u64, DataError> {
        self.flush_row_group()?;
        let writer = self.writer.take().expect("writer present until finish");
        let file = writer.into_inner().map_err(|source| self.parquet_err(source))?;
        let write_err = |source| DataError::Write { path: self.path.clone(), source };
        file.sync_all().map_err(write_err)?;
        drop(file);
        fs::rename(&self.partial, &self.path).map_err(write_err)?;
        // Make the rename itself durable (a crash could otherwise lose the directory entry).
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        self.finished = true;
        Ok(self.rows)
    }

    fn flush_row_group(&mut self) -> Result<(), DataError> {
        if self.columns.len == 0 {
            return Ok(());
        }
        let batch = RecordBatch::try_new(self.schema.clone(), self.columns.finish())
            .map_err(|source| DataError::Arrow { path: self.partial.clone(), source })?;
        let writer = self.writer.as_mut().expect("writer present until finish");
        writer.write(&batch).map_err(|source| DataError::ParquetWrite { path: self.partial.clone(), source })?;
        writer.flush().map_err(|source| self.parquet_err(source))
    }

    fn parquet_err(&self, source: parquet::errors::ParquetError) -> DataError {
        DataError::ParquetWrite { path: self.partial.clone(), source }
    }
}

/// The Parquet leaf of a column nested in `depth` lists, as arrow-rs names it:
/// `topk_logprobs.list.item.list.item`.
fn leaf(column: &str, depth: usize) -> ColumnPath {
    let mut parts = vec![column.to_string()];
    for _ in 0..depth {
        parts.extend(["list".to_string(), Field::LIST_FIELD_DEFAULT_NAME.to_string()]);
    }
    ColumnPath::new(parts)
}

impl Drop for SampleWriter {
    fn drop(&mut self) {
        // Not finished means the output is incomplete (error or interrupted run): remove it.
        if !self.finished {
            drop(self.writer.take());
            let _ = fs::remove_file(&self.partial);
        }
    }
}

/// Arrow builders for one row group, one per column in schema order.
struct Columns {
    len: usize,
    prompt_id: StringBuilder,
    sample_index: UInt32Builder,
    prompt: StringBuilder,
    completion: StringBuilder,
    prompt_token_ids: ListBuilder<UInt32Builder>,
    completion_token_ids: ListBuilder<UInt32Builder>,
    token_logprobs: ListBuilder<Float32Builder>,
    topk_token_ids: ListBuilder<ListBuilder<UInt32Builder>>,
    topk_logprobs: ListBuilder<ListBuilder<Float32Builder>>,
    finish_reason: StringBuilder,
    teacher: StringBuilder,
    teacher_revision: StringBuilder,
}

impl Columns {
    fn new() -> Self {
        let ids = || ListBuilder::new(UInt32Builder::new()).with_field(list_item(DataType::UInt32));
        let logprobs = || ListBuilder::new(Float32Builder::new()).with_field(list_item(DataType::Float32));
        let ids_type = DataType::List(list_item(DataType::UInt32));
        let logprobs_type = DataType::List(list_item(DataType::Float32));
        Columns {
            len: 0,
            prompt_id: StringBuilder::new(),
            sample_index: UInt32Builder::new(),
            prompt: StringBuilder::new(),
            completion: StringBuilder::new(),
            prompt_token_ids: ids(),
            completion_token_ids: ids(),
            token_logprobs: logprobs(),
            topk_token_ids: ListBuilder::new(ids()).with_field(list_item(ids_type)),
            topk_logprobs: ListBuilder::new(logprobs()).with_field(list_item(logprobs_type)),
            finish_reason: StringBuilder::new(),
            teacher: StringBuilder::new(),
            teacher_revision: StringBuilder::new(),
        }
    }

    fn append(&mut self, s: &Sample) {
        self.prompt_id.append_value(&s.prompt_id);
        self.sample_index.append_value(s.sample_index);
        self.prompt.append_value(&s.prompt);
        self.completion.append_value(&s.completion);
        self.prompt_token_ids.append_value(s.prompt_token_ids.iter().map(|&x| Some(x)));
        self.completion_token_ids.append_value(s.completion_token_ids.iter().map(|&x| Some(x)));
        self.token_logprobs.append_value(s.token_logprobs.iter().map(|&x| Some(x)));
        for row in &s.topk_token_ids {
            self.topk_token_ids.values().values().append_slice(row);
            self.topk_token_ids.values().append(true);
        }
        self.topk_token_ids.append(true);
        for row in &s.topk_logprobs {
            self.topk_logprobs.values().values().append_slice(row);
            self.topk_logprobs.values().append(true);
        }
        self.topk_logprobs.append(true);
        self.finish_reason.append_value(s.finish_reason.as_str());
        self.teacher.append_value(&s.teacher);
        self.teacher_revision.append_option(s.teacher_revision.as_deref());
        self.len += 1;
    }

    /// The finished arrays, in schema order; the builders are reset for the next row group.
    fn finish(&mut self) -> Vec<ArrayRef> {
        self.len = 0;
        vec![
            Arc::new(self.prompt_id.finish()),
            Arc::new(self.sample_index.finish()),
            Arc::new(self.prompt.finish()),
            Arc::new(self.completion.finish()),
            Arc::new(self.prompt_token_ids.finish()),
            Arc::new(self.completion_token_ids.finish()),
            Arc::new(self.token_logprobs.finish()),
            Arc::new(self.topk_token_ids.finish()),
            Arc::new(self.topk_logprobs.finish()),
            Arc::new(self.finish_reason.finish()),
            Arc::new(self.teacher.finish()),
            Arc::new(self.teacher_revision.finish()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use std::fs::{self, File};
    use std::path::Path;

    use arrow::array::RecordBatch;
    use arrow::datatypes::{DataType, Field, Schema};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::arrow::ArrowWriter;
    use parquet::basic::Encoding;
    use parquet::file::properties::WriterProperties;

    use super::SampleWriter;
    use crate::data::schema::{self, SAMPLE_INDEX};
    use crate::data::{read_metadata, read_samples, DataError, FileMetadata, FinishReason, Sample};

    /// Deterministic xorshift so tests need no RNG seed plumbing.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn id(&mut self) -> u32 {
            (self.next() % 32000) as u32
        }
        fn logprob(&mut self) -> f32 {
            -((self.next() % 1_000_000) as f32) / 50_000.0
        }
    }

    fn meta(k: usize) -> FileMetadata {
        FileMetadata::new("sha256:abc", k, serde_json::json!({"temperature": 0.8, "top_p": 0.95}))
    }

    fn sample(rng: &mut Rng, id: &str, index: u32, tokens: usize, k: usize) -> Sample {
        let completion_token_ids: Vec<u32> = (0..tokens).map(|_| rng.id()).collect();
        let topk_logprobs: Vec<Vec<f32>> = (0..tokens)
            .map(|_| {
                let mut row: Vec<f32> = (0..k).map(|_| rng.logprob()).collect();
                row.sort_by(|a, b| b.total_cmp(a));
                row
            })
            .collect();
        Sample {
            prompt_id: id.to_string(),
            sample_index: index,
            prompt: format!("<|user|>question {id}<|assistant|>"),
            completion: "x".repeat(tokens),
            prompt_token_ids: (0..7).map(|_| rng.id()).collect(),
            token_logprobs: (0..tokens).map(|_| rng.logprob()).collect(),
            topk_token_ids: (0..tokens).map(|_| (0..k).map(|_| rng.id()).collect()).collect(),
            completion_token_ids,
            topk_logprobs,
            finish_reason: if tokens.is_multiple_of(2) { FinishReason::Stop } else { FinishReason::Length },
            teacher: "qwen2.5-0.5b".to_string(),
            teacher_revision: Some("main".to_string()),
        }
    }

    fn write_all(path: &Path, meta: &FileMetadata, samples: &[Sample], rows_per_group: usize) {
        let mut w = SampleWriter::create(path, meta).expect("create");
        w.row_group_rows = rows_per_group;
        for s in samples {
            w.write(s).expect("write");
        }
        assert_eq!(w.finish().expect("finish"), samples.len() as u64);
    }

    fn samples(n: usize, k: usize) -> Vec<Sample> {
        let mut rng = Rng(0x9e3779b97f4a7c15);
        (0..n).map(|i| sample(&mut rng, &format!("p{i}"), i as u32 % 3, 3 + i % 4, k)).collect()
    }

    #[test]
    fn round_trip_keeps_every_field_across_row_groups() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/out.parquet");
        let mut all = samples(5, 4);
        all[1].completion_token_ids.clear();
        all[1].token_logprobs.clear();
        all[1].topk_token_ids.clear();
        all[1].topk_logprobs.clear();
        all[1].completion.clear();
        all[2].teacher_revision = None;
        all[3].token_logprobs[0] = f32::NEG_INFINITY;
        write_all(&path, &meta(4), &all, 2);

        let set = read_samples(&path).unwrap();
        assert_eq!(set.meta, meta(4));
        assert_eq!(set.samples, all);
        assert_eq!(read_metadata(&path).unwrap(), meta(4));
        let groups =
            ParquetRecordBatchReaderBuilder::try_new(File::open(&path).unwrap()).unwrap().metadata().num_row_groups();
        assert_eq!(groups, 3, "5 rows at 2 rows per group");
        // Guards the leaf paths in `leaf()`: a wrong name would silently fall back to PLAIN.
        let meta = ParquetRecordBatchReaderBuilder::try_new(File::open(&path).unwrap()).unwrap().metadata().clone();
        let encodings: Vec<_> = meta
            .row_group(0)
            .columns()
            .iter()
            .map(|c| (c.column_path().string(), c.encodings().collect::<Vec<_>>()))
            .collect();
        for (column, encoding) in [
            ("topk_logprobs.list.item.list.item", Encoding::BYTE_STREAM_SPLIT),
            ("topk_token_ids.list.item.list.item", Encoding::DELTA_BINARY_PACKED),
        ] {
            assert!(
                encodings.iter().any(|(c, e)| c == column && e.contains(&encoding)),
                "{column} should use {encoding:?}: {encodings:?}"
            );
        }
        assert!(!path.with_file_name("out.parquet.partial").exists());
    }

    #[test]
    fn zero_samples_give_a_readable_empty_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.parquet");
        write_all(&path, &meta(2), &[], 1024);
        assert!(read_samples(&path).unwrap().samples.is_empty());
    }

    #[test]
    fn drop_without_finish_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.parquet");
        let partial = dir.path().join("out.parquet.partial");
        let mut w = SampleWriter::create(&path, &meta(4)).unwrap();
        w.write(&samples(1, 4)[0]).unwrap();
        assert!(partial.exists(), "data goes to the .partial file first");
        drop(w);
        assert!(!partial.exists());
        assert!(!path.exists());
    }

    #[test]
    fn unwritable_output_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("not-a-dir");
        fs::write(&blocker, b"").unwrap();
        let err = SampleWriter::create(&blocker.join("out.parquet"), &meta(4))
            .err()
            .expect("a file cannot be a parent directory");
        let msg = err.to_string();
        assert!(msg.contains("not-a-dir") && msg.contains("writable"), "{msg}");
    }

    #[test]
    fn length_mismatch_names_the_prompt() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SampleWriter::create(&dir.path().join("out.parquet"), &meta(4)).unwrap();
        let mut s = samples(1, 4).remove(0);
        s.prompt_id = "q-17".to_string();
        s.token_logprobs.pop();
        let err = w.write(&s).unwrap_err().to_string();
        assert!(err.contains("q-17") && err.contains("token_logprobs"), "{err}");

        let mut s = samples(1, 4).remove(0);
        s.prompt_id = "q-18".to_string();
        s.topk_logprobs[1].push(-1.0);
        let err = w.write(&s).unwrap_err().to_string();
        assert!(err.contains("q-18") && err.contains("logprobs_k is 4"), "{err}");
    }

    /// A file with kdllm's metadata and the given schema, holding no rows.
    fn write_foreign(path: &Path, schema: Schema, meta: Option<&FileMetadata>) {
        let props = WriterProperties::builder().set_key_value_metadata(meta.map(schema::to_key_value)).build();
        let schema = std::sync::Arc::new(schema);
        let mut w = ArrowWriter::try_new(File::create(path).unwrap(), schema.clone(), Some(props)).unwrap();
        w.write(&RecordBatch::new_empty(schema)).unwrap();
        w.close().unwrap();
    }

    #[test]
    fn wrong_column_type_is_rejected_naming_the_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("foreign.parquet");
        let fields = schema::sample_schema()
            .fields()
            .iter()
            .map(|f| match f.name().as_str() {
                SAMPLE_INDEX => Field::new(SAMPLE_INDEX, DataType::Int64, false),
                _ => f.as_ref().clone(),
            })
            .collect::<Vec<_>>();
        write_foreign(&path, Schema::new(fields), Some(&meta(4)));
        match read_samples(&path) {
            Err(DataError::Schema { column, problem, .. }) => {
                assert_eq!(column, SAMPLE_INDEX);
                assert!(problem.contains("Int64"), "{problem}");
            }
            other => panic!("expected a schema error, got {other:?}"),
        }
    }

    #[test]
    fn missing_metadata_is_rejected_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nometa.parquet");
        write_foreign(&path, schema::sample_schema().as_ref().clone(), None);
        let err = read_metadata(&path).unwrap_err().to_string();
        assert!(err.contains("kdllm.schema_version") && err.contains("nometa.parquet"), "{err}");
    }

    #[test]
    fn truncated_or_foreign_file_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.parquet");
        write_all(&path, &meta(4), &samples(3, 4), 1024);
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let err = read_samples(&path).unwrap_err();
        assert!(matches!(err, DataError::Parquet { .. }), "{err:?}");
        assert!(err.to_string().contains("cut.parquet"), "{err}");

        let text = dir.path().join("notes.parquet");
        fs::write(&text, "just some text, definitely not parquet").unwrap();
        assert!(matches!(read_samples(&text), Err(DataError::Parquet { .. })));
    }

    #[test]
    fn directory_parts_are_read_in_name_order_and_partial_files_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let all = samples(6, 2);
        write_all(&dir.path().join("part-001.parquet"), &meta(2), &all[3..], 1024);
        write_all(&dir.path().join("part-000.parquet"), &meta(2), &all[..3], 1024);
        fs::write(dir.path().join("part-002.parquet.partial"), b"half written").unwrap();
        let set = read_samples(dir.path()).unwrap();
        assert_eq!(set.samples, all);

        let mut other = meta(2);
        other.tokenizer_hash = "sha256:different".to_string();
        write_all(&dir.path().join("part-003.parquet"), &other, &all[..1], 1024);
        let err = read_samples(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("part-000.parquet") && err.contains("part-003.parquet") && err.contains("tokenizer_hash"),
            "{err}"
        );
    }

    /// Size measurement, not a check: `cargo test --release --lib bytes_per_token -- --ignored --nocapture`.
    /// Leaves the file in the temp dir for inspection with other tools.
    #[test]
    #[ignore = "measurement; prints bytes per completion token"]
    fn bytes_per_token_k20() {
        let (n, tokens, k) = (200, 64, 20);
        let mut rng = Rng(42);
        let mut all: Vec<Sample> =
            (0..n).map(|i| sample(&mut rng, &format!("p{}", i / 4), i as u32 % 4, tokens, k)).collect();
        // Edge cases for readers in other tools: an empty completion and a null revision.
        all[0].completion_token_ids.clear();
        all[0].token_logprobs.clear();
        all[0].topk_token_ids.clear();
        all[0].topk_logprobs.clear();
        all[0].completion.clear();
        all[1].teacher_revision = None;
        let path = std::env::temp_dir().join("kdllm_k20.parquet");
        write_all(&path, &meta(k), &all, super::ROW_GROUP_ROWS);
        let bytes = fs::metadata(&path).unwrap().len();
        println!(
            "{}: {bytes} bytes, {:.1} bytes per completion token (K={k})",
            path.display(),
            bytes as f64 / (n * tokens - tokens) as f64
        );
    }
}
