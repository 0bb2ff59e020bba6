//! Placeholder naive GEMM with the final API, replaced by the blocked kernel.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Portable,
}

#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

pub fn sgemm(m: usize, n: usize, k: usize, a: MatRef, b: MatRef, c: &mut [f32], accumulate: bool) {
    for i in 0..m {
        for j in 0..n {
            let mut s = if accumulate { c[i * n + j] } else { 0.0 };
            for p in 0..k {
                s += a.data[i * a.rs + p * a.cs] * b.data[p * b.rs + j * b.cs];
            }
            c[i * n + j] = s;
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn sgemm_batched(
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    abs: usize,
    b: MatRef,
    bbs: usize,
    c: &mut [f32],
    accumulate: bool,
) {
    for i in 0..batch {
        let a = MatRef {
            data: &a.data[(i * abs).min(a.data.len())..],
            ..a
        };
        let b = MatRef {
            data: &b.data[(i * bbs).min(b.data.len())..],
            ..b
        };
        sgemm(
            m,
            n,
            k,
            a,
            b,
            &mut c[i * m * n..(i + 1) * m * n],
            accumulate,
        );
    }
}
