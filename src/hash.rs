//! Hashes. FNV-1a for seeds and splits: unlike `DefaultHasher`, its values never change across
//! runs, platforms or Rust versions, so outputs stay reproducible. SHA-256 of files and folders
//! for what must recognise content: resumed outputs, cached recipe steps.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use sha2::{Digest, Sha256};

pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for part in parts {
        for b in part.iter().chain(&[0xff]) {
            h = (h ^ *b as u64).wrapping_mul(0x100000001b3);
        }
    }
    h
}

/// `sha256:<hex>` of a file's content, or of a folder's: every file under it whose relative path
/// `skip` does not reject, in path order, each as (relative path, content).
pub fn sha256_path(path: &Path, skip: &dyn Fn(&Path) -> bool) -> io::Result<String> {
    let mut h = Sha256::new();
    if path.is_dir() {
        let mut files = Vec::new();
        walk(path, path, skip, &mut files)?;
        files.sort();
        for rel in files {
            h.update(rel.to_string_lossy().as_bytes());
            h.update([0]);
            hash_file(&path.join(&rel), &mut h)?;
        }
    } else {
        hash_file(path, &mut h)?;
    }
    Ok(format!("sha256:{:x}", h.finalize()))
}

fn walk(root: &Path, dir: &Path, skip: &dyn Fn(&Path) -> bool, out: &mut Vec<std::path::PathBuf>) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let rel = path.strip_prefix(root).expect("under root").to_path_buf();
        if skip(&rel) {
            continue;
        }
        if path.is_dir() {
            walk(root, &path, skip, out)?;
        } else {
            out.push(rel);
        }
    }
    Ok(())
}

fn hash_file(path: &Path, h: &mut Sha256) -> io::Result<()> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
    // The length ends each file, so two files cannot run into each other.
    h.update(len.to_le_bytes());
    Ok(())
}

/// `  key: old (on disk) → new (now)`, one line per differing leaf of two JSON objects: what
/// changed between the job that wrote an output and the one asked for now.
pub fn json_diff(old: &serde_json::Value, new: &serde_json::Value) -> String {
    fn leaves(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    leaves(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    leaves("", old, &mut a);
    leaves("", new, &mut b);
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let none = "(none)".to_string();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("  {k}: {} (on disk) → {} (now)", a.get(k).unwrap_or(&none), b.get(k).unwrap_or(&none)))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_value_and_part_boundaries_matter() {
        assert_eq!(fnv1a(&[]), 0xcbf29ce484222325);
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
    }

    #[test]
    fn json_diff_names_each_changed_leaf() {
        let old = serde_json::json!({"sampling": {"temperature": 1.0, "top_p": 1.0}, "teacher": "a"});
        let new = serde_json::json!({"sampling": {"temperature": 0.7, "top_p": 1.0}, "teacher": "a", "x": 1});
        assert_eq!(
            json_diff(&old, &new),
            "  sampling.temperature: 1.0 (on disk) → 0.7 (now)\n  x: (none) (on disk) → 1 (now)"
        );
        assert_eq!(json_diff(&old, &old), "");
    }

    #[test]
    fn folder_hash_follows_content_and_names_and_honours_skip() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("sub")).unwrap();
        std::fs::write(d.join("a.txt"), "one").unwrap();
        std::fs::write(d.join("sub/b.txt"), "two").unwrap();
        let none = |_: &Path| false;
        let first = sha256_path(d, &none).unwrap();
        assert_eq!(first, sha256_path(d, &none).unwrap());
        std::fs::write(d.join("sub/b.txt"), "tw0").unwrap();
        let changed = sha256_path(d, &none).unwrap();
        assert_ne!(first, changed);
        std::fs::rename(d.join("sub/b.txt"), d.join("sub/c.txt")).unwrap();
        assert_ne!(changed, sha256_path(d, &none).unwrap(), "a renamed file changes the hash");
        let skip_sub = |p: &Path| p.starts_with("sub");
        let without = sha256_path(d, &skip_sub).unwrap();
        std::fs::write(d.join("sub/c.txt"), "anything").unwrap();
        assert_eq!(without, sha256_path(d, &skip_sub).unwrap());
        assert!(sha256_path(&d.join("a.txt"), &none).unwrap().starts_with("sha256:"));
    }
}
