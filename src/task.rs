//! The quickstart's own formal task: multi-digit addition, with answers that can be checked.
//!
//! A task small enough to train a teacher from scratch on a CPU in minutes, yet with a notion of
//! "correct" that does not depend on any model: `750+860=` (57 + 68, digits least-significant first) has exactly one right completion. That
//! makes the effect of distillation measurable as plain accuracy, next to NLL and KL.
//!
//! `write_task_data` writes four JSONL files into one folder:
//!
//! | file                 | rows                     | used for                                   |
//! |----------------------|--------------------------|--------------------------------------------|
//! | `train.jsonl`        | `{"prompt","completion"}`| fine-tuning the teacher; training the BPE  |
//! | `test.jsonl`         | `{"prompt","completion"}`| task accuracy of every model               |
//! | `prompts.jsonl`      | `{"id","prompt"}`        | problems the teacher answers for the student|
//! | `test_prompts.jsonl` | `{"id","prompt"}`        | the test problems, ids `test-N`            |
//!
//! The three sets of problems are pairwise disjoint by `(a, b)`, so neither the teacher's
//! training data nor the distillation data leaks the test answers.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Which task to generate.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// `a+b=` → the sum, `max_digits + 1` digits wide.
    #[default]
    Addition,
    /// `a*b=` → the product, `2 · max_digits` digits wide: every digit of the product depends on
    /// many digit pairs, which makes it much harder than addition for a small model.
    Multiplication,
}

impl TaskKind {
    fn symbol(self) -> char {
        match self {
            TaskKind::Addition => '+',
            TaskKind::Multiplication => '*',
        }
    }

    fn apply(self, a: u64, b: u64) -> u64 {
        match self {
            TaskKind::Addition => a + b,
            TaskKind::Multiplication => a * b,
        }
    }

    /// Digits of the widest result of two `width`-digit operands.
    fn result_width(self, width: usize) -> usize {
        match self {
            TaskKind::Addition => width + 1,
            TaskKind::Multiplication => 2 * width,
        }
    }
}

/// The `task:` section of a recipe's `task` step. Defaults live only in `Default`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TaskConfig {
    pub kind: TaskKind,
    /// Each operand has 1..=`max_digits` digits (at most 18, so that sums fit in a u64).
    pub max_digits: usize,
    /// Write every number, operands and sum, least-significant digit first (see `number`).
    pub reverse_digits: bool,
    pub train_examples: usize,
    pub test_examples: usize,
    /// Problems the teacher will answer for distillation.
    pub prompts: usize,
    /// The first N train problems are also written to `student_train.jsonl`: the labels a
    /// student has without the teacher, when the teacher was trained on more (0: no file).
    pub student_examples: usize,
    pub seed: u64,
    /// Vocabulary size of the BPE tokenizer the recipe trains on `train.jsonl`.
    pub tokenizer_vocab_size: usize,
}

impl Default for TaskConfig {
    fn default() -> Self {
        Self {
            kind: TaskKind::Addition,
            max_digits: 3,
            reverse_digits: true,
            train_examples: 20_000,
            test_examples: 500,
            prompts: 2000,
            student_examples: 0,
            seed: 0,
            tokenizer_vocab_size: 300,
        }
    }
}

/// One row of `train.jsonl` / `test.jsonl` (read back with `data::read_examples`).
#[derive(Serialize)]
struct ExampleRow {
    prompt: String,
    completion: String,
}

/// One prompt, as stored in `prompts.jsonl` and `test_prompts.jsonl` (the prompt-file format
/// that `generate` reads).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
struct PromptRow {
    id: String,
    prompt: String,
}

