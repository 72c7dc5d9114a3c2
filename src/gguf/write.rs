//! Writing a GGUF file (version 3): header, metadata, tensor infos, then the tensor data, each
//! tensor at an offset aligned to `general.alignment` (32). Written to a temporary file and
//! renamed, so a failed export leaves no partial `.gguf`.

use std::io::Write;
use std::path::Path;

use super::quant::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
const VERSION: u32 = 3;
pub const ALIGNMENT: u64 = 32;

/// A metadata value, with the GGUF type it is written as.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    I32Array(Vec<i32>),
    F32Array(Vec<f32>),
}

/// A file's metadata, in the order it is written.
pub type Metadata = Vec<(String, MetaValue)>;

/// One tensor: its GGUF name, its shape as the model holds it (rows first, e.g. `[out, in]`;
/// GGUF lists dimensions innermost first, so they are written reversed), and its encoded bytes.
pub struct TensorData {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    pub bytes: Vec<u8>,
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

// Type ids of the format's metadata values.
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;

fn value(out: &mut Vec<u8>, v: &MetaValue) {
    let array = |out: &mut Vec<u8>, ty: u32, n: usize| {
        out.extend(T_ARRAY.to_le_bytes());
        out.extend(ty.to_le_bytes());
        out.extend((n as u64).to_le_bytes());
    };
    match v {
        MetaValue::U32(x) => {
            out.extend(T_U32.to_le_bytes());
            out.extend(x.to_le_bytes());
        }
        MetaValue::I32(x) => {
            out.extend(T_I32.to_le_bytes());
            out.extend(x.to_le_bytes());
        }
        MetaValue::F32(x) => {
            out.extend(T_F32.to_le_bytes());
            out.extend(x.to_le_bytes());
        }
        MetaValue::Bool(b) => {
            out.extend(T_BOOL.to_le_bytes());
            out.push(u8::from(*b));
        }
        MetaValue::Str(s) => {
            out.extend(T_STRING.to_le_bytes());
            string(out, s);
        }
        MetaValue::StrArray(xs) => {
            array(out, T_STRING, xs.len());
            xs.iter().for_each(|s| string(out, s));
        }
        MetaValue::I32Array(xs) => {
            array(out, T_I32, xs.len());
            xs.iter().for_each(|x| out.extend(x.to_le_bytes()));
        }
        MetaValue::F32Array(xs) => {
            array(out, T_F32, xs.len());
            xs.iter().for_each(|x| out.extend(x.to_le_bytes()));
        }
    }
}

fn pad(len: u64) -> u64 {
    len.div_ceil(ALIGNMENT) * ALIGNMENT - len
}

/// The whole file's bytes.
pub fn encode(metadata: &[(String, MetaValue)], tensors: &[TensorData]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(MAGIC);
    out.extend(VERSION.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, v) in metadata {
        string(&mut out, key);
        value(&mut out, v);
    }
    let mut offset = 0u64;
    for t in tensors {
        string(&mut out, &t.name);
        out.extend((t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            out.extend((*d as u64).to_le_bytes());
        }
        out.extend((t.ty as u32).to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += t.bytes.len() as u64 + pad(t.bytes.len() as u64);
    }
    out.resize(out.len() + pad(out.len() as u64) as usize, 0);
    for t in tensors {
        out.extend(&t.bytes);
        out.resize(out.len() + pad(t.bytes.len() as u64) as usize, 0);
    }
    out
}

/// Writes the file atomically: a temporary file beside `path`, renamed when complete.
pub fn write(path: &Path, metadata: &[(String, MetaValue)], tensors: &[TensorData]) -> std::io::Result<()> {
    let tmp = path.with_extension("gguf.partial");
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&encode(metadata, tensors))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
