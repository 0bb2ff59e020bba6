//! Indexing kernels on contiguous inputs viewed as [outer, dim, inner]: index_select, index_add, gather,
//! scatter_add and cat. Indices are validated by the caller.

use super::{map_typed, CpuStorage};
use crate::dtype::DType;
use crate::layout::Layout;
use rayon::prelude::*;

/// Sizes of a tensor around the indexed dim: [outer, size, inner].
pub type Split = (usize, usize, usize);

impl CpuStorage {
    /// index_select along the middle dim of a contiguous view [outer, size, inner].
    pub fn index_select(
        &self,
        layout: &Layout,
        (outer, size, inner): Split,
        ids: &[i64],
    ) -> CpuStorage {
        let range = layout
            .contiguous_range()
            .expect("caller passes a contiguous view");
        map_typed!(self, |v| index_select(
            &v[range.clone()],
            outer,
            size,
            inner,
            ids
        ))
    }

    /// Joins contiguous views along the middle dim; part p is [outer, sizes[p], inner], all of one dtype.
    pub fn cat(
        parts: &[(&CpuStorage, &Layout)],
        sizes: &[usize],
        outer: usize,
        inner: usize,
    ) -> CpuStorage {
        let (first, _) = parts[0];
        let range = |l: &Layout| {
            l.contiguous_range()
                .expect("caller passes contiguous views")
        };
        macro_rules! slices {
            ($as:ident) => {
                parts
                    .iter()
                    .map(|(s, l)| &s.$as().expect("one dtype")[range(l)])
                    .collect::<Vec<_>>()
            };
        }
        match first.dtype() {
            DType::F32 => CpuStorage::F32(cat(&slices!(as_f32), sizes, outer, inner)),
            DType::F16 => CpuStorage::F16(cat(&slices!(as_f16), sizes, outer, inner)),
            DType::BF16 => CpuStorage::BF16(cat(&slices!(as_bf16), sizes, outer, inner)),
            DType::I32 => CpuStorage::I32(cat(&slices!(as_i32), sizes, outer, inner)),
            DType::I8 => CpuStorage::I8(cat(&slices!(as_i8), sizes, outer, inner)),
            DType::U8 => CpuStorage::U8(cat(&slices!(as_u8), sizes, outer, inner)),
        }
    }
}

/// out[o, i, n] = src[o, ids[i], n]; `src` is [outer, dim, inner].
pub fn index_select<T: Copy + Send + Sync + Default>(
    src: &[T],
    outer: usize,
    dim: usize,
    inner: usize,
    ids: &[i64],
) -> Vec<T> {
    let mut out = vec![T::default(); outer * ids.len() * inner];
    if inner == 0 || ids.is_empty() {
        return out;
    }
    out.par_chunks_mut(ids.len() * inner)
        .enumerate()
        .for_each(|(o, block)| {
            for (i, &id) in ids.iter().enumerate() {
                let s = (o * dim + id as usize) * inner;
                block[i * inner..(i + 1) * inner].copy_from_slice(&src[s..s + inner]);
            }
        });
    out
}

/// base[o, ids[i], n] += src[o, i, n]; `base` is [outer, dim, inner], `src` is [outer, ids.len(), inner].
pub fn index_add(
    base: &mut [f32],
    outer: usize,
    dim: usize,
    inner: usize,
    ids: &[i64],
    src: &[f32],
) {
    if inner == 0 || dim == 0 {
        return;
    }
    base.par_chunks_mut(dim * inner)
        .enumerate()
        .take(outer)
        .for_each(|(o, block)| {
            for (i, &id) in ids.iter().enumerate() {
                let s = (o * ids.len() + i) * inner;
                let d = id as usize * inner;
                for (b, &v) in block[d..d + inner].iter_mut().zip(&src[s..s + inner]) {
                    *b += v;
                }
            }
        });
}

/// out[o, j, n] = src[o, ids[o, j, n], n]; `src` is [outer, dim, inner], `ids` is [outer, k, inner].
pub fn gather(
    src: &[f32],
    outer: usize,
    dim: usize,
    inner: usize,
    ids: &[i64],
    k: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; outer * k * inner];
    for o in 0..outer {
        for j in 0..k {
            for n in 0..inner {
                let at = (o * k + j) * inner + n;
                out[at] = src[(o * dim + ids[at] as usize) * inner + n];
            }
        }
    }
    out
}

/// base[o, ids[o, j, n], n] += src[o, j, n].
pub fn scatter_add(
    base: &mut [f32],
    dim: usize,
    inner: usize,
    ids: &[i64],
    src: &[f32],
    outer: usize,
    k: usize,
) {
    for o in 0..outer {
        for j in 0..k {
            for n in 0..inner {
                let at = (o * k + j) * inner + n;
                base[(o * dim + ids[at] as usize) * inner + n] += src[at];
            }
        }
    }
}

/// Concatenates contiguous parts along a dim: part p is [outer, sizes[p], inner].
pub fn cat<T: Copy>(parts: &[&[T]], sizes: &[usize], outer: usize, inner: usize) -> Vec<T> {
    let total: usize = sizes.iter().sum();
    let mut out = Vec::with_capacity(outer * total * inner);
    for o in 0..outer {
        for (p, &s) in parts.iter().zip(sizes) {
            out.extend_from_slice(&p[o * s * inner..(o + 1) * s * inner]);
        }
    }
    out
}