/// The files `write_task_data` wrote.
#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct TaskFiles {
    pub train: PathBuf,
    pub test: PathBuf,
    pub prompts: PathBuf,
    pub test_prompts: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub student_train: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error(
        "task: `max_digits` must be between 1 and 18 (9 for multiplication, so that products fit in a u64), got {0}"
    )]
    MaxDigits(usize),
    #[error(
        "task: {requested} problems requested (train_examples + test_examples + prompts) but only \
         {available} distinct problems have at most {max_digits} digits per operand; \
         lower the counts or raise `max_digits`"
    )]
    TooManyProblems { requested: u128, available: u128, max_digits: usize },
    #[error("task: `student_examples` ({student}) is more than `train_examples` ({train}); it counts the first train problems a student may also use")]
    StudentExamples { student: usize, train: usize },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// `n` zero-padded to `width` digits, least-significant digit first when `reverse`.
///
/// Why fixed width: each digit then sits at a fixed position, so attention finds the digits to
/// add by relative position alone. Why reversed: a causal model writes the sum left to right but
/// carries travel from the least-significant digit; written LSB-first, sum digit i needs operand
/// digits i (and i − 1 for the carry), which sit at the same distance back for every i (Lee et
/// al. 2023, "Teaching Arithmetic to Small Transformers").
fn number(n: u64, width: usize, reverse: bool) -> String {
    let plain = format!("{n:0width$}");
    if reverse {
        plain.chars().rev().collect()
    } else {
        plain
    }
}

/// The prompt of the problem `a + b` (or `a * b`), operands `width` digits wide.
fn prompt(kind: TaskKind, a: u64, b: u64, width: usize, reverse: bool) -> String {
    format!("{}{}{}=", number(a, width, reverse), kind.symbol(), number(b, width, reverse))
}

/// The expected completion: the result, as wide as the widest result of such operands.
fn answer(kind: TaskKind, a: u64, b: u64, width: usize, reverse: bool) -> String {
    number(kind.apply(a, b), kind.result_width(width), reverse)
}

/// Draws one operand: a digit count uniform in 1..=max_digits, then a value uniform among the
/// numbers with that many digits (so 3-digit numbers do not swamp the 1-digit ones).
fn operand(rng: &mut StdRng, max_digits: usize) -> u64 {
    let digits = rng.random_range(1..=max_digits) as u32;
    let lo = if digits == 1 { 0 } else { 10u64.pow(digits - 1) };
    let hi = 10u64.pow(digits) - 1;
    rng.random_range(lo..=hi)
}

/// Writes the task's four files into `dir` (created if missing). The same config and seed always
/// give the same files. The test problems are drawn first, so the test set does not change when
/// only `train_examples` or `prompts` do.
pub fn write_task_data(cfg: &TaskConfig, dir: &Path) -> Result<TaskFiles, TaskError> {
    if !(1..=18).contains(&cfg.max_digits) || (cfg.kind == TaskKind::Multiplication && cfg.max_digits > 9) {
        return Err(TaskError::MaxDigits(cfg.max_digits));
    }
    if cfg.student_examples > cfg.train_examples {
        return Err(TaskError::StudentExamples { student: cfg.student_examples, train: cfg.train_examples });
    }
    let available = 10u128.pow(cfg.max_digits as u32).pow(2);
    let requested = (cfg.train_examples + cfg.test_examples + cfg.prompts) as u128;
    if requested > available {
        return Err(TaskError::TooManyProblems { requested, available, max_digits: cfg.max_digits });
    }

    // Rejection sampling of unseen (a, b) pairs keeps the three sets disjoint.
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut seen = HashSet::new();
    let mut draw = |n: usize| -> Vec<(u64, u64)> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let pair = (operand(&mut rng, cfg.max_digits), operand(&mut rng, cfg.max_digits));
            if seen.insert(pair) {
                out.push(pair);
            }
        }
        out
    };
    let test = draw(cfg.test_examples);
    let train = draw(cfg.train_examples);
    let prompts = draw(cfg.prompts);

    std::fs::create_dir_all(dir).map_err(|source| TaskError::Write { path: dir.to_path_buf(), source })?;
    let files = TaskFiles {
        train: dir.join("train.jsonl"),
        test: dir.join("test.jsonl"),
        prompts: dir.join("prompts.jsonl"),
        test_prompts: dir.join("test_prompts.jsonl"),
        student_train: (cfg.student_examples > 0).then(|| dir.join("student_train.jsonl")),
    };
    let example = |&(a, b): &(u64, u64)| ExampleRow {
        prompt: prompt(cfg.kind, a, b, cfg.max_digits, cfg.reverse_digits),
        completion: answer(cfg.kind, a, b, cfg.max_digits, cfg.reverse_digits),
    };
    let prompt_rows = |prefix: &'static str, pairs: &[(u64, u64)]| -> Vec<PromptRow> {
        let row = |(i, &(a, b)): (usize, &(u64, u64))| PromptRow {
            id: format!("{prefix}-{i}"),
            prompt: prompt(cfg.kind, a, b, cfg.max_digits, cfg.reverse_digits),
        };
        pairs.iter().enumerate().map(row).collect()
    };
    write_jsonl(&files.train, train.iter().map(example))?;
    write_jsonl(&files.test, test.iter().map(example))?;
    write_jsonl(&files.prompts, prompt_rows("prompt", &prompts).into_iter())?;
    write_jsonl(&files.test_prompts, prompt_rows("test", &test).into_iter())?;
    if let Some(path) = &files.student_train {
        write_jsonl(path, train.iter().take(cfg.student_examples).map(example))?;
    }
    Ok(files)
}

