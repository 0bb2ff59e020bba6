//! Fuzzes the safetensors reader: any bytes must parse to `Ok` or `Err`, and when they parse,
//! every accessor must work and every entry must load as a tensor (`io::tensors::tensors`, the
//! path `load_safetensors` and `checkpoint::load` take) whose values read back without a panic
//! and whose little-endian bytes are exactly the entry's bytes in the file.

#![no_main]

use libfuzzer_sys::fuzz_target;
use trit::io::safetensors::SafeTensors;
use trit::io::tensors;
use trit::Device;

fuzz_target!(|data: &[u8]| {
    let Ok(st) = SafeTensors::from_bytes(data.to_vec(), "fuzz") else {
        return;
    };
    assert_eq!(st.path(), "fuzz");
    assert_eq!(st.backing().as_bytes(), data);
    for (k, v) in st.metadata() {
        let _ = (k.len(), v.len());
    }

    for e in st.entries() {
        assert!(e.start <= e.end && e.end <= data.len());
        let bytes = st.bytes(e);
        assert_eq!(
            bytes.len(),
            e.shape.iter().product::<usize>() * e.dtype.size_in_bytes()
        );
        assert_eq!(st.get(&e.name), Some(e));
        assert_eq!(st.require(&e.name).ok(), Some(e));
    }
    for u in st.unsupported() {
        assert!(u.start <= u.end && u.end <= data.len());
        if st.get(&u.name).is_none() {
            assert!(st.require(&u.name).is_err());
        }
    }
    assert!(st.require("\u{0}fuzz: no such tensor").is_err());

    assert!(tensors::tensors(&st, Device::Cuda(0)).is_err());
    let loaded = match tensors::tensors(&st, Device::Cpu) {
        Ok(t) => t,
        Err(e) => panic!("a validated file failed to load: {e}"),
    };
    assert_eq!(loaded.len(), st.entries().len());
    for (name, t) in &loaded {
        let e = st.get(name).expect("loaded tensor has an entry");
        assert_eq!(t.dims(), &e.shape[..]);
        assert_eq!(t.dtype(), e.dtype);
        assert_eq!(t.to_le_bytes(), st.bytes(e));
        assert_eq!(t.to_vec_f32().len(), e.shape.iter().product::<usize>());
        // What checkpoint::load does with every tensor.
        let owned = t.contiguous().and_then(|c| c.copy()).expect("copy");
        assert_eq!(owned.to_le_bytes(), st.bytes(e));
    }
});
