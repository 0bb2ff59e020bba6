//! Fuzzes the GGUF reader: any bytes must parse to `Ok` or `Err`, and when they parse, every
//! accessor (metadata values and typed getters, tensor infos, `tensor` and `qtensor` for every
//! tensor) must return `Ok` or `Err` too: never a panic, an out-of-bounds read or a huge
//! allocation. A few cheap invariants are asserted along the way, so a wrong answer crashes too.

#![no_main]

use libfuzzer_sys::fuzz_target;
use trit::io::gguf::{Gguf, TensorType};
use trit::quant::gguf::{from_qtensor, to_qtensor, GgmlType};
use trit::Device;

fuzz_target!(|data: &[u8]| {
    let Ok(g) = Gguf::from_bytes(data, "fuzz") else {
        return;
    };
    assert!(matches!(g.version(), 2 | 3));
    assert_eq!(g.path(), "fuzz");
    assert!(g.alignment().is_power_of_two());

    for (key, v) in g.metadata() {
        let _ = v.to_string();
        let _ = (
            v.as_u64(),
            v.as_i64(),
            v.as_f64(),
            v.as_str(),
            v.type_name(),
        );
        if let Some(a) = v.as_array() {
            for e in a.iter().take(16) {
                let _ = (e.to_string(), e.as_i64(), e.as_str());
            }
        }
        // By identity: a NaN value is not `==` to itself.
        assert!(g.get(key).is_ok_and(|got| std::ptr::eq(got, v)));
        // Each typed getter either succeeds or says why; its error message formats the value.
        let _ = g.get_u64(key).map_err(|e| e.to_string());
        let _ = g.get_f64(key).map_err(|e| e.to_string());
        let _ = g.get_str(key).map_err(|e| e.to_string());
        let _ = g.get_str_array(key).map_err(|e| e.to_string());
        let _ = g.get_i64_array(key).map_err(|e| e.to_string());
    }
    assert!(g.get("\u{0}fuzz: no such key").is_err());
    assert!(g.info("\u{0}fuzz: no such tensor").is_err());

    for info in g.tensors() {
        assert!(info.start <= info.end && info.end <= data.len());
        assert!(g.info(&info.name).is_ok_and(|got| std::ptr::eq(got, info)));
        let bytes = g.bytes(info);
        let (bw, bb) = info.ty.block();
        assert_eq!(bytes.len(), info.elem_count() / bw * bb);
        let _ = (info.ty.name(), info.ty.id());

        match g.tensor(&info.name, Device::Cpu) {
            Ok(t) => {
                assert_eq!(t.dims(), &info.shape[..]);
                assert_eq!(t.to_vec_f32().len(), info.elem_count());
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
        assert!(g.tensor(&info.name, Device::Cuda(0)).is_err());

        match g.qtensor(&info.name) {
            Ok(q) => {
                let TensorType::Quant(ty) = info.ty else {
                    panic!("qtensor accepted non-block type {:?}", info.ty)
                };
                assert_eq!(q.rows() * q.cols(), info.elem_count());
                assert_eq!(q.dequantize().len(), info.elem_count());
                // What the reader accepted writes back to the very same blocks (writing fails
                // only for a scale f16 cannot hold exactly, such as a NaN).
                if let Ok(back) = from_qtensor(&q, ty) {
                    if ty == GgmlType::Tq1_0 {
                        // A TQ1_0 byte has non-canonical spellings of the same five digits (256
                        // byte values for 243 digit strings); the reader repacks them
                        // canonically, so compare what the written blocks read back as.
                        let again = to_qtensor(ty, &back, q.rows(), q.cols()).expect("re-read");
                        assert_eq!(again.data(), q.data(), "TQ1_0 digits do not round-trip");
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(again.scales()), bits(q.scales()));
                    } else {
                        assert_eq!(back, bytes, "{ty:?} blocks do not round-trip");
                    }
                }
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
});
