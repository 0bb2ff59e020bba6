//! softmax and log_softmax over any dim, and causal softmax over the last, fused with their own backward.

use crate::error::{Error, Result};
use crate::op::{CustomBackward, Op, SoftmaxKind as Kind};
use crate::shape::Dim;
use crate::tensor::Tensor;
use std::sync::Arc;

struct SoftmaxBackward {
    kind: Kind,
}

impl CustomBackward for SoftmaxBackward {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Plain => "softmax",
            Kind::Log => "log_softmax",
            Kind::Causal(_) => "causal_softmax",
        }
    }

    fn backward(
        &self,
        _inputs: &[Tensor],
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        let d = out.dims().last().copied().unwrap_or(1);
        let storage = out.storage().softmax_backward(
            out.layout(),
            &grad.storage(),
            grad.layout(),
            d,
            self.kind,
        )?;
        Ok(vec![Some(Tensor::from_storage(
            storage,
            out.shape().clone(),
            None,
        ))])
    }
}

impl Tensor {
    fn softmax_impl(&self, dim: impl Dim, log: bool) -> Result<Tensor> {
        let name = if log { "log_softmax" } else { "softmax" };
        let d = dim.to_index(self.shape(), name)?;
        let last = self.rank() - 1;
        if d != last {
            return self
                .transpose(d, last)?
                .softmax_impl(last, log)?
                .transpose(d, last);
        }
        let n = self.dims()[last];
        let kind = if log { Kind::Log } else { Kind::Plain };
        let storage = self.storage().softmax(self.layout(), n, kind)?;
        let op = Op::Custom(vec![self.clone()], Arc::new(SoftmaxBackward { kind }));
        Ok(Tensor::from_storage(
            storage,
            self.shape().clone(),
            Some(op),
        ))
    }

    /// exp(x) / Σ exp(x) along `dim`, computed stably.
    pub fn softmax(&self, dim: impl Dim) -> Result<Tensor> {
        self.softmax_impl(dim, false)
    }

    /// Softmax over the last dim of `[.., q, k]` scores under a causal mask: query row i attends to keys
    /// 0..=i + (k − q) (the last q of k positions are the queries) and gives the rest exactly zero
    /// weight. The same as adding the additive −∞ mask and taking `softmax(-1)`, without building the
    /// mask or reading the hidden half in backward. Needs rank ≥ 2 and q ≤ k.
    pub fn causal_softmax(&self) -> Result<Tensor> {
        let &[.., q, n] = self.dims() else {
            crate::bail!(
                "causal_softmax",
                "need at least [queries, keys] dims, got shape {}",
                self.shape()
            );
        };
        if q > n {
            return Err(Error::ShapeMismatch {
                op: "causal_softmax (more queries than keys)",
                lhs: self.dims().to_vec(),
                rhs: vec![n, n],
            });
        }
        let storage = self.storage().softmax(self.layout(), n, Kind::Causal(q))?;
        let op = Op::Custom(
            vec![self.clone()],
            Arc::new(SoftmaxBackward {
                kind: Kind::Causal(q),
            }),
        );
        Ok(Tensor::from_storage(
            storage,
            self.shape().clone(),
            Some(op),
        ))
    }

    /// x − logsumexp(x) along `dim`.
    pub fn log_softmax(&self, dim: impl Dim) -> Result<Tensor> {
        self.softmax_impl(dim, true)
    }
}

#[cfg(test)]
mod tests {
    use crate::{Device, Result, Rng, Tensor};

    /// Naive f64 causal softmax of rows of `[.., q, k]` data and its backward for upstream gradient `g`:
    /// (y, dx) with dx = y ⊙ (g − Σ g⊙y) over each row's visible keys.
    fn reference(x: &[f32], g: &[f32], q: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
        let (mut y, mut dx) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        for r in 0..x.len() / k {
            let seen = r % q + 1 + (k - q);
            let row = &x[r * k..r * k + seen];
            let m = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let s: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
            for j in 0..seen {
                y[r * k + j] = (x[r * k + j] as f64 - m).exp() / s;
            }
            let dot: f64 = (0..seen).map(|j| y[r * k + j] * g[r * k + j] as f64).sum();
            for j in 0..seen {
                dx[r * k + j] = y[r * k + j] * (g[r * k + j] as f64 - dot);
            }
        }
        (y, dx)
    }

    #[test]
    fn causal_softmax_matches_f64_reference() -> Result<()> {
        let mut rng = Rng::new(7);
        // Square (self-attention) and q < k (queries are the last q of k positions, as with a KV cache);
        // lengths that leave vector tails.
        for (lead, q, k) in [
            (vec![2, 3], 17, 17),
            (vec![4], 5, 37),
            (vec![], 1, 1),
            (vec![1], 33, 40),
        ] {
            let shape = [lead.as_slice(), &[q, k]].concat();
            let n: usize = shape.iter().product();
            let xv: Vec<f32> = (0..n).map(|_| rng.normal_f64() as f32 * 3.0).collect();
            let gv: Vec<f32> = (0..n).map(|_| rng.normal_f64() as f32).collect();
            let x = Tensor::from_vec(xv.clone(), shape.clone(), Device::Cpu)?.var()?;
            let g = Tensor::from_vec(gv.clone(), shape.clone(), Device::Cpu)?;
            let y = x.causal_softmax()?;
            let grads = y.mul(&g)?.sum_all()?.backward()?;
            let (want_y, want_dx) = reference(&xv, &gv, q, k);
            let got_y = y.to_vec_f32();
            let got_dx = grads.get(&x).unwrap().to_vec_f32();
            for i in 0..n {
                assert!(
                    (got_y[i] as f64 - want_y[i]).abs() <= 1e-6,
                    "y[{i}] of {shape:?}"
                );
                assert!(
                    (got_dx[i] as f64 - want_dx[i]).abs() <= 1e-5,
                    "dx[{i}] of {shape:?}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn causal_softmax_needs_keys_for_every_query() {
        let x = Tensor::zeros((3, 2), crate::DType::F32, Device::Cpu).unwrap();
        assert!(x.causal_softmax().is_err());
        let v = Tensor::zeros(4, crate::DType::F32, Device::Cpu).unwrap();
        assert!(v.causal_softmax().is_err());
    }
}
