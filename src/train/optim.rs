//! AdamW (Loshchilov & Hutter 2019) with decoupled weight decay on matrices only,
//! plus global gradient-norm clipping. candle-nn's AdamW has no parameter groups and
//! silently skips parameters without a gradient; this one refuses them.

use std::collections::HashMap;

use candle_core::{Result, Tensor, Var};

use super::TrainConfig;
use crate::model::ops::{adamw_step, AdamwStep};

struct Param {
    name: String,
    var: Var,
    m: Var,
    v: Var,
    decay: bool,
}

pub struct AdamW {
    params: Vec<Param>,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    step: usize,
}

impl AdamW {
    /// `vars` as (name, var); norms (1-D) and token embeddings get no weight decay.
    pub fn new(mut vars: Vec<(String, Var)>, cfg: &TrainConfig) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let decay = var.rank() >= 2 && !name.contains("embed_tokens");
                let zeros = || Var::from_tensor(&var.zeros_like()?);
                Ok(Param { m: zeros()?, v: zeros()?, decay, name, var })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { params, beta1: cfg.beta1, beta2: cfg.beta2, eps: cfg.eps, weight_decay: cfg.weight_decay, step: 0 })
    }

    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.var))
    }

    /// AdamW steps taken (the bias correction's t).
    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// The moments, as `m.<param>` and `v.<param>` (sharing storage: save them before the next step).
    pub fn moments(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for p in &self.params {
            out.insert(format!("m.{}", p.name), p.m.as_tensor().clone());
            out.insert(format!("v.{}", p.name), p.v.as_tensor().clone());
        }
        out
    }

    /// Continues from saved moments and step count (what [`moments`](Self::moments) returned).
    pub fn restore(&mut self, moments: &HashMap<String, Tensor>, steps_done: usize) -> Result<()> {
        for p in &mut self.params {
            for (key, slot) in [(format!("m.{}", p.name), &mut p.m), (format!("v.{}", p.name), &mut p.v)] {
                let t = moments
                    .get(&key)
                    .ok_or_else(|| candle_core::Error::Msg(format!("no `{key}` in the optimizer state")))?;
                if t.shape() != slot.shape() {
                    candle_core::bail!(
                        "`{key}` has shape {:?} in the optimizer state, the model wants {:?}",
                        t.shape(),
                        slot.shape()
                    );
                }
                // A copy of its own, on the model's device: the in-place update must not write into
                // the loaded buffer's sharers.
                *slot = Var::from_tensor(&t.to_device(p.var.device())?.copy()?)?;
            }
        }
        self.step = steps_done;
        Ok(())
    }

    /// One update from `grads` (aligned with `vars()`), each multiplied by `grad_scale` first.
    pub fn step(&mut self, grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2 = 1.0 - b2.powi(self.step as i32);
        for (p, g) in self.params.iter_mut().zip(grads) {
            let decay = if p.decay { 1.0 - lr * self.weight_decay } else { 1.0 };
            // In place: weights and moments are updated where they lie, in one fused pass each.
            let step = AdamwStep { grad_scale, betas: (b1, b2), bias: (bc1, bc2), lr, eps: self.eps, decay };
            adamw_step(&p.var, &p.m, &p.v, g, &step)?;
        }
        Ok(())
    }
}

/// Global L2 norm of all gradients.
pub fn grad_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads {
        sq += g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    }
    Ok(sq.sqrt())
}

/// The factor that brings the global norm down to `max_norm` (1 when under it or disabled).
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
        // With bias correction, step 1 of Adam is lr * g / (|g| + eps) = ±lr.
        let w = Var::from_vec(vec![1.0f32, -2.0], (1, 2), &Device::Cpu).unwrap();
        let norm = Var::from_vec(vec![1.0f32, 1.0], 2, &Device::Cpu).unwrap();
        let cfg = TrainConfig { weight_decay: 0.5, eps: 0.0, ..Default::default() };
        let mut opt =
            AdamW::new(vec![("w".into(), w.clone()), ("model.norm.weight".into(), norm.clone())], &cfg).unwrap();
        let grads = [
            Tensor::new(&[0.5f32, 2.0], &Device::Cpu).unwrap(), // model.norm.weight (sorted first)
            Tensor::new(&[[3.0f32, -0.1]], &Device::Cpu).unwrap(),
        ];
        opt.step(&grads, 0.1, 1.0).unwrap();
        let w = w.as_tensor().to_vec2::<f32>().unwrap();
        // decayed: 1 * (1 - 0.1*0.5) - 0.1 = 0.85 ; -2 * 0.95 + 0.1 = -1.8
        assert!((w[0][0] - 0.85).abs() < 1e-6 && (w[0][1] + 1.8).abs() < 1e-6, "{w:?}");
        let n = norm.as_tensor().to_vec1::<f32>().unwrap();
        assert!((n[0] - 0.9).abs() < 1e-6 && (n[1] - 0.9).abs() < 1e-6, "norms get no decay: {n:?}");
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let g = [Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap()];
        let n = grad_norm(&g).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        assert!((clip_scale(n, 1.0) * n - 1.0).abs() < 1e-5);
        assert_eq!(clip_scale(n, 10.0), 1.0);
        assert_eq!(clip_scale(n, 0.0), 1.0);
    }
}
