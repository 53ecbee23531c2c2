//! GPTQ bit packing (MODEL_SPEC §4.1–4.2), for every supported width with one rule:
//! a lane of values is cut into blocks of 32; a block occupies `bits` consecutive 32-bit words that are read as
//! one little-endian integer of `32·bits` bits, and value `k` of the block sits at bit `bits·k`.
//! For 2/4/8 bits no value crosses a word; for 3 bits values k = 10 and k = 21 straddle two words, which is
//! exactly AutoGPTQ's `pack()` loop (checked against a transcription of that loop in the tests).
//!
//! `qweight` packs along the input dim (its lane is a column), `qzeros` along the output dim (a lane is a row).
//! Words are `u32` so shifts are logical; int32 tensors from the checkpoint are reinterpreted bit for bit.

use crate::{Bits, Error, GptqLayout, Result};

/// Word index within the lane and bit offset within that word of value `k`.
#[inline]
fn locate(bits: Bits, k: usize) -> (usize, u32) {
    let b = bits.get() as usize;
    let bit = b * (k % 32);
    ((k / 32) * b + bit / 32, (bit % 32) as u32)
}

/// Reads value `k` of a lane whose `w`-th word is `word(w)`.
#[inline]
pub fn read_field(bits: Bits, k: usize, word: impl Fn(usize) -> u32) -> u32 {
    let (w, shift) = locate(bits, k);
    let mut v = word(w) >> shift;
    // Only 3-bit fields at k mod 32 = 10 or 21 reach past the word (shift 30 or 31).
    if shift + bits.get() > 32 {
        v |= word(w + 1) << (32 - shift);
    }
    v & bits.max_value()
}

/// ORs value `k` into a lane; `slot(w)` maps the lane's word `w` to an index of `words`.
#[inline]
fn write_field(bits: Bits, k: usize, value: u32, words: &mut [u32], slot: impl Fn(usize) -> usize) {
    let (w, shift) = locate(bits, k);
    words[slot(w)] |= value << shift;
    if shift + bits.get() > 32 {
        words[slot(w + 1)] |= value >> (32 - shift);
    }
}

/// One field of a `qweight` `[in·bits/32, out]` (row-major): input row `row`, output column `col`.
#[inline]
pub fn qweight_field(qweight: &[u32], out_features: usize, bits: Bits, row: usize, col: usize) -> u32 {
    read_field(bits, row, |w| qweight[w * out_features + col])
}

/// One field of a `qzeros` `[groups, out·bits/32]` (row-major): group `group`, output column `col`.
#[inline]
pub fn qzeros_field(qzeros: &[u32], out_features: usize, bits: Bits, group: usize, col: usize) -> u32 {
    let words_per_row = out_features / 32 * bits.get() as usize;
    read_field(bits, col, |w| qzeros[group * words_per_row + w])
}

fn check_len(what: &'static str, expected: usize, found: usize) -> Result<()> {
    if expected == found { Ok(()) } else { Err(Error::Length { what, expected, found }) }
}

fn check_values(values: &[u8], bits: Bits) -> Result<()> {
    match values.iter().position(|&v| u32::from(v) > bits.max_value()) {
        Some(index) => Err(Error::ValueOutOfRange { index, value: u32::from(values[index]), bits: bits.get() }),
        None => Ok(()),
    }
}

/// Unpacks a `qweight` into its integer fields, row-major `[in, out]`.
pub fn unpack_qweight(qweight: &[u32], layout: &GptqLayout) -> Result<Vec<u8>> {
    let [rows, cols] = layout.qweight_shape();
    check_len("qweight", rows * cols, qweight.len())?;
    let (n_in, n_out) = (layout.in_features, layout.out_features);
    let mut out = vec![0u8; n_in * n_out];
    for i in 0..n_in {
        for j in 0..n_out {
            out[i * n_out + j] = qweight_field(qweight, n_out, layout.bits, i, j) as u8;
        }
    }
    Ok(out)
}

/// Packs integer fields, row-major `[in, out]`, into a `qweight` `[in·bits/32, out]`.
pub fn pack_qweight(values: &[u8], layout: &GptqLayout) -> Result<Vec<u32>> {
    let (n_in, n_out) = (layout.in_features, layout.out_features);
    check_len("qweight values", n_in * n_out, values.len())?;
    check_values(values, layout.bits)?;
    let [rows, cols] = layout.qweight_shape();
    let mut words = vec![0u32; rows * cols];
    for i in 0..n_in {
        for j in 0..n_out {
            write_field(layout.bits, i, u32::from(values[i * n_out + j]), &mut words, |w| w * n_out + j);
        }
    }
    Ok(words)
}

