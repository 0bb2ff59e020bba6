//! Learning-rate schedules.

/// The learning rate as a function of the step (0-based).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LrSchedule {
    Constant(f32),
    /// Linear warmup from 0 to `peak` over `warmup` steps, then cosine decay to `min` at `total`.
    WarmupCosine {
        warmup: u64,
        total: u64,
        peak: f32,
        min: f32,
    },
    /// Linear warmup, then linear decay to `min` at `total`.
    WarmupLinear {
        warmup: u64,
        total: u64,
        peak: f32,
        min: f32,
    },
}

impl LrSchedule {
    pub fn lr_at(&self, step: u64) -> f32 {
        match *self {
            LrSchedule::Constant(lr) => lr,
            LrSchedule::WarmupCosine {
                warmup,
                total,
                peak,
                min,
            }
            | LrSchedule::WarmupLinear {
                warmup,
                total,
                peak,
                min,
            } => {
                if step < warmup {
                    return peak * (step + 1) as f32 / warmup as f32;
                }
                let span = total.saturating_sub(warmup).max(1);
                let progress = ((step - warmup) as f32 / span as f32).min(1.0);
                let shape = if matches!(self, LrSchedule::WarmupCosine { .. }) {
                    0.5 * (1.0 + (std::f32::consts::PI * progress).cos())
                } else {
                    1.0 - progress
                };
                min + (peak - min) * shape
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LrSchedule;

    #[test]
    fn warmup_then_cosine() {
        let s = LrSchedule::WarmupCosine {
            warmup: 10,
            total: 110,
            peak: 1.0,
            min: 0.1,
        };
        assert!((s.lr_at(0) - 0.1).abs() < 1e-6);
        assert!((s.lr_at(9) - 1.0).abs() < 1e-6);
        assert!((s.lr_at(10) - 1.0).abs() < 1e-6);
        assert!((s.lr_at(60) - 0.55).abs() < 1e-6);
        assert!((s.lr_at(110) - 0.1).abs() < 1e-6);
        assert!((s.lr_at(500) - 0.1).abs() < 1e-6);
    }

    #[test]
    fn warmup_then_linear() {
        let s = LrSchedule::WarmupLinear {
            warmup: 0,
            total: 100,
            peak: 2.0,
            min: 0.0,
        };
        assert!((s.lr_at(0) - 2.0).abs() < 1e-6);
        assert!((s.lr_at(50) - 1.0).abs() < 1e-6);
        assert!(s.lr_at(100).abs() < 1e-6);
    }
}
