//! Fused scaled-dot-product attention (flash-style: the score matrix is never stored) with its own
//! backward, over FlashAttention's layout: q [batch, q_len, heads, d], k and v [batch, kv_len, kv_heads, d].
//! The CPU kernels are in [`crate::cpu::attention`]; on a GPU, f16/bf16 heads of 64 or 128 run the
//! flash kernels of [`crate::cuda::flash`] (cuda/flash_fwd.cu, cuda/flash_bwd.cu) and other dtypes or
//! head dims the composed ops.
//!
//! ```
//! use trit::ops::attention::AttentionOptions;
//! use trit::{Device, Rng, Tensor};
//! let mut rng = Rng::new(0);
//! // [batch, seq, heads, head_dim]: 8 query heads sharing 2 key/value heads (grouped-query attention).
//! let q = Tensor::randn((1, 100, 8, 64), 0.0, 1.0, &mut rng, Device::Cpu)?.var()?;
//! let k = Tensor::randn((1, 100, 2, 64), 0.0, 1.0, &mut rng, Device::Cpu)?;
//! let v = Tensor::randn((1, 100, 2, 64), 0.0, 1.0, &mut rng, Device::Cpu)?;
//! // Two packed documents of 60 and 40 tokens: neither attends to the other.
//! let docs: Vec<i32> = (0..100).map(|t| i32::from(t >= 60)).collect();
//! let segments = Tensor::from_vec(docs, (1, 100), Device::Cpu)?;
//! let opts = AttentionOptions { causal: true, segments: Some(&segments), ..Default::default() };
//! let o = q.flash_attention(&k, &v, &opts)?;
//! assert_eq!(o.dims(), [1, 100, 8, 64]);
//! let grads = o.sqr()?.sum_all()?.backward()?;
//! assert_eq!(grads.get(&q).unwrap().dims(), q.dims());
//! # Ok::<(), trit::Error>(())
//! ```

use super::rope::Rotary;
use super::with_f32_inputs;
use crate::cpu::attention as k;
use crate::cpu::matmul::Isa;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::op::{CustomBackward, Op};
use crate::ops::rope::RopeTable;
use crate::storage::Storage;
use crate::tensor::Tensor;
use std::sync::Arc;

/// Which keys each query sees, the score scale and an optional fused rotary embedding.
#[derive(Clone, Copy, Debug, Default)]
pub struct AttentionOptions<'a> {
    /// Query i sees keys j ≤ i + kv_len − q_len (queries aligned to the last q_len keys).
    pub causal: bool,
    /// Sliding window of w keys (w ≥ 1): key j is visible to the query at key position t when
    /// j > t − w, and, without `causal`, also j < t + w.
    pub window: Option<usize>,
    /// [batch, kv_len], any dtype: zero marks a padding key that no query sees.
    pub key_padding: Option<&'a Tensor>,
    /// [batch, kv_len] integer document ids for packed sequences: a document is a maximal run of equal
    /// consecutive ids, and a query sees only the keys of its own document (queries take the ids of the
    /// last q_len keys; with q_len > kv_len the first queries belong to no document and see nothing).
    pub segments: Option<&'a Tensor>,
    /// RoPE applied to q and k inside the kernels (positions are key positions; query i takes that of
    /// key i + kv_len − q_len, so it needs q_len ≤ kv_len).
    pub rotary: Option<Rotary<'a>>,
    /// Score scale; 1/√d when `None`.
    pub scale: Option<f32>,
}

impl<'a> AttentionOptions<'a> {
    /// Causal or full attention with optional rotary positions, no other mask, scale 1/√d.
    pub fn new(causal: bool, rotary: Option<Rotary<'a>>) -> Self {
        AttentionOptions {
            causal,
            rotary,
            ..AttentionOptions::default()
        }
    }
}

/// Everything the backward needs besides the inputs and the output.
struct AttentionBackward {
    dims: k::Dims,
    causal: bool,
    window: Option<usize>,
    key_valid: Option<Vec<u8>>,
    segments: Option<Vec<i64>>,
    rotary: Option<(RopeTable, Vec<i64>)>,
    scale: f32,
    lse: Vec<f32>,
    isa: Isa,
}

impl AttentionBackward {
    fn problem(&self) -> k::Problem<'_> {
        problem(
            self.dims,
            self.causal,
            self.window,
            self.key_valid.as_deref(),
            self.segments.as_deref(),
            self.rotary.as_ref().map(|(t, p)| (t, p.as_slice())),
            self.scale,
        )
    }
}

