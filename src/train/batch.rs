//! Training sequences and the tensors of a batch.
//!
//! A sequence is prompt + completion token ids. Position p of the model's input predicts
//! token p + 1; only predictions of completion tokens count, so a batch carries the flat
//! indices of those positions and the losses see just them (prompts and padding never enter).

use candle_core::{Device, Result, Tensor};

/// The teacher's stored top-k at each completion position (T = 1 log-probs).
#[derive(Debug, Clone, PartialEq)]
pub struct TeacherTopK {
    pub ids: Vec<Vec<u32>>,
    pub logprobs: Vec<Vec<f32>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    /// Index in `ids` of the first token whose prediction counts (the first completion token).
    pub loss_from: usize,
    /// One row per counted token (`ids[loss_from..]`), when the data came from a teacher.
    pub teacher: Option<TeacherTopK>,
}

impl Sequence {
    /// Prompt + completion of a teacher sample; `with_teacher` keeps its top-k rows (files
    /// written with `--logprobs 0` have none).
    pub fn from_sample(s: crate::data::Sample, with_teacher: bool) -> Self {
        let loss_from = s.prompt_token_ids.len();
        let mut ids = s.prompt_token_ids;
        ids.extend(s.completion_token_ids);
        let teacher = with_teacher.then_some(TeacherTopK { ids: s.topk_token_ids, logprobs: s.topk_logprobs });
        Self { ids, loss_from, teacher }
    }

    /// Keeps at most `max_len` tokens; counted tokens cut off are dropped with their top-k rows.
    pub fn truncate(mut self, max_len: usize) -> Self {
        if self.ids.len() > max_len {
            self.ids.truncate(max_len);
            if let Some(t) = self.teacher.as_mut() {
                let keep = max_len.saturating_sub(self.loss_from);
                t.ids.truncate(keep);
                t.logprobs.truncate(keep);
            }
        }
        self
    }

    /// Number of predictions that count.
    pub fn counted(&self) -> usize {
        self.ids.len().saturating_sub(self.loss_from.max(1))
    }
}

/// Tensors for one forward pass and its loss.
pub struct Batch {
    /// (B, L) input ids, right-padded with 0.
    pub inputs: Tensor,
    /// (N) flat indices into the (B·L) positions whose predictions count.
    pub positions: Tensor,
    /// (N) the token each counted position must predict.
    pub targets: Tensor,
    /// (N, K) teacher top-k ids and log-probs, when every sequence has them. Rows shorter than
    /// the longest (a teacher mixture) are padded with id 0 at log-prob −∞: no bucket.
    pub teacher: Option<(Tensor, Tensor)>,
    /// Tokens in `inputs` that are not padding.
    pub tokens: usize,
}

impl Batch {
    pub fn new(seqs: &[&Sequence], device: &Device) -> Result<Self> {
        let width = seqs.iter().map(|s| s.ids.len().saturating_sub(1)).max().unwrap_or(0).max(1);
        let mut inputs = vec![0u32; seqs.len() * width];
        let (mut positions, mut targets) = (Vec::new(), Vec::new());
        let with_teacher = !seqs.is_empty() && seqs.iter().all(|s| s.teacher.is_some());
        let (mut t_ids, mut t_lp) = (Vec::new(), Vec::new());
        let k = if with_teacher {
            seqs.iter().flat_map(|s| s.teacher.iter().flat_map(|t| t.ids.iter().map(Vec::len))).max().unwrap_or(0)
        } else {
            0
        };
        let mut tokens = 0;
        for (b, s) in seqs.iter().enumerate() {
            let n_in = s.ids.len().saturating_sub(1);
            inputs[b * width..b * width + n_in].copy_from_slice(&s.ids[..n_in]);
            tokens += n_in;
            let first = s.loss_from.max(1);
            for (j, tok) in (first..s.ids.len()).enumerate() {
                positions.push((b * width + tok - 1) as u32);
                targets.push(s.ids[tok]);
                if with_teacher {
                    let t = s.teacher.as_ref().expect("checked above");
                    let row = j + first - s.loss_from;
                    t_ids.extend_from_slice(&t.ids[row]);
                    t_lp.extend_from_slice(&t.logprobs[row]);
                    let pad = k - t.ids[row].len();
                    t_ids.extend(std::iter::repeat_n(0, pad));
                    t_lp.extend(std::iter::repeat_n(f32::NEG_INFINITY, pad));
                }
            }
        }
        let n = positions.len();
        let teacher = if with_teacher {
            Some((Tensor::from_vec(t_ids, (n, k), device)?, Tensor::from_vec(t_lp, (n, k), device)?))
        } else {
            None
        };
        Ok(Self {
            inputs: Tensor::from_vec(inputs, (seqs.len(), width), device)?,
            positions: Tensor::from_vec(positions, n, device)?,
            targets: Tensor::from_vec(targets, n, device)?,
            teacher,
            tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_positions_skip_prompt_and_padding() {
        let a = Sequence { ids: vec![1, 5, 6, 7], loss_from: 2, teacher: None };
        let b = Sequence { ids: vec![1, 8, 9], loss_from: 1, teacher: None };
        let batch = Batch::new(&[&a, &b], &Device::Cpu).unwrap();
        assert_eq!(batch.inputs.to_vec2::<u32>().unwrap(), vec![vec![1, 5, 6], vec![1, 8, 0]]);
        // a: positions 1,2 predict 6,7; b: positions 0,1 predict 8,9 (row offset 3).
        assert_eq!(batch.positions.to_vec1::<u32>().unwrap(), vec![1, 2, 3, 4]);
        assert_eq!(batch.targets.to_vec1::<u32>().unwrap(), vec![6, 7, 8, 9]);
        assert_eq!(batch.tokens, 5);
    }

    #[test]
    fn teacher_rows_follow_their_tokens_through_truncation() {
        let s = Sequence {
            ids: vec![1, 4, 10, 11, 12],
            loss_from: 2,
            teacher: Some(TeacherTopK {
                ids: vec![vec![10, 3], vec![11, 3], vec![12, 3]],
                logprobs: vec![vec![-0.1, -3.0], vec![-0.2, -3.0], vec![-0.3, -3.0]],
            }),
        }
        .truncate(4);
        assert_eq!(s.counted(), 2);
        let batch = Batch::new(&[&s], &Device::Cpu).unwrap();
        let (ids, lp) = batch.teacher.unwrap();
        assert_eq!(ids.to_vec2::<u32>().unwrap(), vec![vec![10, 3], vec![11, 3]]);
        assert_eq!(lp.dims(), &[2, 2]);
        assert_eq!(batch.targets.to_vec1::<u32>().unwrap(), vec![10, 11]);
    }

    #[test]
    fn ragged_teacher_rows_are_padded_with_no_bucket() {
        let s = Sequence {
            ids: vec![1, 4, 10, 11],
            loss_from: 2,
            teacher: Some(TeacherTopK {
                ids: vec![vec![10, 3, 5], vec![11]],
                logprobs: vec![vec![-0.1, -3.0, -4.0], vec![-0.2]],
            }),
        };
        let (ids, lp) = Batch::new(&[&s], &Device::Cpu).unwrap().teacher.unwrap();
        assert_eq!(ids.to_vec2::<u32>().unwrap(), vec![vec![10, 3, 5], vec![11, 0, 0]]);
        let lp = lp.to_vec2::<f32>().unwrap();
        assert_eq!(lp[1][0], -0.2);
        assert!(lp[1][1] == f32::NEG_INFINITY && lp[1][2] == f32::NEG_INFINITY);
    }
}
