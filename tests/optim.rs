//! Optimizers, schedules and clipping against f64 re-implementations of torch.optim's update rules.

use std::collections::BTreeMap;
use trit::optim::{clip_grad_norm, AdamW, AdamWConfig, Optimizer, Sgd, SgdConfig};
use trit::{Device, GradStore, Rng, Tensor};

fn var(v: &[f32]) -> Tensor {
    Tensor::from_slice(v, Device::Cpu).unwrap().var().unwrap()
}

fn grads_for(p: &Tensor, g: &[f32]) -> GradStore {
    let mut store = GradStore::new();
    store.insert(p, Tensor::from_slice(g, Device::Cpu).unwrap());
    store
}

#[test]
fn adamw_matches_reference_over_steps() {
    let cfg = AdamWConfig {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let mut rng = Rng::new(3);
    let n = 50_000; // large enough to take the parallel path
    let p0: Vec<f32> = (0..n).map(|_| rng.normal_f64() as f32).collect();
    let p = var(&p0);
    let mut opt = AdamW::new(vec![("p".into(), p.clone())], cfg).unwrap();
    let (mut rp, mut m, mut v) = (
        p0.iter().map(|&x| x as f64).collect::<Vec<_>>(),
        vec![0f64; n],
        vec![0f64; n],
    );
    for t in 1..=5 {
        let g: Vec<f32> = (0..n).map(|_| rng.normal_f64() as f32).collect();
        opt.step(&grads_for(&p, &g)).unwrap();
        let (b1, b2, lr) = (cfg.beta1 as f64, cfg.beta2 as f64, cfg.lr as f64);
        for i in 0..n {
            let gi = g[i] as f64;
            rp[i] *= 1.0 - lr * cfg.weight_decay as f64;
            m[i] = b1 * m[i] + (1.0 - b1) * gi;
            v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
            let mhat = m[i] / (1.0 - b1.powi(t));
            let vhat = v[i] / (1.0 - b2.powi(t));
            rp[i] -= lr * mhat / (vhat.sqrt() + cfg.eps as f64);
        }
    }
    let got = p.to_vec::<f32>().unwrap();
    let worst = got
        .iter()
        .zip(&rp)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    assert!(worst < 1e-5, "worst abs error {worst}");
    assert_eq!(opt.steps(), 5);
}

#[test]
fn adamw_skips_params_without_grads_and_round_trips_state() {
    let (a, b) = (var(&[1.0, 2.0]), var(&[3.0]));
    let mut opt = AdamW::new(
        vec![("a".into(), a.clone()), ("b".into(), b.clone())],
        AdamWConfig::default(),
    )
    .unwrap();
    opt.step(&grads_for(&a, &[0.5, -0.5])).unwrap();
    assert_eq!(b.to_vec::<f32>().unwrap(), vec![3.0]);
    let state: BTreeMap<String, Tensor> = opt
        .state()
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.copy().unwrap()))
        .collect();
    let mut fresh = AdamW::new(
        vec![("a".into(), var(&[1.0, 2.0])), ("b".into(), var(&[3.0]))],
        AdamWConfig::default(),
    )
    .unwrap();
    fresh.load_state(&state).unwrap();
    assert_eq!(fresh.steps(), 1);
    let m = fresh
        .state()
        .unwrap()
        .into_iter()
        .find(|(k, _)| k == "a.m")
        .unwrap()
        .1;
    let m = m.to_vec::<f32>().unwrap();
    assert!(
        (m[0] - 0.05).abs() < 1e-6 && (m[1] + 0.05).abs() < 1e-6,
        "{m:?}"
    );
    let mut missing = state.clone();
    missing.remove("b.v");
    assert!(fresh.load_state(&missing).is_err());
}

#[test]
fn sgd_momentum_matches_reference() {
    let cfg = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 0.01,
        nesterov: false,
    };
    let p = var(&[1.0, -2.0]);
    let mut opt = Sgd::new(vec![("p".into(), p.clone())], cfg).unwrap();
    let (mut rp, mut buf) = ([1.0f64, -2.0], [0f64; 2]);
    for g in [[0.5f32, 1.0], [-0.25, 0.5], [1.0, -1.0]] {
        opt.step(&grads_for(&p, &g)).unwrap();
        for i in 0..2 {
            let gi = g[i] as f64 + 0.01 * rp[i];
            buf[i] = 0.9 * buf[i] + gi;
            rp[i] -= 0.1 * buf[i];
        }
    }
    let got = p.to_vec::<f32>().unwrap();
    for i in 0..2 {
        assert!((got[i] as f64 - rp[i]).abs() < 1e-6, "{got:?} vs {rp:?}");
    }
}

#[test]
fn clipping_scales_to_max_norm() {
    let (a, b) = (var(&[0.0, 0.0]), var(&[0.0]));
    let mut grads = grads_for(&a, &[3.0, 0.0]);
    grads.insert(&b, Tensor::from_slice(&[4.0f32], Device::Cpu).unwrap());
    let norm = clip_grad_norm(&[a.clone(), b.clone()], &mut grads, 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-6);
    let ga = grads.get(&a).unwrap().to_vec::<f32>().unwrap();
    let gb = grads.get(&b).unwrap().to_vec::<f32>().unwrap();
    assert!((ga[0] - 0.6).abs() < 1e-5 && (gb[0] - 0.8).abs() < 1e-5);
    let norm = clip_grad_norm(&[a.clone(), b], &mut grads, 10.0).unwrap();
    assert!((norm - 1.0).abs() < 1e-4);
    assert!((grads.get(&a).unwrap().to_vec::<f32>().unwrap()[0] - 0.6).abs() < 1e-5);
}

#[test]
fn a_gradient_sharing_the_parameters_storage_does_not_deadlock() {
    // A hand-built store may hold the parameter itself as its gradient; the update reads the gradient
    // while writing the parameter, so the optimizers must copy it first.
    let p = var(&[2.0, -4.0]);
    let mut grads = GradStore::new();
    grads.insert(&p, p.clone());
    let cfg = SgdConfig {
        lr: 0.5,
        momentum: 0.0,
        weight_decay: 0.0,
        nesterov: false,
    };
    Sgd::new(vec![("p".into(), p.clone())], cfg)
        .unwrap()
        .step(&grads)
        .unwrap();
    assert_eq!(p.to_vec::<f32>().unwrap(), vec![1.0, -2.0]);
    let mut adam = AdamW::new(
        vec![("p".into(), p.clone())],
        AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
    )
    .unwrap();
    adam.step(&grads).unwrap();
    let got = p.to_vec::<f32>().unwrap();
    assert!(
        (got[0] - 0.999).abs() < 1e-5 && (got[1] + 1.999).abs() < 1e-5,
        "{got:?}"
    );
}