fn write_jsonl<T: Serialize>(path: &Path, rows: impl Iterator<Item = T>) -> Result<(), TaskError> {
    let err = |source| TaskError::Write { path: path.to_path_buf(), source };
    let mut out = BufWriter::new(File::create(path).map_err(err)?);
    for row in rows {
        serde_json::to_writer(&mut out, &row).map_err(|e| err(e.into()))?;
        out.write_all(b"\n").map_err(err)?;
    }
    out.flush().map_err(err)
}

/// Whether a generated completion is the expected answer: exact match after trimming whitespace
/// (generation stops at EOS, so nothing but whitespace may surround the answer).
pub fn is_correct(expected: &str, generated: &str) -> bool {
    expected.trim() == generated.trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> TaskConfig {
        TaskConfig {
            max_digits: 2,
            train_examples: 300,
            test_examples: 50,
            prompts: 100,
            seed: 7,
            ..Default::default()
        }
    }

    fn pairs(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["prompt"].as_str().unwrap().to_string()
            })
            .collect()
    }

    #[test]
    fn answers_are_sums_reversed_or_plain() {
        assert_eq!(prompt(TaskKind::Addition, 57, 68, 3, true), "750+860=");
        assert_eq!(prompt(TaskKind::Addition, 57, 68, 3, false), "057+068=");
        assert_eq!(answer(TaskKind::Addition, 57, 68, 3, true), "5210");
        assert_eq!(prompt(TaskKind::Multiplication, 57, 68, 2, false), "57*68=");
        assert_eq!(answer(TaskKind::Multiplication, 57, 68, 2, false), "3876");
        assert_eq!(answer(TaskKind::Multiplication, 7, 8, 2, true), "6500");
        assert_eq!(answer(TaskKind::Addition, 57, 68, 3, false), "0125");
        assert_eq!(answer(TaskKind::Addition, 0, 0, 3, true), "0000");
        assert_eq!(answer(TaskKind::Addition, 999, 1, 3, true), "0001");
        assert_eq!(answer(TaskKind::Addition, 100, 20, 2, true), "021");
    }

    #[test]
    fn same_seed_same_files_other_seed_other_files() {
        let (d1, d2, d3) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let f1 = write_task_data(&small(), d1.path()).unwrap();
        let f2 = write_task_data(&small(), d2.path()).unwrap();
        let f3 = write_task_data(&TaskConfig { seed: 8, ..small() }, d3.path()).unwrap();
        for (a, b) in [
            (&f1.train, &f2.train),
            (&f1.test, &f2.test),
            (&f1.prompts, &f2.prompts),
            (&f1.test_prompts, &f2.test_prompts),
        ] {
            assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
        }
        assert_ne!(std::fs::read(&f1.train).unwrap(), std::fs::read(&f3.train).unwrap());
    }

    #[test]
    fn test_set_is_disjoint_from_train_and_prompts_and_matches_test_prompts() {
        let dir = tempfile::tempdir().unwrap();
        let f = write_task_data(&small(), dir.path()).unwrap();
        let (train, test, prompts, test_prompts) =
            (pairs(&f.train), pairs(&f.test), pairs(&f.prompts), pairs(&f.test_prompts));
        assert_eq!((train.len(), test.len(), prompts.len()), (300, 50, 100));
        let all: HashSet<_> = train.iter().chain(&test).chain(&prompts).collect();
        assert_eq!(all.len(), 450, "train, test and prompts must be pairwise disjoint");
        assert_eq!(test, test_prompts);
        let first: serde_json::Value =
            serde_json::from_str(std::fs::read_to_string(&f.test_prompts).unwrap().lines().next().unwrap()).unwrap();
        assert_eq!(first["id"], "test-0");
    }

    #[test]
    fn completions_are_correct_sums() {
        for reverse in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let f = write_task_data(&TaskConfig { reverse_digits: reverse, ..small() }, dir.path()).unwrap();
            let value = |digits: &str| -> u64 {
                let plain: String = if reverse { digits.chars().rev().collect() } else { digits.to_string() };
                plain.parse().unwrap()
            };
            for ex in crate::data::read_examples(&f.train).unwrap() {
                let (a, b) = ex.prompt.trim_end_matches('=').split_once('+').unwrap();
                assert_eq!(value(&ex.completion), value(a) + value(b), "{ex:?}");
                assert_eq!((a.len(), b.len(), ex.completion.len()), (2, 2, 3), "fixed width: {ex:?}");
            }
        }
    }

    #[test]
    fn test_set_does_not_depend_on_train_size() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let f1 = write_task_data(&small(), d1.path()).unwrap();
        let f2 = write_task_data(&TaskConfig { train_examples: 10, ..small() }, d2.path()).unwrap();
        assert_eq!(pairs(&f1.test), pairs(&f2.test));
    }

    #[test]
    fn too_many_problems_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = TaskConfig { max_digits: 1, train_examples: 90, test_examples: 10, prompts: 1, ..small() };
        let err = write_task_data(&cfg, dir.path()).unwrap_err().to_string();
        assert!(err.contains("101 problems requested") && err.contains("only 100"), "{err}");
        // Exactly all of them is fine.
        write_task_data(&TaskConfig { prompts: 0, ..cfg }, dir.path()).unwrap();
    }

    #[test]
    fn is_correct_trims_but_is_otherwise_exact() {
        assert!(is_correct("521", "521"));
        assert!(is_correct("521", " 521\n"));
        assert!(!is_correct("521", "52"));
        assert!(!is_correct("521", "5210"));
        assert!(!is_correct("521", "125"));
    }

    #[test]
    fn student_examples_are_the_first_train_problems() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_task_data(&TaskConfig { student_examples: 20, ..small() }, dir.path()).unwrap();
        let student = std::fs::read_to_string(files.student_train.unwrap()).unwrap();
        let train = std::fs::read_to_string(&files.train).unwrap();
        assert_eq!(student.lines().count(), 20);
        assert!(train.starts_with(&student));
        let err = write_task_data(&TaskConfig { student_examples: 301, ..small() }, dir.path()).unwrap_err();
        assert!(err.to_string().contains("`student_examples` (301) is more than `train_examples` (300)"), "{err}");
        let none = write_task_data(&small(), dir.path()).unwrap();
        assert!(none.student_train.is_none());
    }
}