fn problem<'a>(
    dims: k::Dims,
    causal: bool,
    window: Option<usize>,
    key_valid: Option<&'a [u8]>,
    segments: Option<&'a [i64]>,
    rotary: Option<(&'a RopeTable, &'a [i64])>,
    scale: f32,
) -> k::Problem<'a> {
    k::Problem {
        dims,
        mask: k::Mask {
            causal,
            window,
            key_valid,
            segments,
        },
        rotary: rotary.map(|(t, positions)| {
            let (cos, sin) = t.tables();
            k::Rotary {
                cos,
                sin,
                positions,
                interleaved: t.style() == crate::ops::rope::RopeStyle::Interleaved,
            }
        }),
        scale,
    }
}

impl CustomBackward for AttentionBackward {
    fn name(&self) -> &'static str {
        "flash_attention"
    }

    fn backward(
        &self,
        inputs: &[Tensor],
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        let [q, kk, v] = inputs else {
            unreachable!("recorded with q, k, v")
        };
        let p = self.problem();
        let (dq, dk, dv) =
            with_f32_inputs("flash_attention backward", &[q, kk, v, out, grad], |x| {
                k::backward(self.isa, &p, x[0], x[1], x[2], x[3], &self.lse, x[4])
            })?;
        let wrap = |g: Vec<f32>, like: &Tensor| {
            Tensor::from_storage(
                Storage::Cpu(crate::cpu::CpuStorage::from_f32(g, like.dtype())),
                like.shape().clone(),
                None,
            )
        };
        Ok(vec![
            Some(wrap(dq, q)),
            Some(wrap(dk, kk)),
            Some(wrap(dv, v)),
        ])
    }
}

/// Which keys each query sees, as the CPU kernel reads `AttentionOptions` (host copies of the masks).
struct Mask<'a> {
    causal: bool,
    window: Option<usize>,
    key_valid: Option<&'a [u8]>,
    segments: Option<&'a [i64]>,
}

impl Mask<'_> {
    /// True when nothing but (q_len ≤ kv_len) causality restricts the keys.
    fn causal_only(&self, sq: usize, sk: usize) -> bool {
        self.causal
            && sq <= sk
            && self.window.is_none()
            && self.key_valid.is_none()
            && self.segments.is_none()
    }

    /// visible[b][i][j] for query i (at key position t = i + sk − sq) and key j.
    fn visible(&self, b: usize, sq: usize, sk: usize) -> Vec<bool> {
        let mut vis = vec![false; b * sq * sk];
        for bi in 0..b {
            // Documents are maximal runs of equal consecutive ids.
            let doc: Option<Vec<usize>> = self.segments.map(|s| {
                let row = &s[bi * sk..(bi + 1) * sk];
                let mut id = 0;
                (0..sk)
                    .map(|j| {
                        if j > 0 && row[j] != row[j - 1] {
                            id += 1;
                        }
                        id
                    })
                    .collect()
            });
            for i in 0..sq {
                let t = i as isize + sk as isize - sq as isize;
                for j in 0..sk {
                    let ji = j as isize;
                    let mut ok = !self.causal || (t >= 0 && ji <= t);
                    if let Some(w) = self.window {
                        let w = w as isize;
                        ok &= ji > t - w && (self.causal || ji < t + w);
                    }
                    if let Some(kv) = self.key_valid {
                        ok &= kv[bi * sk + j] != 0;
                    }
                    if let Some(doc) = &doc {
                        ok &= t >= 0 && doc[j] == doc[t as usize];
                    }
                    vis[(bi * sq + i) * sk + j] = ok;
                }
            }
        }
        vis
    }
}

/// RoPE on q [batch, heads, q_len, d] and k [batch, kv_heads, kv_len, d] through the rope op (which
/// autograd differentiates): keys take the positions, query i that of key i + kv_len − q_len.
fn rotate(q: &Tensor, k: &Tensor, r: Rotary<'_>) -> Result<(Tensor, Tensor)> {
    let (sq, sk) = (q.dims()[2], k.dims()[2]);
    let pos = r.positions;
    let q = if sq == sk {
        q.rope(r.table, pos)?
    } else {
        q.rope(r.table, &pos.narrow(pos.rank() - 1, sk - sq, sq)?)?
    };
    Ok((q, k.rope(r.table, pos)?))
}

