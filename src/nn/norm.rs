//! Normalisation layers over the last dim, wrapping the fused `layer_norm` / `rms_norm` ops.

use super::params::{Init, ParamStore};
use crate::error::Result;
use crate::tensor::Tensor;

/// LayerNorm with a learned scale (`weight`, init 1) and optionally a shift (`bias`, init 0).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f32,
}

impl LayerNorm {
    pub fn new(params: &ParamStore, dim: usize, eps: f32, bias: bool) -> Result<Self> {
        let weight = params.get_or_init("weight", dim, Init::Ones)?;
        let bias = if bias {
            Some(params.get_or_init("bias", dim, Init::Zeros)?)
        } else {
            None
        };
        Ok(LayerNorm { weight, bias, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.layer_norm(Some(&self.weight), self.bias.as_ref(), self.eps)
    }
}

/// RMSNorm (Zhang & Sennrich) with a learned scale (`weight`, init 1).
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn new(params: &ParamStore, dim: usize, eps: f32) -> Result<Self> {
        Ok(RmsNorm {
            weight: params.get_or_init("weight", dim, Init::Ones)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.rms_norm(Some(&self.weight), self.eps)
    }
}

/// Which normalisation a block uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// LayerNorm with weight and bias (GPT-2, BERT).
    LayerNorm,
    /// RMSNorm (Llama).
    RmsNorm,
}

/// A LayerNorm or an RmsNorm, chosen by configuration.
#[derive(Clone, Debug)]
pub enum Norm {
    Layer(LayerNorm),
    Rms(RmsNorm),
}

impl Norm {
    pub fn new(params: &ParamStore, kind: NormKind, dim: usize, eps: f32) -> Result<Self> {
        Ok(match kind {
            NormKind::LayerNorm => Norm::Layer(LayerNorm::new(params, dim, eps, true)?),
            NormKind::RmsNorm => Norm::Rms(RmsNorm::new(params, dim, eps)?),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Layer(n) => n.forward(x),
            Norm::Rms(n) => n.forward(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, Device, Rng};

    fn check_rows(got: &[f32], x: &[f32], d: usize, f: impl Fn(&[f64]) -> Vec<f64>) {
        for (row, out) in x.chunks(d).zip(got.chunks(d)) {
            let row: Vec<f64> = row.iter().map(|&v| v as f64).collect();
            for (g, w) in out.iter().zip(f(&row)) {
                assert!((*g as f64 - w).abs() < 1e-4, "{g} vs {w}");
            }
        }
    }

    #[test]
    fn layer_norm_matches_reference() -> Result<()> {
        let ps = ParamStore::new(0, DType::F32, Device::Cpu);
        let ln = LayerNorm::new(&ps.pp("ln"), 6, 1e-5, true)?;
        ps.get("ln.weight").unwrap().set(&Tensor::from_vec(
            vec![1f32, 2., 0.5, -1., 1., 3.],
            6,
            Device::Cpu,
        )?)?;
        ps.get("ln.bias")
            .unwrap()
            .set(&Tensor::full(0.25, 6, DType::F32, Device::Cpu)?)?;
        let x = Tensor::randn((3, 6), 1.0, 2.0, &mut Rng::new(3), Device::Cpu)?;
        let w = [1f64, 2., 0.5, -1., 1., 3.];
        check_rows(&ln.forward(&x)?.to_vec_f32(), &x.to_vec_f32(), 6, |r| {
            let mean = r.iter().sum::<f64>() / 6.0;
            let var = r.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 6.0;
            r.iter()
                .zip(w)
                .map(|(v, w)| (v - mean) / (var + 1e-5).sqrt() * w + 0.25)
                .collect()
        });
        Ok(())
    }

    #[test]
    fn rms_norm_matches_reference() -> Result<()> {
        let ps = ParamStore::new(0, DType::F32, Device::Cpu);
        let norm = Norm::new(&ps, NormKind::RmsNorm, 4, 1e-6)?;
        let x = Tensor::randn((2, 3, 4), 0.0, 1.0, &mut Rng::new(4), Device::Cpu)?;
        check_rows(&norm.forward(&x)?.to_vec_f32(), &x.to_vec_f32(), 4, |r| {
            let ms = r.iter().map(|v| v * v).sum::<f64>() / 4.0;
            r.iter().map(|v| v / (ms + 1e-6).sqrt()).collect()
        });
        assert_eq!(ps.all().len(), 1);
        Ok(())
    }
}
