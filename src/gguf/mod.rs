//! GGUF files at the level of the format (<https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>):
//! typed reads of the metadata, for the model loader and the tokenizer alike; the writer and
//! the tensor encodings the exporter uses.

pub mod quant;
pub mod write;

pub use quant::GgmlType;
pub use write::{MetaValue, Metadata, TensorData};

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

/// Typed reads of GGUF metadata; each error names the key.
pub struct Meta<'a>(pub &'a HashMap<String, Value>);

type MetaResult<T> = std::result::Result<T, String>;

impl Meta<'_> {
    /// Any non-negative integer type (writers differ: u32, i32, u64 all occur).
    pub fn u64(&self, key: &str) -> MetaResult<Option<u64>> {
        let Some(v) = self.0.get(key) else { return Ok(None) };
        let n = match v {
            Value::U8(x) => Some(*x as u64),
            Value::U16(x) => Some(*x as u64),
            Value::U32(x) => Some(*x as u64),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        n.map(Some).ok_or_else(|| format!("metadata `{key}` must be a non-negative integer, found {}", describe(v)))
    }

    pub fn required_u64(&self, key: &str) -> MetaResult<u64> {
        self.u64(key)?.ok_or_else(|| missing(key))
    }

    /// f32 values as the shortest decimal that reads back as the same f32 (1e-5, not 9.99999974e-6),
    /// so the config.json written from them reads like the original.
    pub fn f64(&self, key: &str) -> MetaResult<Option<f64>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(x.to_string().parse().unwrap_or(*x as f64))),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => Err(format!("metadata `{key}` must be a float, found {}", describe(v))),
        }
    }

    pub fn required_f64(&self, key: &str) -> MetaResult<f64> {
        self.f64(key)?.ok_or_else(|| missing(key))
    }

    pub fn str(&self, key: &str) -> MetaResult<Option<&str>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(format!("metadata `{key}` must be a string, found {}", describe(v))),
        }
    }

    pub fn bool(&self, key: &str) -> MetaResult<Option<bool>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(format!("metadata `{key}` must be a bool, found {}", describe(v))),
        }
    }

    pub fn str_array(&self, key: &str) -> MetaResult<Option<Vec<&str>>> {
        let Some(v) = self.0.get(key) else { return Ok(None) };
        let bad = || format!("metadata `{key}` must be an array of strings, found {}", describe(v));
        let Value::Array(items) = v else { return Err(bad()) };
        items
            .iter()
            .map(|x| if let Value::String(s) = x { Ok(s.as_str()) } else { Err(bad()) })
            .collect::<MetaResult<_>>()
            .map(Some)
    }

    pub fn f32_array(&self, key: &str) -> MetaResult<Option<Vec<f32>>> {
        let Some(v) = self.0.get(key) else { return Ok(None) };
        let bad = || format!("metadata `{key}` must be an array of floats, found {}", describe(v));
        let Value::Array(items) = v else { return Err(bad()) };
        items
            .iter()
            .map(|x| match x {
                Value::F32(f) => Ok(*f),
                Value::F64(f) => Ok(*f as f32),
                _ => Err(bad()),
            })
            .collect::<MetaResult<_>>()
            .map(Some)
    }

    pub fn int_array(&self, key: &str) -> MetaResult<Option<Vec<i64>>> {
        let Some(v) = self.0.get(key) else { return Ok(None) };
        let bad = || format!("metadata `{key}` must be an array of integers, found {}", describe(v));
        let Value::Array(items) = v else { return Err(bad()) };
        items
            .iter()
            .map(|x| match x {
                Value::I32(n) => Ok(*n as i64),
                Value::U32(n) => Ok(*n as i64),
                Value::I64(n) => Ok(*n),
                Value::U8(n) => Ok(*n as i64),
                Value::I8(n) => Ok(*n as i64),
                _ => Err(bad()),
            })
            .collect::<MetaResult<_>>()
            .map(Some)
    }
}

fn missing(key: &str) -> String {
    format!("missing metadata key `{key}`")
}

/// A value's type for an error message (never the value: arrays hold the whole vocabulary).
fn describe(v: &Value) -> String {
    match v {
        Value::Array(items) => format!("an array of {} items", items.len()),
        other => format!("{:?}", other.value_type()),
    }
}
