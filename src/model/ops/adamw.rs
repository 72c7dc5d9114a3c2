//! AdamW updating weights and moments in place.

use super::*;
use candle_core::Var;

// ---------------------------------------------------------------- AdamW, in place

/// One AdamW update of `theta` in place, with its moments `m` and `v` updated in place from
/// gradient `g` (each multiplied by `grad_scale` first). `bias1`/`bias2` are 1 − βᵗ; `decay` the
/// factor theta is multiplied by first (1 − lr·weight_decay, or 1).
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    theta: &Var,
    m: &Var,
    v: &Var,
    g: &Tensor,
    grad_scale: f64,
    (beta1, beta2): (f64, f64),
    (bias1, bias2): (f64, f64),
    lr: f64,
    eps: f64,
    decay: f64,
) -> Result<()> {
    if !fused(theta) {
        return generic::adamw_step(theta, m, v, g, grad_scale, (beta1, beta2), (bias1, bias2), lr, eps, decay);
    }
    let g = f32_contiguous(g)?;
    if g.shape() != theta.shape() {
        bail!("adamw: gradient {:?} for a parameter of {:?}", g.shape(), theta.shape());
    }
    let s = grad_scale as f32;
    m.inplace_op2(&g, &Moment { beta: beta1 as f32, scale: s, squared: false })?;
    v.inplace_op2(&g, &Moment { beta: beta2 as f32, scale: s, squared: true })?;
    theta.inplace_op3(
        m.as_tensor(),
        v.as_tensor(),
        &AdamUpdate { lr: lr as f32, eps: eps as f32, bias1: bias1 as f32, bias2: bias2 as f32, decay: decay as f32 },
    )
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
