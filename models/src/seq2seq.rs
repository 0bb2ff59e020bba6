//! Byte-level batches for the recipes' encoder-decoders: a text is its UTF-8 bytes (ids 0–255) with three
//! special ids after them. A source is its bytes, right-padded; a target is its bytes then EOS, fed to the
//! decoder shifted right behind BOS (teacher forcing), with padding positions ignored by the loss.

use trit::{Device, Result, Tensor};

/// Starts every decoder input.
pub const BOS: u32 = 256;
/// Ends every target.
pub const EOS: u32 = 257;
/// Fills sources and decoder inputs past their end.
pub const PAD: u32 = 258;
/// Bytes plus the three special ids.
pub const VOCAB: usize = 259;
/// The target of a padding position (skipped by cross-entropy).
pub const IGNORE: i64 = -100;

/// One batch: `source` and `source_mask` [b, S], `decoder_input` and `targets` [b, T], all i32.
#[derive(Clone, Debug)]
pub struct Batch {
    pub source: Tensor,
    pub source_mask: Tensor,
    pub decoder_input: Tensor,
    pub targets: Tensor,
}

/// The ids of a source text: its bytes, at most `max_len`.
pub fn source_ids(text: &str, max_len: usize) -> Vec<u32> {
    text.bytes().take(max_len).map(u32::from).collect()
}

/// The text of generated ids: the bytes before the first EOS (special ids dropped), decoded lossily.
pub fn text_of(ids: &[u32]) -> String {
    let bytes: Vec<u8> = ids
        .iter()
        .take_while(|&&t| t != EOS)
        .filter_map(|&t| u8::try_from(t).ok())
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A batch of (source, target) texts: sources cut to `max_source` bytes, targets to `max_target`
/// tokens including their EOS (a cut target has no EOS), each side padded to its longest member.
pub fn batch(
    pairs: &[(String, String)],
    max_source: usize,
    max_target: usize,
    device: Device,
) -> Result<Batch> {
    if pairs.is_empty() || max_source == 0 || max_target == 0 {
        trit::bail!(
            "seq2seq batch",
            "need at least one pair and positive lengths, got {} pairs, {max_source}, {max_target}",
            pairs.len()
        );
    }
    let sources: Vec<Vec<u32>> = pairs
        .iter()
        .map(|(s, _)| source_ids(s, max_source))
        .collect();
    let targets: Vec<Vec<u32>> = pairs
        .iter()
        .map(|(_, t)| {
            let mut ids: Vec<u32> = t.bytes().map(u32::from).collect();
            ids.push(EOS);
            ids.truncate(max_target);
            ids
        })
        .collect();
    let s_len = sources.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let t_len = targets.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let b = pairs.len();
    let (mut src, mut mask) = (Vec::with_capacity(b * s_len), Vec::with_capacity(b * s_len));
    for s in &sources {
        for j in 0..s_len {
            src.push(s.get(j).copied().unwrap_or(PAD) as i32);
            mask.push(i32::from(j < s.len()));
        }
    }
    let (mut dec, mut tgt) = (Vec::with_capacity(b * t_len), Vec::with_capacity(b * t_len));
    for t in &targets {
        for j in 0..t_len {
            dec.push(match j {
                0 => BOS as i32,
                _ if j < t.len() => t[j - 1] as i32,
                _ => PAD as i32,
            });
            tgt.push(t.get(j).map_or(IGNORE as i32, |&x| x as i32));
        }
    }
    Ok(Batch {
        source: Tensor::from_vec(src, (b, s_len), device)?,
        source_mask: Tensor::from_vec(mask, (b, s_len), device)?,
        decoder_input: Tensor::from_vec(dec, (b, t_len), device)?,
        targets: Tensor::from_vec(tgt, (b, t_len), device)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn pads_shifts_and_ignores() -> Result<()> {
        let b = batch(&pairs(&[("ab", "xyz"), ("c", "w")]), 8, 8, Device::Cpu)?;
        let (a, c, w, x, y, z) = (97, 99, 119, 120, 121, 122);
        let (bos, eos, pad, ign) = (BOS as i32, EOS as i32, PAD as i32, IGNORE as i32);
        assert_eq!(b.source.to_vec::<i32>()?, [a, a + 1, c, pad]);
        assert_eq!(b.source_mask.to_vec::<i32>()?, [1, 1, 1, 0]);
        assert_eq!(b.source.dims(), [2, 2]);
        assert_eq!(
            b.decoder_input.to_vec::<i32>()?,
            [bos, x, y, z, bos, w, pad, pad]
        );
        assert_eq!(b.targets.to_vec::<i32>()?, [x, y, z, eos, w, eos, ign, ign]);
        Ok(())
    }

    #[test]
    fn cuts_long_texts() -> Result<()> {
        let b = batch(&pairs(&[("abcdef", "uvwxyz")]), 3, 4, Device::Cpu)?;
        assert_eq!(b.source.to_vec::<i32>()?, [97, 98, 99]);
        // Four target tokens with no room for EOS; the decoder sees BOS and the first three.
        assert_eq!(b.targets.to_vec::<i32>()?, [117, 118, 119, 120]);
        assert_eq!(
            b.decoder_input.to_vec::<i32>()?,
            [BOS as i32, 117, 118, 119]
        );
        Ok(())
    }

    #[test]
    fn generated_ids_read_back_as_text() {
        assert_eq!(text_of(&[104, 105, EOS, 106]), "hi");
        assert_eq!(text_of(&[BOS, 104, PAD, 105]), "hi");
        assert_eq!(source_ids("héllo", 3), [104, 0xc3, 0xa9]);
    }

    #[test]
    fn empty_input_is_an_error() {
        assert!(batch(&[], 4, 4, Device::Cpu).is_err());
        assert!(batch(&pairs(&[("a", "b")]), 0, 4, Device::Cpu).is_err());
    }
}