/// Unpacks a `qzeros` into its stored fields (before the zero convention), row-major `[groups, out]`.
pub fn unpack_qzeros(qzeros: &[u32], layout: &GptqLayout) -> Result<Vec<u8>> {
    let [rows, cols] = layout.qzeros_shape();
    check_len("qzeros", rows * cols, qzeros.len())?;
    let n_out = layout.out_features;
    let mut out = vec![0u8; rows * n_out];
    for g in 0..rows {
        for j in 0..n_out {
            out[g * n_out + j] = qzeros_field(qzeros, n_out, layout.bits, g, j) as u8;
        }
    }
    Ok(out)
}

/// Packs stored zero fields, row-major `[groups, out]`, into a `qzeros` `[groups, out·bits/32]`.
/// The caller applies the zero convention first (v1 stores zero − 1).
pub fn pack_qzeros(values: &[u8], layout: &GptqLayout) -> Result<Vec<u32>> {
    let [rows, cols] = layout.qzeros_shape();
    let n_out = layout.out_features;
    check_len("qzeros values", rows * n_out, values.len())?;
    check_values(values, layout.bits)?;
    let mut words = vec![0u32; rows * cols];
    for g in 0..rows {
        for j in 0..n_out {
            write_field(layout.bits, j, u32::from(values[g * n_out + j]), &mut words, |w| g * cols + w);
        }
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GroupSize;

    fn layout(n_in: usize, n_out: usize, bits: Bits) -> GptqLayout {
        GptqLayout { in_features: n_in, out_features: n_out, bits, group_size: GroupSize::Rows(32) }
    }

    /// Hand-computed: k = 10 holds 5 (0b101) and k = 21 holds 7 (0b111) in one 3-bit block of one column.
    /// k = 10 → bits 30..32: w0 bit 30 = 1, w0 bit 31 = 0, w1 bit 0 = 1.
    /// k = 21 → bits 63..65: w1 bit 31 = 1, w2 bits 0,1 = 1.
    #[test]
    fn three_bit_straddlers() -> Result<()> {
        let l = layout(32, 32, Bits::B3);
        let mut q = vec![0u8; 32 * 32];
        q[10 * 32] = 5;
        q[21 * 32] = 7;
        let words = pack_qweight(&q, &l)?;
        assert_eq!(words.len(), 3 * 32);
        assert_eq!(words[0], 0x4000_0000);
        assert_eq!(words[32], 0x8000_0001);
        assert_eq!(words[64], 0x0000_0003);
        assert!(words.iter().enumerate().all(|(i, &w)| w == 0 || [0, 32, 64].contains(&i)));
        assert_eq!(unpack_qweight(&words, &l)?, q);
        // Neighbours of the straddlers read back zero, so no bit leaked across the boundary.
        assert_eq!(qweight_field(&words, 32, Bits::B3, 9, 0), 0);
        assert_eq!(qweight_field(&words, 32, Bits::B3, 11, 0), 0);
        assert_eq!(qweight_field(&words, 32, Bits::B3, 20, 0), 0);
        assert_eq!(qweight_field(&words, 32, Bits::B3, 22, 0), 0);
        Ok(())
    }

    /// The three word patterns of a 3-bit block with every field = 7 are all ones; with value 1 everywhere
    /// they are 0x49249249, 0x92492492, 0x24924924 (the repeating 001 pattern shifted by 0, 1, 2 bits).
    #[test]
    fn three_bit_repeating_pattern() -> Result<()> {
        let l = layout(32, 32, Bits::B3);
        let ones = pack_qweight(&vec![1u8; 32 * 32], &l)?;
        assert_eq!([ones[0], ones[32], ones[64]], [0x4924_9249, 0x9249_2492, 0x2492_4924]);
        let sevens = pack_qweight(&vec![7u8; 32 * 32], &l)?;
        assert!(sevens.iter().all(|&w| w == u32::MAX));
        Ok(())
    }

    #[test]
    fn two_bit_words() -> Result<()> {
        // Value k = k mod 4, 16 fields per word: 0,1,2,3 → 0b11_10_01_00 = 0xE4 per byte.
        let l = layout(32, 32, Bits::B2);
        let q: Vec<u8> = (0..32 * 32).map(|idx| ((idx / 32) % 4) as u8).collect();
        let words = pack_qweight(&q, &l)?;
        assert_eq!(words.len(), 2 * 32);
        assert!(words.iter().all(|&w| w == 0xE4E4_E4E4));
        assert_eq!(unpack_qweight(&words, &l)?, q);
        Ok(())
    }

    #[test]
    fn four_bit_words() -> Result<()> {
        // Column 0 holds k mod 16 at row k: words 0x76543210, 0xFEDCBA98, then again.
        let l = layout(32, 32, Bits::B4);
        let mut q = vec![0u8; 32 * 32];
        for k in 0..32 {
            q[k * 32] = (k % 16) as u8;
        }
        let words = pack_qweight(&q, &l)?;
        assert_eq!([words[0], words[32], words[64], words[96]], [0x7654_3210, 0xFEDC_BA98, 0x7654_3210, 0xFEDC_BA98]);
        assert_eq!(words[1], 0);
        assert_eq!(unpack_qweight(&words, &l)?, q);
        Ok(())
    }

    #[test]
    fn eight_bit_words() -> Result<()> {
        // Column 1 holds k + 1 at row k: first word 0x04030201, last word 0x201F1E1D.
        let l = layout(32, 32, Bits::B8);
        let mut q = vec![0u8; 32 * 32];
        for k in 0..32 {
            q[k * 32 + 1] = k as u8 + 1;
        }
        let words = pack_qweight(&q, &l)?;
        assert_eq!(words[1], 0x0403_0201);
        assert_eq!(words[7 * 32 + 1], 0x201F_1E1D);
        assert_eq!(words[0], 0);
        assert_eq!(unpack_qweight(&words, &l)?, q);
        Ok(())
    }

    #[test]
    fn qzeros_pack_along_output_dim() -> Result<()> {
        // 4-bit, 64 inputs in groups of 32 → 2 groups; 32 outputs → 4 words per group row.
        let l = layout(64, 32, Bits::B4);
        let mut z = vec![0u8; 2 * 32];
        for j in 0..32 {
            z[j] = (j % 16) as u8; // group 0: 0..15, 0..15
            z[32 + j] = 3; // group 1: all 3
        }
        let words = pack_qzeros(&z, &l)?;
        assert_eq!(
            words,
            [0x7654_3210, 0xFEDC_BA98, 0x7654_3210, 0xFEDC_BA98, 0x3333_3333, 0x3333_3333, 0x3333_3333, 0x3333_3333]
        );
        assert_eq!(unpack_qzeros(&words, &l)?, z);
        // 3-bit along the output dim: column 10 straddles words 0/1 of the group row.
        let l = layout(32, 32, Bits::B3);
        let mut z = vec![0u8; 32];
        z[10] = 5;
        z[21] = 7;
        assert_eq!(pack_qzeros(&z, &l)?, [0x4000_0000, 0x8000_0001, 0x0000_0003]);
        assert_eq!(qzeros_field(&[0x4000_0000, 0x8000_0001, 0x0000_0003], 32, Bits::B3, 0, 21), 7);
        Ok(())
    }

    #[test]
    fn packer_rejects_bad_input() {
        let l = layout(32, 32, Bits::B3);
        let mut q = vec![0u8; 32 * 32];
        q[5] = 8;
        assert!(matches!(pack_qweight(&q, &l), Err(Error::ValueOutOfRange { index: 5, value: 8, bits: 3 })));
        assert!(matches!(pack_qweight(&q[1..], &l), Err(Error::Length { .. })));
        assert!(matches!(unpack_qweight(&[0; 95], &l), Err(Error::Length { expected: 96, found: 95, .. })));
    }

    /// AutoGPTQ's `pack()` for 3 bits (MODEL_SPEC §4.1), transcribed line by line as an independent oracle.
    fn agptq_pack3(intweight: &[u32], n_in: usize, n_out: usize) -> Vec<u32> {
        let mut qweight = vec![0u32; n_in / 32 * 3 * n_out];
        for col in 0..n_out {
            let iw = |r: usize| intweight[r * n_out + col];
            let (mut i, mut row) = (0usize, 0usize);
            while row < n_in / 32 * 3 {
                let mut q = |r: usize, v: u32| qweight[r * n_out + col] |= v;
                for j in i..i + 10 {
                    q(row, iw(j) << (3 * (j - i)));
                }
                i += 10;
                q(row, iw(i) << 30);
                row += 1;
                q(row, (iw(i) >> 2) & 1);
                i += 1;
                for j in i..i + 10 {
                    q(row, iw(j) << (3 * (j - i) + 1));
                }
                i += 10;
                q(row, iw(i) << 31);
                row += 1;
                q(row, (iw(i) >> 1) & 0x3);
                i += 1;
                for j in i..i + 10 {
                    q(row, iw(j) << (3 * (j - i) + 2));
                }
                i += 10;
                row += 1;
            }
        }
        qweight
    }

    #[test]
    fn three_bit_matches_autogptq_loop() -> Result<()> {
        let (n_in, n_out) = (96, 64);
        // A fixed xorshift stream: deterministic, no rand dependency.
        let mut s = 0x9E37_79B9_u32;
        let q: Vec<u8> = (0..n_in * n_out)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s & 7) as u8
            })
            .collect();
        let wide: Vec<u32> = q.iter().map(|&v| u32::from(v)).collect();
        let l = layout(n_in, n_out, Bits::B3);
        assert_eq!(pack_qweight(&q, &l)?, agptq_pack3(&wide, n_in, n_out));
        assert_eq!(unpack_qweight(&agptq_pack3(&wide, n_in, n_out), &l)?, q);
        Ok(())
    }
}
