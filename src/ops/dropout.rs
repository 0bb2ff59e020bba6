//! Inverted dropout: zero each element with probability p and scale the rest by 1/(1 − p), so evaluation
//! needs no rescaling.

use crate::error::Result;
use crate::rng::Rng;
use crate::tensor::Tensor;

impl Tensor {
    /// Training-mode dropout drawing its mask from `rng` (same seed, same mask).
    pub fn dropout(&self, p: f32, rng: &mut Rng) -> Result<Tensor> {
        if !(0.0..=1.0).contains(&p) {
            crate::bail!("dropout", "p must be in [0, 1], got {p}");
        }
        if p == 0.0 {
            return Ok(self.clone());
        }
        if p == 1.0 {
            return self.zeros_like();
        }
        let scale = 1.0 / (1.0 - p);
        let mask: Vec<f32> = (0..self.elem_count())
            .map(|_| if rng.uniform_f32() < p { 0.0 } else { scale })
            .collect();
        let mask = Tensor::from_vec(mask, self.shape(), self.device())?.to_dtype(self.dtype())?;
        self.mul(&mask)
    }
}
