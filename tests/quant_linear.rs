//! QuantLinear: training-mode gradients against hand-derived formulas, `freeze()` giving the same outputs
//! through the packed kernels, and errors.

use trit::nn::{ActQuant, ParamStore, QuantLinear, QuantLinearConfig};
use trit::quant::quantizers::{Granularity, Quantizer, TbtForm};
use trit::{DType, Device, Rng, Tensor};

fn randn(rng: &mut Rng, dims: (usize, usize), std: f32) -> Tensor {
    let v: Vec<f32> = (0..dims.0 * dims.1)
        .map(|_| rng.normal_f64() as f32 * std)
        .collect();
    Tensor::from_vec(v, dims, Device::Cpu).unwrap()
}

fn layer(cfg: QuantLinearConfig, in_dim: usize, out_dim: usize, seed: u64) -> QuantLinear {
    let params = ParamStore::new(seed, DType::F32, Device::Cpu);
    QuantLinear::new(&params, in_dim, out_dim, cfg).unwrap()
}

/// Training mode and frozen mode on the same input: equal up to f32 summation order, measured against
/// Σ|x̂|·|ŵ| of each output, which bounds the size of the rounding error of either sum.
fn check_freeze(cfg: QuantLinearConfig, relu_input: bool, what: &str) {
    let (m, k, n) = (5, 300, 70);
    let mut rng = Rng::new(11);
    let mut lin = layer(cfg, k, n, 3);
    let mut x = randn(&mut rng, (m, k), 1.0);
    if relu_input {
        x = x.relu().unwrap();
    }
    let train = lin.forward(&x).unwrap().to_vec_f32();
    let wq = lin.quantized_weight().unwrap().to_vec_f32();
    lin.freeze().unwrap();
    assert!(lin.is_frozen());
    let frozen = lin.forward(&x).unwrap().to_vec_f32();
    let xs = x.to_vec_f32();
    for i in 0..m {
        for j in 0..n {
            let scale: f32 = (0..k)
                .map(|p| xs[i * k + p].abs() * wq[j * k + p].abs())
                .sum::<f32>()
                .max(1e-6);
            let (a, b) = (train[i * n + j], frozen[i * n + j]);
            assert!(
                (a - b).abs() <= 1e-5 * scale + 1e-6,
                "{what}: y[{i},{j}] training {a} vs frozen {b} (scale {scale})"
            );
        }
    }
}

#[test]
fn frozen_layers_compute_what_training_mode_computes() {
    let tbt = |w: Quantizer, bits: u32, signed: bool| QuantLinearConfig {
        weight: w,
        act: ActQuant::Elastic { bits, signed },
        bias: true,
    };
    check_freeze(
        tbt(Quantizer::TbtTernary(TbtForm::Paper), 2, true),
        false,
        "TBT 2-2 signed",
    );
    check_freeze(
        tbt(Quantizer::TbtTernary(TbtForm::Code), 2, false),
        true,
        "TBT 2-2 unsigned",
    );
    check_freeze(
        tbt(Quantizer::TbtBinary(TbtForm::Paper), 1, true),
        false,
        "TBT 1-1 (XNOR-popcount)",
    );
    check_freeze(
        tbt(Quantizer::TbtTernary(TbtForm::Paper), 4, true),
        false,
        "TBT 2-4",
    );
    check_freeze(
        tbt(Quantizer::TbtBinary(TbtForm::Code), 8, true),
        false,
        "TBT 1-8 (min-max input)",
    );
    check_freeze(
        QuantLinearConfig::llm_qat(4, Some(8)),
        false,
        "LLM-QAT W4A8",
    );
    check_freeze(
        QuantLinearConfig::llm_qat(8, Some(8)),
        false,
        "LLM-QAT W8A8",
    );
    check_freeze(QuantLinearConfig::llm_qat(4, None), false, "LLM-QAT W4A16");
    for (w, what) in [
        (Quantizer::Twn, "TWN"),
        (Quantizer::Bwn, "BWN"),
        (
            Quantizer::MinMax {
                bits: 4,
                symmetric: false,
            },
            "RTN W4 asym",
        ),
    ] {
        check_freeze(
            QuantLinearConfig {
                weight: w,
                act: ActQuant::None,
                bias: false,
            },
            false,
            what,
        );
    }
    check_freeze(
        QuantLinearConfig {
            weight: Quantizer::LlmQat {
                bits: 4,
                symmetric: true,
            },
            act: ActQuant::Rule(
                Quantizer::MinMax {
                    bits: 8,
                    symmetric: false,
                },
                Granularity::PerTensor,
            ),
            bias: false,
        },
        false,
        "asymmetric per-tensor input",
    );
}