/// Attention from primitive ops, for what no fused kernel takes (GPU tensors in f32 or with head dims
/// other than 64 and 128): RoPE, grouped heads expanded, softmax(q·kᵀ·scale + mask)·v; autograd differentiates it.
/// Rows that see no key output zeros, as the CPU kernel's do.
fn composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rotary: Option<Rotary<'_>>,
    mask: &Mask<'_>,
    scale: f32,
) -> Result<Tensor> {
    let (&[b, sq, h, d], &[_, sk, hkv, _]) = (q.dims(), k.dims()) else {
        unreachable!("shapes checked by flash_attention")
    };
    let dev = q.device();
    let mut q = q.transpose(1, 2)?;
    let mut k = k.transpose(1, 2)?;
    let mut v = v.transpose(1, 2)?;
    if let Some(r) = rotary {
        (q, k) = rotate(&q, &k, r)?;
    }
    if hkv != h {
        let expand = |t: &Tensor| -> Result<Tensor> {
            t.unsqueeze(2)?
                .broadcast_as([b, hkv, h / hkv, sk, d])?
                .reshape((b, h, sk, d))
        };
        k = expand(&k)?;
        v = expand(&v)?;
    }
    let scores = q.matmul(&k.t()?)?.mul_scalar(scale)?;
    let probs = if mask.causal_only(sq, sk) {
        scores.causal_softmax()?
    } else if !mask.causal
        && mask.window.is_none()
        && mask.key_valid.is_none()
        && mask.segments.is_none()
    {
        scores.softmax(-1)?
    } else {
        let vis = mask.visible(b, sq, sk);
        let row_any: Vec<f32> = vis
            .chunks(sk.max(1))
            .map(|r| f32::from(u8::from(r.iter().any(|&x| x))))
            .collect();
        // Rows with no visible key get no −∞ (so their softmax stays finite) and are zeroed below.
        let bias: Vec<f32> = vis
            .chunks(sk.max(1))
            .zip(&row_any)
            .flat_map(|(r, &any)| {
                r.iter().map(move |&ok| {
                    if ok || any == 0.0 {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let bias = Tensor::from_vec(bias, (b, 1, sq, sk), dev)?.to_dtype(scores.dtype())?;
        let keep = Tensor::from_vec(row_any, (b, 1, sq, 1), dev)?.to_dtype(scores.dtype())?;
        scores.add(&bias)?.softmax(-1)?.mul(&keep)?
    };
    probs.matmul(&v)?.transpose(1, 2)?.contiguous()
}

impl Tensor {
    /// softmax(q·kᵀ · scale + mask) · v with `self` as q [batch, q_len, heads, d] and k, v
    /// [batch, kv_len, kv_heads, d] (heads a multiple of kv_heads: grouped-query or multi-query
    /// attention read the shared kv head in place). Returns [batch, q_len, heads, d]. Memory beyond the
    /// inputs and output is O(len · d): the scores exist one tile at a time. A query that sees no key
    /// gets zeros. Differentiable in q, k and v.
    pub fn flash_attention(
        &self,
        k: &Tensor,
        v: &Tensor,
        opts: &AttentionOptions,
    ) -> Result<Tensor> {
        self.flash_attention_with_isa(Isa::best(), k, v, opts)
    }

    /// [`Tensor::flash_attention`] on an explicit instruction set (tests, benchmarks); an ISA this CPU
    /// lacks is an error. GPU tensors ignore it: f16/bf16 heads of 64 or 128 take the CUDA flash
    /// kernels, anything else the composed path.
    pub fn flash_attention_with_isa(
        &self,
        isa: Isa,
        kt: &Tensor,
        v: &Tensor,
        opts: &AttentionOptions,
    ) -> Result<Tensor> {
        self.attention_impl(Some(isa), kt, v, opts)
    }

    /// The same attention built from primitive ops (matmul, softmax, RoPE, masks), materialising the
    /// [batch, heads, q_len, kv_len] scores: the reference for the fused kernels, and the GPU's path
    /// for what its flash kernels do not take (f32, head dims other than 64 and 128). Differentiable
    /// through autograd.
    pub fn attention_composed(
        &self,
        k: &Tensor,
        v: &Tensor,
        opts: &AttentionOptions,
    ) -> Result<Tensor> {
        self.attention_impl(None, k, v, opts)
    }

    /// Checks the problem once, then runs the CPU flash kernel on `isa`, the GPU's flash kernels for
    /// GPU tensors they take, or the composed path when `isa` is `None` or no kernel fits.
    fn attention_impl(
        &self,
        isa: Option<Isa>,
        kt: &Tensor,
        v: &Tensor,
        opts: &AttentionOptions,
    ) -> Result<Tensor> {
        const OP: &str = "flash_attention";
        if let Some(isa) = isa.filter(|i| !Isa::available().contains(i)) {
            crate::bail!(OP, "this CPU cannot run the {isa:?} kernels");
        }
        let (&[b, sq, h, d], &[bk, sk, hkv, dk]) = (self.dims(), kt.dims()) else {
            crate::bail!(
                OP,
                "expected q [batch, q_len, heads, head_dim] and k [batch, kv_len, kv_heads, head_dim], \
                 got {} and {}",
                self.shape(),
                kt.shape()
            );
        };
        if bk != b || dk != d || v.dims() != kt.dims() {
            return Err(Error::ShapeMismatch {
                op: OP,
                lhs: self.dims().to_vec(),
                rhs: if v.dims() != kt.dims() {
                    v.dims().to_vec()
                } else {
                    kt.dims().to_vec()
                },
            });
        }
        if d == 0 || hkv == 0 || !h.is_multiple_of(hkv) {
            crate::bail!(
                OP,
                "need head_dim > 0 and heads ({h}) a positive multiple of kv_heads ({hkv})"
            );
        }
        if opts.window == Some(0) {
            crate::bail!(OP, "a sliding window must hold at least one key");
        }
        let scale = opts.scale.unwrap_or(1.0 / (d as f32).sqrt());
        if !scale.is_finite() {
            crate::bail!(OP, "scale must be finite, got {scale}");
        }
        let side = |t: Option<&Tensor>, what: &str| -> Result<()> {
            match t {
                Some(t) if t.dims() != [b, sk] => {
                    crate::bail!(
                        OP,
                        "{what} must be [batch {b}, kv_len {sk}], got {}",
                        t.shape()
                    )
                }
                _ => Ok(()),
            }
        };
        side(opts.key_padding, "key_padding")?;
        side(opts.segments, "segments")?;
        if opts.segments.is_some_and(|s| s.dtype().is_float()) {
            crate::bail!(OP, "segments must be integer document ids");
        }
        let key_valid = match opts.key_padding {
            Some(t) => Some(
                t.try_to_vec_f32()?
                    .iter()
                    .map(|&x| u8::from(x != 0.0))
                    .collect::<Vec<u8>>(),
            ),
            None => None,
        };
        let segments = opts.segments.map(Tensor::try_to_vec_i64).transpose()?;
        let isa = match isa {
            Some(isa) if !self.device().is_cuda() => isa,
            _ => {
                if let Some(r) = opts.rotary {
                    if r.table.head_dim() != d || sq > sk {
                        crate::bail!(
                        OP,
                        "rotary needs a table for head_dim {d} and q_len ({sq}) ≤ kv_len ({sk})"
                    );
                    }
                }
                #[cfg(feature = "cuda")]
                if isa.is_some() {
                    let masks = (key_valid.as_deref(), segments.as_deref());
                    if let Some(o) = cuda_flash::attention(self, kt, v, opts, masks, scale)? {
                        return Ok(o);
                    }
                }
                let mask = Mask {
                    causal: opts.causal,
                    window: opts.window,
                    key_valid: key_valid.as_deref(),
                    segments: segments.as_deref(),
                };
                return composed(self, kt, v, opts.rotary, &mask, scale);
            }
        };
        let rotary = match opts.rotary {
            None => None,
            Some(r) => {
                if r.table.head_dim() != d {
                    crate::bail!(
                        OP,
                        "rotary table is for head_dim {}, the heads have {d}",
                        r.table.head_dim()
                    );
                }
                if sq > sk {
                    crate::bail!(
                        OP,
                        "rotary needs q_len ({sq}) ≤ kv_len ({sk}): queries take the last keys' positions"
                    );
                }
                Some((
                    r.table.clone(),
                    r.table.check_positions(r.positions, b, sk)?,
                ))
            }
        };
        let dims = k::Dims {
            batch: b,
            q_len: sq,
            kv_len: sk,
            heads: h,
            kv_heads: hkv,
            head_dim: d,
        };
        let p = problem(
            dims,
            opts.causal,
            opts.window,
            key_valid.as_deref(),
            segments.as_deref(),
            rotary.as_ref().map(|(t, p)| (t, p.as_slice())),
            scale,
        );
        let (out, lse) = with_f32_inputs(OP, &[self, kt, v], |x| {
            k::forward(isa, &p, x[0], x[1], x[2])
        })?;
        let dtype = if self.dtype().is_float() {
            self.dtype()
        } else {
            DType::F32
        };
        let storage = Storage::Cpu(crate::cpu::CpuStorage::from_f32(out, dtype));
        let op = Op::Custom(
            vec![self.clone(), kt.clone(), v.clone()],
            Arc::new(AttentionBackward {
                dims,
                causal: opts.causal,
                window: opts.window,
                key_valid,
                segments,
                rotary,
                scale,
                lse,
                isa,
            }),
        );
        Ok(Tensor::from_storage(
            storage,
            self.shape().clone(),
            Some(op),
        ))
    }
}

/// The GPU's fused attention: cuda/flash_fwd.cu and cuda/flash_bwd.cu through [`crate::cuda::flash`],
/// for f16/bf16 heads of 64 or 128; other dtypes and head dims take the composed path.
#[cfg(feature = "cuda")]
mod cuda_flash {
    use super::{rotate, AttentionOptions};
    use crate::cuda::flash::{self, FlashMask, FlashShape};
    use crate::error::Result;
    use crate::layout::Layout;
    use crate::op::{CustomBackward, Op};
    use crate::storage::Storage;
    use crate::tensor::Tensor;
    use std::sync::Arc;

    struct FlashBackward {
        shape: FlashShape,
        mask: FlashMask,
        scale: f32,
        lse: crate::cuda::CudaStorage,
    }

    fn cuda(t: &Tensor) -> crate::cuda::CudaStorage {
        match &*t.storage() {
            Storage::Cuda(s) => s.clone(),
            Storage::Cpu(_) => unreachable!("the flash path is taken for CUDA tensors only"),
        }
    }

    fn wrap(s: crate::cuda::CudaStorage, dims: &[usize], op: Option<Op>) -> Tensor {
        Tensor::from_parts(Storage::Cuda(s), Layout::contiguous(dims), op)
    }

    impl CustomBackward for FlashBackward {
        fn name(&self) -> &'static str {
            "flash_attention"
        }

        fn backward(
            &self,
            inputs: &[Tensor],
            out: &Tensor,
            grad: &Tensor,
        ) -> Result<Vec<Option<Tensor>>> {
            let [q, k, v] = inputs else {
                unreachable!("recorded with q, k, v")
            };
            let grad = grad.to_dtype(q.dtype())?;
            let (qs, ks, vs, os, gs) = (cuda(q), cuda(k), cuda(v), cuda(out), cuda(&grad));
            let (dq, dk, dv) = flash::backward(
                (&qs, q.layout()),
                (&ks, k.layout()),
                (&vs, v.layout()),
                (&os, out.layout()),
                &self.lse,
                (&gs, grad.layout()),
                self.shape,
                &self.mask,
                self.scale,
            )?;
            Ok(vec![
                Some(wrap(dq, q.dims(), None)),
                Some(wrap(dk, k.dims(), None)),
                Some(wrap(dv, v.dims(), None)),
            ])
        }
    }

    /// The fused kernels' output for checked inputs on a CUDA device, or `None` when they do not take
    /// this dtype or head dim. RoPE, when asked for, is applied first by the rope op.
    pub(super) fn attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        opts: &AttentionOptions,
        (key_valid, segments): (Option<&[u8]>, Option<&[i64]>),
        scale: f32,
    ) -> Result<Option<Tensor>> {
        let (&[batch, sq, heads, head_dim], &[_, sk, kv_heads, _]) = (q.dims(), k.dims()) else {
            unreachable!("shapes checked by flash_attention")
        };
        let dtype = q.dtype();
        if !flash::supports(dtype, head_dim) || k.dtype() != dtype || v.dtype() != dtype {
            return Ok(None);
        }
        let (q, k) = match opts.rotary {
            Some(r) => {
                let (q, k) = rotate(&q.transpose(1, 2)?, &k.transpose(1, 2)?, r)?;
                (q.transpose(1, 2)?, k.transpose(1, 2)?)
            }
            None => (q.clone(), k.clone()),
        };
        let shape = FlashShape {
            batch,
            sq,
            sk,
            heads,
            kv_heads,
            head_dim,
        };
        let (qs, ks, vs) = (cuda(&q), cuda(&k), cuda(v));
        let mask = FlashMask::new(
            qs.device(),
            shape,
            opts.causal,
            opts.window,
            key_valid,
            segments,
        )?;
        let (o, lse) = flash::forward(
            (&qs, q.layout()),
            (&ks, k.layout()),
            (&vs, v.layout()),
            shape,
            &mask,
            scale,
        )?;
        let op = Op::Custom(
            vec![q.clone(), k.clone(), v.clone()],
            Arc::new(FlashBackward {
                shape,
                mask,
                scale,
                lse,
            }),
        );
        Ok(Some(wrap(o, q.dims(), Some(op))))
    }
}
