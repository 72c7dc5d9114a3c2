//! AdamW updating weights and moments in place.

use super::*;
use candle_core::Var;

// ---------------------------------------------------------------- AdamW, in place

/// The numbers of one AdamW update: the gradient is multiplied by `grad_scale` first; `bias`
/// holds 1 − β₁ᵗ and 1 − β₂ᵗ; `decay` is the factor theta is multiplied by first
/// (1 − lr·weight_decay, or 1).
#[derive(Debug, Clone, Copy)]
pub struct AdamwStep {
    pub grad_scale: f64,
    pub betas: (f64, f64),
    pub bias: (f64, f64),
    pub lr: f64,
    pub eps: f64,
    pub decay: f64,
}

/// One AdamW update of `theta` in place, with its moments `m` and `v` updated in place from
/// gradient `g`.
pub fn adamw_step(theta: &Var, m: &Var, v: &Var, g: &Tensor, a: &AdamwStep) -> Result<()> {
    if !fused(theta) {
        return generic::adamw_step(theta, m, v, g, a);
    }
    let g = f32_contiguous(g)?;
    if g.shape() != theta.shape() {
        bail!("adamw: gradient {:?} for a parameter of {:?}", g.shape(), theta.shape());
    }
    let s = a.grad_scale as f32;
    m.inplace_op2(&g, &Moment { beta: a.betas.0 as f32, scale: s, squared: false })?;
    v.inplace_op2(&g, &Moment { beta: a.betas.1 as f32, scale: s, squared: true })?;
    let update = AdamUpdate {
        lr: a.lr as f32,
        eps: a.eps as f32,
        bias1: a.bias.0 as f32,
        bias2: a.bias.1 as f32,
        decay: a.decay as f32,
    };
    theta.inplace_op3(m.as_tensor(), v.as_tensor(), &update)
}

/// m ← β·m + (1 − β)·(s·g), or with (s·g)² when `squared`.
struct Moment {
    beta: f32,
    scale: f32,
    squared: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "kdllm-adam-moment"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let (m, g) = (f32s_mut(s1, l1, self.name())?, f32s(s2, l2, self.name())?);
        let (b, s, sq) = (self.beta, self.scale, self.squared);
        m.par_chunks_mut(1 << 16).zip(g.par_chunks(1 << 16)).for_each(|(m, g)| {
            for (m, &g) in m.iter_mut().zip(g) {
                let g = s * g;
                *m = b * *m + (1.0 - b) * if sq { g * g } else { g };
            }
        });
        Ok(())
    }
}

/// θ ← decay·θ − lr·(m / bias1) / (sqrt(v / bias2) + eps)
struct AdamUpdate {
    lr: f32,
    eps: f32,
    bias1: f32,
    bias2: f32,
    decay: f32,
}

impl InplaceOp3 for AdamUpdate {
    fn name(&self) -> &'static str {
        "kdllm-adam-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let theta = f32s_mut(s1, l1, self.name())?;
        let (m, v) = (f32s(s2, l2, self.name())?, f32s(s3, l3, self.name())?);
        let c = 1 << 16;
        theta.par_chunks_mut(c).zip(m.par_chunks(c)).zip(v.par_chunks(c)).for_each(|((th, m), v)| {
            for ((th, &m), &v) in th.iter_mut().zip(m).zip(v) {
                *th = self.decay * *th - self.lr * (m / self.bias1) / ((v / self.bias2).sqrt() + self.eps);
            }
        });
        Ok(())
    }
}