#[test]
fn frozen_weights_are_the_packed_codes() {
    let mut lin = layer(QuantLinearConfig::llm_qat(4, Some(8)), 64, 8, 5);
    let wq = lin.quantized_weight().unwrap().to_vec_f32();
    lin.freeze().unwrap();
    let q = lin.packed().unwrap();
    assert_eq!(q.rows(), 8);
    assert_eq!(q.dequantize(), wq);
    // 4 bits per weight plus one f32 scale per row.
    assert_eq!(q.byte_size(), 8 * 64 + 8 * 4);
    lin.unfreeze();
    assert!(!lin.is_frozen());
}

#[test]
fn training_gradients_follow_the_straight_through_rule() {
    // LLM-QAT W4A8 with weights far below 2: the STE passes everything, so dL/dW = gᵀ·x̂ exactly
    // (x̂ the quantized input), and dL/db = Σ_rows g.
    let (m, k, n) = (4, 40, 6);
    let mut rng = Rng::new(2);
    let lin = layer(
        QuantLinearConfig {
            bias: true,
            ..QuantLinearConfig::llm_qat(4, Some(8))
        },
        k,
        n,
        9,
    );
    let x = randn(&mut rng, (m, k), 1.0);
    let g = randn(&mut rng, (m, n), 1.0);
    let loss = lin.forward(&x).unwrap().mul(&g).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let xq = Quantizer::LlmQat {
        bits: 8,
        symmetric: true,
    }
    .fake_quant(&x, Granularity::PerRow)
    .unwrap()
    .to_vec_f32();
    let gs = g.to_vec_f32();
    let dw = grads.get(lin.weight()).unwrap().to_vec_f32();
    for j in 0..n {
        for p in 0..k {
            let want: f64 = (0..m)
                .map(|i| gs[i * n + j] as f64 * xq[i * k + p] as f64)
                .sum();
            assert!((dw[j * k + p] as f64 - want).abs() < 1e-5, "dW[{j},{p}]");
        }
    }
    let db = grads.get(lin.bias().unwrap()).unwrap().to_vec_f32();
    for j in 0..n {
        let want: f32 = (0..m).map(|i| gs[i * n + j]).sum();
        assert!((db[j] - want).abs() < 1e-5);
    }

    // With an elastic input quantizer, α is a parameter and receives a gradient.
    let lin = layer(
        QuantLinearConfig {
            weight: Quantizer::TbtTernary(TbtForm::Paper),
            act: ActQuant::Elastic {
                bits: 2,
                signed: true,
            },
            bias: false,
        },
        k,
        n,
        4,
    );
    let loss = lin.forward(&x).unwrap().mul(&g).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let alpha = lin.elastic().unwrap().alpha();
    assert!(grads
        .get(alpha)
        .is_some_and(|d| d.to_scalar().unwrap() != 0.0));
    assert!(grads.get(lin.weight()).is_some());
}

#[test]
fn bad_input_is_an_error() {
    let mut lin = layer(QuantLinearConfig::llm_qat(4, Some(8)), 16, 4, 1);
    let x = Tensor::zeros((2, 15), DType::F32, Device::Cpu).unwrap();
    assert!(lin.forward(&x).is_err());
    lin.freeze().unwrap();
    assert!(lin.forward(&x).is_err());
    let mut asym8 = layer(
        QuantLinearConfig {
            weight: Quantizer::MinMax {
                bits: 8,
                symmetric: false,
            },
            act: ActQuant::None,
            bias: false,
        },
        16,
        4,
        1,
    );
    assert!(asym8.freeze().is_err());
    let params = ParamStore::new(0, DType::F32, Device::Cpu);
    assert!(QuantLinear::new(&params, 0, 4, QuantLinearConfig::llm_qat(4, None)).is_err());
}
