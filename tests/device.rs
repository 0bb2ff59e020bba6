//! Devices without a GPU: naming one is a clear `NoCudaDevice` error from every entry point (creation,
//! copies, training parameters), never a panic, with or without the `cuda` feature; device names parse.

use trit::{DType, Device, Error, Tensor};

/// True when this machine can actually open cuda:0 (then the no-GPU expectations do not apply).
fn has_gpu() -> bool {
    Device::Cuda(0).check().is_ok()
}

#[test]
fn device_names_parse() {
    assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
    assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
    assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
    for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
        assert!(
            matches!(bad.parse::<Device>(), Err(Error::InvalidArgument { .. })),
            "{bad:?} should not parse"
        );
    }
    assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
}

#[test]
fn a_missing_gpu_is_an_error_from_every_entry_point() {
    if has_gpu() {
        return;
    }
    let no_gpu = |r: trit::Result<Tensor>, what: &str| match r {
        Err(Error::NoCudaDevice(msg)) => assert!(msg.contains("cuda:"), "{what}: {msg}"),
        Err(e) => panic!("{what}: expected NoCudaDevice, got {e}"),
        Ok(_) => panic!("{what}: succeeded without a GPU"),
    };
    no_gpu(Tensor::zeros((2, 3), DType::F32, Device::Cuda(0)), "zeros");
    no_gpu(
        Tensor::from_vec(vec![1f32, 2.], 2, Device::Cuda(0)),
        "from_vec",
    );
    no_gpu(Tensor::arange(0, 4, Device::Cuda(1)), "arange");
    let x = Tensor::ones(3, DType::F32, Device::Cpu).unwrap();
    no_gpu(x.to_device(Device::Cuda(0)), "to_device");
    no_gpu(
        x.var().unwrap().to_device(Device::Cuda(0)),
        "a variable's to_device",
    );
    assert!(matches!(
        trit::nn::ParamStore::new(0, DType::F32, Device::Cuda(0)).get_or_init(
            "w",
            (2, 2),
            trit::nn::Init::Zeros
        ),
        Err(Error::NoCudaDevice(_))
    ));
    let q = trit::quant::QTensor::quantize(
        &[0.5, -0.25, 0.0, 1.0],
        2,
        2,
        trit::quant::QFormat::Int8 {
            group: trit::quant::Group::Row,
        },
    )
    .unwrap();
    assert!(matches!(
        q.prepare_device(Device::Cuda(0)),
        Err(Error::NoCudaDevice(_))
    ));
    assert_eq!(q.device_bytes(), 0);
    q.prepare_device(Device::Cpu).unwrap();
}

#[cfg(feature = "cuda")]
#[test]
fn the_probe_reports_what_is_missing() {
    if has_gpu() {
        return;
    }
    let err = trit::cuda::probe(0).expect_err("no GPU here");
    assert!(matches!(err, Error::NoCudaDevice(_)), "{err}");
    let err = trit::cuda::CudaDevice::get(0).expect_err("no GPU here");
    assert!(err.to_string().contains("cuda:0"), "{err}");
}
