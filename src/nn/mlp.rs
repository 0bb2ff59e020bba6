//! Transformer feed-forward blocks: SwiGLU (Llama) and GELU (GPT-2, BERT).

use super::linear::{FakeQuant, Linear};
use super::params::{Init, ParamStore};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Which feed-forward block a transformer layer uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MlpKind {
    /// down(silu(gate(x)) ⊙ up(x)), no biases.
    SwiGlu,
    /// fc2(gelu(fc1(x))) with biases (erf GELU).
    Gelu,
}

/// Sizes and initialisation of a feed-forward block.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MlpConfig {
    pub kind: MlpKind,
    pub hidden: usize,
    pub ffn_hidden: usize,
    /// Initialiser of the input projections.
    pub init: Init,
    /// Initialiser of the output projection, which writes into the residual stream (GPT-2 scales it down
    /// with depth).
    pub out_init: Init,
}

/// SwiGLU feed-forward (Shazeer, 2020). Parameters: `gate_proj`, `up_proj` [ffn, hidden] and `down_proj`
/// [hidden, ffn], named as in Hugging Face Llama checkpoints.
#[derive(Clone, Debug)]
pub struct SwiGluMlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl SwiGluMlp {
    pub fn new(params: &ParamStore, cfg: &MlpConfig) -> Result<Self> {
        let (h, f) = (cfg.hidden, cfg.ffn_hidden);
        Ok(SwiGluMlp {
            gate: Linear::with_init(&params.pp("gate_proj"), h, f, false, cfg.init, Init::Zeros)?,
            up: Linear::with_init(&params.pp("up_proj"), h, f, false, cfg.init, Init::Zeros)?,
            down: Linear::with_init(
                &params.pp("down_proj"),
                f,
                h,
                false,
                cfg.out_init,
                Init::Zeros,
            )?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [gate, up]: [Tensor; 2] = Linear::forward_many(&[&self.gate, &self.up], x)?
            .try_into()
            .map_err(|_| Error::Msg("SwiGluMlp: two projections give two outputs".into()))?;
        self.down.forward(&gate.silu()?.mul(&up)?)
    }

    /// Fake quantization of the three projections (quantization-aware training).
    pub fn set_fake_quant(&mut self, fake: FakeQuant) -> Result<()> {
        for l in [&mut self.gate, &mut self.up, &mut self.down] {
            l.set_fake_quant(fake)?;
        }
        Ok(())
    }
}

/// GELU feed-forward. Parameters: `fc1` [ffn, hidden] and `fc2` [hidden, ffn], both with biases.
#[derive(Clone, Debug)]
pub struct GeluMlp {
    fc1: Linear,
    fc2: Linear,
}

impl GeluMlp {
    pub fn new(params: &ParamStore, cfg: &MlpConfig) -> Result<Self> {
        let (h, f) = (cfg.hidden, cfg.ffn_hidden);
        Ok(GeluMlp {
            fc1: Linear::with_init(&params.pp("fc1"), h, f, true, cfg.init, Init::Zeros)?,
            fc2: Linear::with_init(&params.pp("fc2"), f, h, true, cfg.out_init, Init::Zeros)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.gelu()?)
    }

    /// Fake quantization of both projections (quantization-aware training).
    pub fn set_fake_quant(&mut self, fake: FakeQuant) -> Result<()> {
        self.fc1.set_fake_quant(fake)?;
        self.fc2.set_fake_quant(fake)
    }
}

/// A SwiGLU or GELU block, chosen by configuration.
#[derive(Clone, Debug)]
pub enum Mlp {
    SwiGlu(SwiGluMlp),
    Gelu(GeluMlp),
}

impl Mlp {
    pub fn new(params: &ParamStore, cfg: &MlpConfig) -> Result<Self> {
        Ok(match cfg.kind {
            MlpKind::SwiGlu => Mlp::SwiGlu(SwiGluMlp::new(params, cfg)?),
            MlpKind::Gelu => Mlp::Gelu(GeluMlp::new(params, cfg)?),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Mlp::SwiGlu(m) => m.forward(x),
            Mlp::Gelu(m) => m.forward(x),
        }
    }

    /// Fake quantization of every projection (quantization-aware training).
    pub fn set_fake_quant(&mut self, fake: FakeQuant) -> Result<()> {
        match self {
            Mlp::SwiGlu(m) => m.set_fake_quant(fake),
            Mlp::Gelu(m) => m.set_fake_quant(fake),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, Device, Rng};

    fn cfg(kind: MlpKind) -> MlpConfig {
        MlpConfig {
            kind,
            hidden: 4,
            ffn_hidden: 6,
            init: Init::Normal(0.5),
            out_init: Init::Normal(0.5),
        }
    }

    /// `x [rows, i] · w[o, i]ᵀ + b` in f64.
    fn lin(x: &[f64], w: &[f32], b: Option<&[f32]>, i: usize) -> Vec<f64> {
        let o = w.len() / i;
        x.chunks(i)
            .flat_map(|r| {
                (0..o).map(move |j| {
                    let dot: f64 = (0..i).map(|k| r[k] * w[j * i + k] as f64).sum();
                    dot + b.map_or(0.0, |b| b[j] as f64)
                })
            })
            .collect()
    }

    /// erf by its Maclaurin series, exact to ~1e-12 for the |x| < 3 these tests produce.
    fn erf(x: f64) -> f64 {
        let (mut term, mut sum) = (x, x);
        for n in 1..80 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    fn assert_close(got: &Tensor, want: &[f64]) {
        for (g, w) in got.to_vec_f32().iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-4, "{g} vs {w}");
        }
    }

    fn get(ps: &ParamStore, name: &str) -> Vec<f32> {
        ps.get(name).unwrap().to_vec_f32()
    }

    #[test]
    fn swiglu_matches_reference() -> Result<()> {
        let ps = ParamStore::new(5, DType::F32, Device::Cpu);
        let mlp = Mlp::new(&ps.pp("mlp"), &cfg(MlpKind::SwiGlu))?;
        let names: Vec<String> = ps.all().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "mlp.down_proj.weight",
                "mlp.gate_proj.weight",
                "mlp.up_proj.weight"
            ]
        );
        let x = Tensor::randn((2, 3, 4), 0.0, 1.0, &mut Rng::new(6), Device::Cpu)?;
        let xv: Vec<f64> = x.to_vec_f32().iter().map(|&v| v as f64).collect();
        let g = lin(&xv, &get(&ps, "mlp.gate_proj.weight"), None, 4);
        let u = lin(&xv, &get(&ps, "mlp.up_proj.weight"), None, 4);
        let h: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        let want = lin(&h, &get(&ps, "mlp.down_proj.weight"), None, 6);
        let y = mlp.forward(&x)?;
        assert_eq!(y.dims(), [2, 3, 4]);
        assert_close(&y, &want);
        Ok(())
    }

    #[test]
    fn gelu_matches_reference() -> Result<()> {
        let ps = ParamStore::new(7, DType::F32, Device::Cpu);
        let mlp = Mlp::new(&ps, &cfg(MlpKind::Gelu))?;
        for b in ["fc1.bias", "fc2.bias"] {
            let t = ps.get(b).unwrap();
            t.set(&Tensor::randn(
                t.dims(),
                0.0,
                1.0,
                &mut Rng::new(8),
                Device::Cpu,
            )?)?;
        }
        let x = Tensor::randn((5, 4), 0.0, 1.0, &mut Rng::new(9), Device::Cpu)?;
        let xv: Vec<f64> = x.to_vec_f32().iter().map(|&v| v as f64).collect();
        let a = lin(&xv, &get(&ps, "fc1.weight"), Some(&get(&ps, "fc1.bias")), 4);
        let h: Vec<f64> = a
            .iter()
            .map(|&a| 0.5 * a * (1.0 + erf(a / std::f64::consts::SQRT_2)))
            .collect();
        let want = lin(&h, &get(&ps, "fc2.weight"), Some(&get(&ps, "fc2.bias")), 6);
        assert_close(&mlp.forward(&x)?, &want);
        Ok(())
    }
}
