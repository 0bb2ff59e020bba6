//! Fully connected layer: y = x·Wᵀ + b with W stored [out, in] as PyTorch does, so checkpoints from other
//! frameworks load without transposing. The weight is either a dense parameter or a frozen packed
//! [`QTensor`] (see [`ParamStore::insert_packed`]), which runs the packed low-bit kernels. A dense layer
//! can also train with quantization in the loop ([`FakeQuant`], LLM-QAT's recipe).

use std::sync::Arc;

use super::params::{Init, PackedParam, ParamStore};
use crate::cpu::qmatmul::ActMode;
use crate::error::{Error, Result};
use crate::quant::quantizers::{Granularity, Quantizer};
use crate::quant::QTensor;
use crate::tensor::{grad_enabled, Tensor};

#[derive(Clone, Debug)]
enum Weight {
    Dense(Tensor),
    Packed(PackedParam),
}

/// `p` in `x`'s float dtype: mixed precision keeps f32 master weights and computes in the activations'
/// dtype (bf16), the cast being part of the graph so gradients reach the f32 weights.
pub(crate) fn cast_like(p: &Tensor, x: &Tensor) -> Result<Tensor> {
    if p.dtype() == x.dtype() || !x.dtype().is_float() {
        Ok(p.clone())
    } else {
        p.to_dtype(x.dtype())
    }
}

/// Quantization-aware training of a dense layer: its forward computes q_in(x)·q_w(W)ᵀ + b, the weight
/// quantized per output channel and the input per token (per row of its last dim), and the quantizers'
/// straight-through gradients reach W and x. The default quantizes nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FakeQuant {
    pub weight: Option<Quantizer>,
    pub input: Option<Quantizer>,
}

impl FakeQuant {
    /// LLM-QAT's W`w_bits`-A`a_bits`: symmetric int-N weights per channel and activations per token
    /// (papers.md §2). `None`, or 16 bits and more, keeps that side in full precision.
    pub fn llm_qat(w_bits: Option<u32>, a_bits: Option<u32>) -> Self {
        FakeQuant {
            weight: llm_qat_quantizer(w_bits),
            input: llm_qat_quantizer(a_bits),
        }
    }

    pub fn is_none(&self) -> bool {
        self.weight.is_none() && self.input.is_none()
    }
}

/// LLM-QAT's symmetric quantizer at `bits`, or none for full precision (no bits, or 16 and more).
pub fn llm_qat_quantizer(bits: Option<u32>) -> Option<Quantizer> {
    bits.filter(|&b| b < 16).map(|bits| Quantizer::LlmQat {
        bits,
        symmetric: true,
    })
}

/// A linear map with an optional bias. Parameters: `weight` [out, in] and, with a bias, `bias` [out].
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    fake: FakeQuant,
}

/// y = x·Ŵᵀ through the packed kernels for `x` [rows, in], activations in `p.act` form. An inference
/// path: an `x` that carries gradients is an error rather than a silently cut graph.
pub(crate) fn packed_forward(op: &'static str, p: &PackedParam, x: &Tensor) -> Result<Tensor> {
    if grad_enabled() && x.tracks_grad() {
        crate::bail!(
            op,
            "packed {:?} weights are frozen and pass no gradient; run under trit::no_grad(), or load \
             the weights dense to train",
            p.weights.format()
        );
    }
    p.weights.matmul(x, p.act)
}

impl Linear {
    /// A layer initialised as `torch.nn.Linear` does: weight and bias uniform in ±1/√in.
    pub fn new(params: &ParamStore, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let bound = 1.0 / (in_dim.max(1) as f32).sqrt();
        Linear::with_init(
            params,
            in_dim,
            out_dim,
            bias,
            Init::Uniform(bound),
            Init::Uniform(bound),
        )
    }

    /// A layer with explicit initialisers for the weight and (when present) the bias.
    pub fn with_init(
        params: &ParamStore,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        weight_init: Init,
        bias_init: Init,
    ) -> Result<Self> {
        if in_dim == 0 || out_dim == 0 {
            crate::bail!(
                "Linear::new",
                "dimensions must be positive, got in {in_dim}, out {out_dim}"
            );
        }
        let weight = match params.packed("weight") {
            Some(p) if [p.weights.rows(), p.weights.cols()] != [out_dim, in_dim] => {
                return Err(Error::ShapeMismatch {
                    op: "Linear::new (packed weight)",
                    lhs: vec![p.weights.rows(), p.weights.cols()],
                    rhs: vec![out_dim, in_dim],
                })
            }
            Some(p) => Weight::Packed(p),
            None => Weight::Dense(params.get_or_init("weight", (out_dim, in_dim), weight_init)?),
        };
        let bias = if bias {
            Some(params.get_or_init("bias", out_dim, bias_init)?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            fake: FakeQuant::default(),
        })
    }

