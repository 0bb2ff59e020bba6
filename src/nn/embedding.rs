//! Token embedding: a [vocab, dim] table looked up by integer ids. The same table can serve as the output
//! projection when a model ties its embeddings. The table is a dense parameter or a frozen packed
//! [`QTensor`] (see [`ParamStore::insert_packed`]), whose rows are dequantized as they are looked up.

use super::linear::packed_forward;
use super::params::{Init, PackedParam, ParamStore};
use crate::error::{Error, Result};
use crate::quant::QTensor;
use crate::tensor::Tensor;

#[derive(Clone, Debug)]
enum Table {
    Dense(Tensor),
    Packed(PackedParam),
}

/// A lookup table. Parameter: `weight` [vocab, dim].
#[derive(Clone, Debug)]
pub struct Embedding {
    weight: Table,
}

impl Embedding {
    /// A table initialised N(0, 1), as `torch.nn.Embedding` does.
    pub fn new(params: &ParamStore, vocab: usize, dim: usize) -> Result<Self> {
        Embedding::with_init(params, vocab, dim, Init::Normal(1.0))
    }

    pub fn with_init(params: &ParamStore, vocab: usize, dim: usize, init: Init) -> Result<Self> {
        if vocab == 0 || dim == 0 {
            crate::bail!(
                "Embedding::new",
                "vocab and dim must be positive, got {vocab} and {dim}"
            );
        }
        let weight = match params.packed("weight") {
            Some(p) if [p.weights.rows(), p.weights.cols()] != [vocab, dim] => {
                return Err(Error::ShapeMismatch {
                    op: "Embedding::new (packed table)",
                    lhs: vec![p.weights.rows(), p.weights.cols()],
                    rhs: vec![vocab, dim],
                })
            }
            Some(p) => Table::Packed(p),
            None => Table::Dense(params.get_or_init("weight", (vocab, dim), init)?),
        };
        Ok(Embedding { weight })
    }

    /// The dense table [vocab, dim]; `None` for a packed one.
    pub fn weight(&self) -> Option<&Tensor> {
        match &self.weight {
            Table::Dense(w) => Some(w),
            Table::Packed(_) => None,
        }
    }

    /// The packed table; `None` for a dense one.
    pub fn packed(&self) -> Option<&QTensor> {
        match &self.weight {
            Table::Dense(_) => None,
            Table::Packed(p) => Some(&p.weights),
        }
    }

    /// [vocab, dim].
    fn dims(&self) -> [usize; 2] {
        match &self.weight {
            Table::Dense(w) => [w.dims()[0], w.dims()[1]],
            Table::Packed(p) => [p.weights.rows(), p.weights.cols()],
        }
    }

    pub fn vocab(&self) -> usize {
        self.dims()[0]
    }

    pub fn dim(&self) -> usize {
        self.dims()[1]
    }

    /// `ids [...]` (integers in 0..vocab) -> `[..., dim]`; an out-of-range id is an error.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match &self.weight {
            Table::Dense(w) => w.embedding(ids),
            Table::Packed(p) => p.weights.gather_rows(ids),
        }
    }

    /// The tied output projection `x [..., dim] -> logits [..., vocab]` = x·Wᵀ.
    pub fn unembed(&self, x: &Tensor) -> Result<Tensor> {
        let Some((&d, lead)) = x.dims().split_last() else {
            crate::bail!("Embedding::unembed", "input must have at least one dim");
        };
        if d != self.dim() {
            return Err(Error::ShapeMismatch {
                op: "Embedding::unembed",
                lhs: x.dims().to_vec(),
                rhs: self.dims().to_vec(),
            });
        }
        let rows: usize = lead.iter().product();
        let x2 = x.reshape((rows, d))?;
        let y = match &self.weight {
            Table::Dense(w) => x2.matmul(&super::linear::cast_like(w, x)?.t()?)?,
            Table::Packed(p) => packed_forward("Embedding::unembed", p, &x2)?,
        };
        y.reshape([lead, &[self.vocab()]].concat())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, Device};

    #[test]
    fn looks_up_rows_and_unembeds() -> Result<()> {
        let ps = ParamStore::new(0, DType::F32, Device::Cpu);
        let w = Tensor::from_vec(
            vec![0f32, 1., 2., 3., 4., 5., 6., 7., 8.],
            (3, 3),
            Device::Cpu,
        )?;
        ps.insert("tok.weight", &w)?;
        let emb = Embedding::new(&ps.pp("tok"), 3, 3)?;
        let ids = Tensor::from_vec(vec![2i32, 0, 1, 2], (2, 2), Device::Cpu)?;
        let y = emb.forward(&ids)?;
        assert_eq!(y.dims(), [2, 2, 3]);
        assert_eq!(
            y.to_vec::<f32>()?,
            vec![6., 7., 8., 0., 1., 2., 3., 4., 5., 6., 7., 8.]
        );
        let x = Tensor::from_vec(vec![1f32, 0., -1.], (1, 1, 3), Device::Cpu)?;
        assert_eq!(emb.unembed(&x)?.to_vec::<f32>()?, vec![-2., -2., -2.]);
        Ok(())
    }

    #[test]
    fn gradient_accumulates_repeated_ids() -> Result<()> {
        let ps = ParamStore::new(0, DType::F32, Device::Cpu);
        let emb = Embedding::new(&ps, 4, 2)?;
        let ids = Tensor::from_vec(vec![1i32, 1, 3], 3, Device::Cpu)?;
        let g = emb.forward(&ids)?.sum_all()?.backward()?;
        assert_eq!(
            g.get(emb.weight().unwrap()).unwrap().to_vec_f32(),
            vec![0., 0., 2., 2., 0., 0., 1., 1.]
        );
        Ok(())
    }

    #[test]
    fn out_of_range_id_is_an_error() -> Result<()> {
        let ps = ParamStore::new(0, DType::F32, Device::Cpu);
        let emb = Embedding::new(&ps, 4, 2)?;
        let ids = Tensor::from_vec(vec![4i32], 1, Device::Cpu)?;
        assert!(emb.forward(&ids).is_err());
        Ok(())
    }
}
