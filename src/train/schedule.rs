//! Learning-rate schedule.

use super::TrainConfig;

/// Learning rate for optimizer step `step` (0-based):
/// 1. linear warm-up from `lr / warmup_steps` to `lr` over the first `warmup_steps` steps;
/// 2. cosine decay from `lr` to `lr * min_lr_ratio` over the remaining steps;
/// 3. `lr * min_lr_ratio` past the last step (resumed or extended runs).
pub fn lr_at(step: usize, cfg: &TrainConfig) -> f64 {
    let (peak, floor) = (cfg.lr, cfg.lr * cfg.min_lr_ratio);
    if step < cfg.warmup_steps {
        return peak * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    let decay_steps = cfg.steps.saturating_sub(cfg.warmup_steps).max(1);
    let progress = (step - cfg.warmup_steps) as f64 / decay_steps as f64;
    if progress >= 1.0 {
        return floor;
    }
    floor + 0.5 * (peak - floor) * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_floor() {
        let cfg = TrainConfig { steps: 110, warmup_steps: 10, lr: 1.0, min_lr_ratio: 0.1, ..Default::default() };
        assert!((lr_at(0, &cfg) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, &cfg) - 1.0).abs() < 1e-12);
        assert!((lr_at(10, &cfg) - 1.0).abs() < 1e-12);
        assert!((lr_at(60, &cfg) - 0.55).abs() < 1e-12, "halfway is the midpoint");
        assert!((lr_at(110, &cfg) - 0.1).abs() < 1e-12);
        assert!((lr_at(500, &cfg) - 0.1).abs() < 1e-12);
        assert!((1..110).all(|s| s <= 10 || lr_at(s, &cfg) <= lr_at(s - 1, &cfg)));
    }
}