    /// A layer over existing tensors (weight [out, in], bias [out]).
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let &[out_dim, _] = weight.dims() else {
            crate::bail!(
                "Linear::from_weights",
                "weight must be [out, in], got shape {}",
                weight.shape()
            );
        };
        if let Some(b) = &bias {
            if b.dims() != [out_dim] {
                return Err(Error::ShapeMismatch {
                    op: "Linear::from_weights",
                    lhs: weight.dims().to_vec(),
                    rhs: b.dims().to_vec(),
                });
            }
        }
        Ok(Linear {
            weight: Weight::Dense(weight),
            bias,
            fake: FakeQuant::default(),
        })
    }

    /// A layer over a packed weight [out, in] (frozen; see [`PackedParam`]) and an optional bias [out].
    pub fn from_packed(weights: QTensor, act: ActMode, bias: Option<Tensor>) -> Result<Self> {
        if let Some(b) = &bias {
            if b.dims() != [weights.rows()] {
                return Err(Error::ShapeMismatch {
                    op: "Linear::from_packed",
                    lhs: vec![weights.rows(), weights.cols()],
                    rhs: b.dims().to_vec(),
                });
            }
        }
        let weight = Weight::Packed(PackedParam {
            weights: Arc::new(weights),
            act,
        });
        Ok(Linear {
            weight,
            bias,
            fake: FakeQuant::default(),
        })
    }

    /// Trains (and runs) the layer with fake quantization as `fake` says; `FakeQuant::default()` turns
    /// it off. A packed layer is already quantized and refuses.
    pub fn set_fake_quant(&mut self, fake: FakeQuant) -> Result<()> {
        if matches!(self.weight, Weight::Packed(_)) && !fake.is_none() {
            crate::bail!(
                "Linear::set_fake_quant",
                "the weight is packed (frozen); fake quantization needs dense weights"
            );
        }
        for q in [fake.weight, fake.input].into_iter().flatten() {
            q.check()?;
        }
        self.fake = fake;
        Ok(())
    }

    pub fn fake_quant(&self) -> FakeQuant {
        self.fake
    }

    /// The dense weight [out, in]; `None` for a packed layer.
    pub fn weight(&self) -> Option<&Tensor> {
        match &self.weight {
            Weight::Dense(w) => Some(w),
            Weight::Packed(_) => None,
        }
    }

    /// The packed weight; `None` for a dense layer.
    pub fn packed(&self) -> Option<&QTensor> {
        match &self.weight {
            Weight::Dense(_) => None,
            Weight::Packed(p) => Some(&p.weights),
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// [out, in].
    fn dims(&self) -> [usize; 2] {
        match &self.weight {
            Weight::Dense(w) => [w.dims()[0], w.dims()[1]],
            Weight::Packed(p) => [p.weights.rows(), p.weights.cols()],
        }
    }

    pub fn in_dim(&self) -> usize {
        self.dims()[1]
    }

    pub fn out_dim(&self) -> usize {
        self.dims()[0]
    }

    /// `[layer.forward(x) for each layer]` for layers of the same input size (a layer's q, k and v
    /// projections). Packed layers without biases that share their activation form run as one
    /// product (see [`QTensor::matmul_many`]); any other mix runs layer by layer.
    pub fn forward_many(layers: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let packed: Option<Vec<&PackedParam>> = layers
            .iter()
            .map(|l| match (&l.weight, &l.bias) {
                (Weight::Packed(p), None) => Some(p),
                _ => None,
            })
            .collect();
        let in_dim = x.dims().last().copied();
        match packed {
            Some(ps)
                if !ps.is_empty()
                    && ps.iter().all(|p| p.act == ps[0].act)
                    && layers.iter().all(|l| Some(l.in_dim()) == in_dim)
                    && !(grad_enabled() && x.tracks_grad()) =>
            {
                let Some((&k, lead)) = x.dims().split_last() else {
                    crate::bail!("Linear::forward_many", "input must have at least one dim");
                };
                let rows: usize = lead.iter().product();
                let ws: Vec<&QTensor> = ps.iter().map(|p| &*p.weights).collect();
                QTensor::matmul_many(&ws, &x.reshape((rows, k))?, ps[0].act)?
                    .into_iter()
                    .zip(layers)
                    .map(|(y, l)| y.reshape([lead, &[l.out_dim()]].concat()))
                    .collect()
            }
            _ => layers.iter().map(|l| l.forward(x)).collect(),
        }
    }

    /// `x [..., in] -> [..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let Some((&in_dim, lead)) = x.dims().split_last() else {
            crate::bail!("Linear::forward", "input must have at least one dim");
        };
        if in_dim != self.in_dim() {
            return Err(Error::ShapeMismatch {
                op: "Linear::forward",
                lhs: x.dims().to_vec(),
                rhs: self.dims().to_vec(),
            });
        }
        // One [rows, in] × [in, out] GEMM over all leading dims keeps the kernel's blocks full; Wᵀ is a
        // strided view, never a copy.
        let rows: usize = lead.iter().product();
        let mut x2 = x.reshape((rows, in_dim))?;
        if let Some(q) = self.fake.input {
            x2 = q.fake_quant(&x2, Granularity::PerRow)?;
        }
        let y = match &self.weight {
            Weight::Dense(w) => {
                let w = match self.fake.weight {
                    Some(q) => q.fake_quant(w, Granularity::PerRow)?,
                    None => w.clone(),
                };
                x2.matmul(&cast_like(&w, x)?.t()?)?
            }
            Weight::Packed(p) => packed_forward("Linear::forward", p, &x2)?,
        };
        let y = match &self.bias {
            Some(b) => y.add(&cast_like(b, &y)?)?,
            None => y,
        };
        y.reshape([lead, &[self.out_dim()]].concat())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, Device, Rng};

    fn naive(x: &[f32], w: &[f32], b: Option<&[f32]>, rows: usize, i: usize, o: usize) -> Vec<f64> {
        let mut y = vec![0f64; rows * o];
        for r in 0..rows {
            for j in 0..o {
                let mut s = b.map_or(0.0, |b| b[j] as f64);
                for k in 0..i {
                    s += x[r * i + k] as f64 * w[j * i + k] as f64;
                }
                y[r * o + j] = s;
            }
        }
        y
    }

    #[test]
    fn matches_naive_loop() -> Result<()> {
        let ps = ParamStore::new(1, DType::F32, Device::Cpu);
        let lin = Linear::new(&ps.pp("fc"), 5, 3, true)?;
        assert_eq!(ps.all().len(), 2);
        assert!(ps.get("fc.weight").is_some() && ps.get("fc.bias").is_some());
        let x = Tensor::randn((2, 4, 5), 0.0, 1.0, &mut Rng::new(2), Device::Cpu)?;
        let y = lin.forward(&x)?;
        assert_eq!(y.dims(), [2, 4, 3]);
        let want = naive(
            &x.to_vec_f32(),
            &lin.weight().unwrap().to_vec_f32(),
            Some(&lin.bias().unwrap().to_vec_f32()),
            8,
            5,
            3,
        );
        for (g, w) in y.to_vec_f32().iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
        }
        Ok(())
    }

    /// LLM-QAT's symmetric fake quantizer on each row of `n`, in f64.
    fn quantize_rows(m: &[f32], n: usize, bits: u32) -> Vec<f32> {
        let qmax = ((1u32 << (bits - 1)) - 1) as f64;
        m.chunks(n)
            .flat_map(|row| {
                let s = qmax / (row.iter().fold(0f64, |a, &v| a.max(v.abs() as f64)) + 1e-6);
                row.iter()
                    .map(move |&v| ((v as f64 * s).round_ties_even() / s) as f32)
            })
            .collect()
    }

    #[test]
    fn fake_quant_multiplies_quantized_inputs_by_quantized_weights() -> Result<()> {
        let ps = ParamStore::new(3, DType::F32, Device::Cpu);
        let mut lin = Linear::new(&ps.pp("fc"), 7, 5, true)?;
        lin.set_fake_quant(FakeQuant::llm_qat(Some(4), Some(8)))?;
        let x = Tensor::randn((2, 3, 7), 0.0, 1.0, &mut Rng::new(4), Device::Cpu)?.var()?;
        let y = lin.forward(&x)?;
        let w = lin.weight().unwrap().to_vec_f32();
        let (wq, xq) = (
            quantize_rows(&w, 7, 4),
            quantize_rows(&x.to_vec_f32(), 7, 8),
        );
        let want = naive(&xq, &wq, Some(&lin.bias().unwrap().to_vec_f32()), 6, 7, 5);
        for (g, w) in y.to_vec_f32().iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
        }
        // Straight through: d(sum y)/dW[j, k] = Σ_rows q(x)[r, k] (every |w| < 2), and
        // d(sum y)/dx[r, k] = Σ_j q(W)[j, k] where |x| < 2, zero elsewhere.
        let g = y.sum_all()?.backward()?;
        let gw = g.get(lin.weight().unwrap()).unwrap().to_vec_f32();
        for j in 0..5 {
            for k in 0..7 {
                let want: f32 = (0..6).map(|r| xq[r * 7 + k]).sum();
                assert!((gw[j * 7 + k] - want).abs() < 1e-5);
            }
        }
        let gx = g.get(&x).unwrap().to_vec_f32();
        for (i, xv) in x.to_vec_f32().iter().enumerate() {
            let k = i % 7;
            let want: f32 = if xv.abs() < 2.0 {
                (0..5).map(|j| wq[j * 7 + k]).sum()
            } else {
                0.0
            };
            assert!((gx[i] - want).abs() < 1e-5, "x {xv}: {} vs {want}", gx[i]);
        }
        // Off again: the plain product.
        lin.set_fake_quant(FakeQuant::default())?;
        let plain = naive(
            &x.to_vec_f32(),
            &w,
            Some(&lin.bias().unwrap().to_vec_f32()),
            6,
            7,
            5,
        );
        for (g, w) in lin.forward(&x)?.to_vec_f32().iter().zip(&plain) {
            assert!((*g as f64 - w).abs() < 1e-5);
        }
        assert!(lin
            .set_fake_quant(FakeQuant::llm_qat(Some(1), None))
            .is_err());
        assert_eq!(lin.fake_quant(), FakeQuant::default());
        Ok(())
    }

    #[test]
    fn without_bias_and_gradients() -> Result<()> {
        let w = Tensor::from_vec(vec![1f32, 2., 3., 4., 5., 6.], (2, 3), Device::Cpu)?.var()?;
        let lin = Linear::from_weights(w.clone(), None)?;
        let x = Tensor::from_vec(vec![1f32, 0., -1.], (1, 3), Device::Cpu)?;
        let y = lin.forward(&x)?;
        assert_eq!(y.to_vec::<f32>()?, vec![-2., -2.]);
        // d(sum y)/dW[j, k] = x[k] for every output j.
        let g = y.sum_all()?.backward()?;
        assert_eq!(
            g.get(&w).unwrap().to_vec_f32(),
            vec![1., 0., -1., 1., 0., -1.]
        );
        Ok(())
    }

    #[test]
    fn packed_layers_run_together_and_refuse_gradients() -> Result<()> {
        use crate::quant::{Group, QFormat};
        let mut rng = Rng::new(5);
        let fmt = QFormat::Int4 {
            group: Group::Size(32),
            asym: true,
        };
        let q = |rows: usize, rng: &mut Rng| -> Result<QTensor> {
            let w = Tensor::randn((rows, 64), 0.0, 0.1, rng, Device::Cpu)?;
            QTensor::quantize_tensor(&w, fmt)
        };
        let a = Linear::from_packed(q(24, &mut rng)?, ActMode::Int8Blocks, None)?;
        let b = Linear::from_packed(q(8, &mut rng)?, ActMode::Int8Blocks, None)?;
        let dense = Linear::from_weights(
            Tensor::randn((5, 64), 0.0, 0.1, &mut rng, Device::Cpu)?,
            None,
        )?;
        assert!(
            a.weight().is_none() && a.packed().is_some() && (a.in_dim(), a.out_dim()) == (64, 24)
        );
        let x = Tensor::randn((1, 1, 64), 0.0, 1.0, &mut rng, Device::Cpu)?;
        // Packed layers together (one fused product) and a mix with a dense one (layer by layer)
        // give what each layer gives alone.
        for layers in [vec![&a, &b], vec![&a, &dense, &b]] {
            let ys = Linear::forward_many(&layers, &x)?;
            for (l, y) in layers.iter().zip(&ys) {
                assert_eq!(y.to_vec_f32(), l.forward(&x)?.to_vec_f32());
            }
        }
        // A packed layer passes no gradient: an input that carries one is refused, not cut.
        let xv = x.var()?;
        let mut fake = a.clone();
        assert!(fake
            .set_fake_quant(FakeQuant::llm_qat(Some(4), None))
            .is_err());
        let err = a.forward(&xv).unwrap_err().to_string();
        assert!(err.contains("no_grad"), "{err}");
        let _ng = crate::tensor::no_grad();
        assert!(a.forward(&xv).is_ok());
        Ok(())
    }

    #[test]
    fn bad_input_is_an_error() -> Result<()> {
        let ps = ParamStore::new(1, DType::F32, Device::Cpu);
        let lin = Linear::new(&ps, 4, 2, false)?;
        let x = Tensor::zeros((3, 5), DType::F32, Device::Cpu)?;
        assert!(lin.forward(&x).is_err());
        assert!(Linear::new(&ps.pp("z"), 0, 2, false).is_err());
        Ok(())
    }
}
