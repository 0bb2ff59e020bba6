//! Tensors through safetensors files and training checkpoints.

use std::collections::BTreeMap;
use std::path::PathBuf;
use trit::io::checkpoint;
use trit::{DType, Device, Error, Rng, Tensor};

fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("trit-io-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("file.safetensors")
}

#[test]
fn tensors_round_trip_every_dtype_and_views() {
    let path = temp_path("roundtrip");
    let base = Tensor::arange_f32(0.0, 12.0, 1.0, Device::Cpu)
        .unwrap()
        .reshape((3, 4))
        .unwrap();
    let tensors = vec![
        ("f32_t".to_string(), base.t().unwrap()),
        ("f16".to_string(), base.to_dtype(DType::F16).unwrap()),
        ("bf16".to_string(), base.to_dtype(DType::BF16).unwrap()),
        (
            "i32".to_string(),
            Tensor::arange(-3, 3, Device::Cpu).unwrap(),
        ),
        (
            "u8".to_string(),
            Tensor::from_slice(&[7u8, 200], Device::Cpu).unwrap(),
        ),
        (
            "i8".to_string(),
            Tensor::from_slice(&[-7i8], Device::Cpu).unwrap(),
        ),
        (
            "scalar".to_string(),
            Tensor::scalar_tensor(2.5f32, Device::Cpu).unwrap(),
        ),
    ];
    let meta = BTreeMap::from([("note".to_string(), "hello".to_string())]);
    trit::io::save_safetensors(&path, &tensors, &meta).unwrap();
    let loaded = trit::io::load_safetensors(&path, Device::Cpu).unwrap();
    assert_eq!(loaded.len(), tensors.len());
    for (name, t) in &tensors {
        let l = &loaded[name];
        assert_eq!(l.dims(), t.dims(), "{name}");
        assert_eq!(l.dtype(), t.dtype(), "{name}");
        assert_eq!(l.to_le_bytes().unwrap(), t.to_le_bytes().unwrap(), "{name}");
    }
    assert_eq!(
        loaded["f32_t"].to_vec::<f32>().unwrap()[..4],
        [0.0, 4.0, 8.0, 1.0]
    );
    // Loaded tensors are usable in ops and as parameters.
    let doubled = loaded["f32_t"].mul_scalar(2.0).unwrap();
    assert_eq!(doubled.to_vec::<f32>().unwrap()[1], 8.0);
}

#[test]
fn malformed_file_is_an_error_naming_the_problem() {
    let path = temp_path("malformed");
    std::fs::write(&path, [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, b'{']).unwrap();
    let err = trit::io::load_safetensors(&path, Device::Cpu).unwrap_err();
    assert!(matches!(err, Error::SafeTensors { .. }), "{err}");
    assert!(err.to_string().contains("header"), "{err}");
    let missing = trit::io::load_safetensors(path.with_file_name("nope.safetensors"), Device::Cpu)
        .unwrap_err();
    assert!(matches!(missing, Error::Io { .. }), "{missing}");
}

#[test]
fn checkpoint_round_trips_exactly_and_rejects_foreign_files() {
    let path = temp_path("ckpt");
    let mut rng = Rng::new(11);
    let w = Tensor::randn((5, 3), 0.0, 1.0, &mut rng, Device::Cpu)
        .unwrap()
        .var()
        .unwrap();
    let m = Tensor::randn((5, 3), 0.0, 1.0, &mut rng, Device::Cpu).unwrap();
    let meta = BTreeMap::from([("config".to_string(), "{\"d\":3}".to_string())]);
    checkpoint::save(
        &path,
        &[("w".into(), w.clone())],
        &[("w.m".into(), m.clone())],
        42,
        &rng,
        &meta,
    )
    .unwrap();
    let ck = checkpoint::load(&path).unwrap();
    assert_eq!(ck.step, 42);
    assert_eq!(ck.rng, rng);
    assert_eq!(ck.metadata["config"], "{\"d\":3}");
    assert_eq!(
        ck.params["w"].to_vec::<f32>().unwrap(),
        w.to_vec::<f32>().unwrap()
    );
    assert_eq!(
        ck.optimizer["w.m"].to_vec::<f32>().unwrap(),
        m.to_vec::<f32>().unwrap()
    );
    // Overwriting the checkpoint while its tensors are alive is safe: they were copied out.
    checkpoint::save(
        &path,
        &[("w".into(), w.mul_scalar(0.0).unwrap())],
        &[],
        43,
        &rng,
        &meta,
    )
    .unwrap();
    assert_eq!(
        ck.params["w"].to_vec::<f32>().unwrap(),
        w.to_vec::<f32>().unwrap()
    );

    let plain = temp_path("plain");
    trit::io::save_safetensors(&plain, &[("w".into(), w)], &BTreeMap::new()).unwrap();
    let err = checkpoint::load(&plain).err().expect("not a checkpoint");
    assert!(err.to_string().contains("not a trit checkpoint"), "{err}");
}
