//! Dequant tests with hand-computed expectations (zero conventions, negative scales, g_idx, group_size -1)
//! and rejection of inconsistent tensors.

use half::f16;
use safetensors::Dtype;

use super::*;
use crate::pack::{pack_qweight, pack_qzeros};
use crate::{Bits, GroupSize};

/// Owned little-endian buffers and shapes of one linear, so tests can borrow `GptqParts` from them.
struct Fixture {
    layout: GptqLayout,
    qweight: (Vec<u8>, Vec<usize>),
    qzeros: (Vec<u8>, Vec<usize>),
    scales: (Vec<u8>, Vec<usize>),
    g_idx: Option<(Vec<u8>, Vec<usize>)>,
    scales_dtype: Dtype,
}

fn words_le(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

impl Fixture {
    /// `q`: `[in, out]` fields; `z`: `[groups, out]` stored zero fields; `s`: `[groups, out]` scales.
    fn new(layout: GptqLayout, q: &[u8], z: &[u8], s: &[f32], g_idx: Option<&[i32]>) -> Result<Self> {
        let scales = s.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect();
        Ok(Self {
            layout,
            qweight: (words_le(&pack_qweight(q, &layout)?), layout.qweight_shape().to_vec()),
            qzeros: (words_le(&pack_qzeros(z, &layout)?), layout.qzeros_shape().to_vec()),
            scales: (scales, layout.scales_shape().to_vec()),
            g_idx: g_idx.map(|g| (g.iter().flat_map(|v| v.to_le_bytes()).collect(), vec![g.len()])),
            scales_dtype: Dtype::F16,
        })
    }

    fn parts(&self) -> GptqParts<'_> {
        fn t<'a>(name: &'a str, dtype: Dtype, (data, shape): &'a (Vec<u8>, Vec<usize>)) -> RawTensor<'a> {
            RawTensor { name, dtype, shape: shape.as_slice(), data: data.as_slice() }
        }
        GptqParts {
            qweight: t("layer.qweight", Dtype::I32, &self.qweight),
            qzeros: t("layer.qzeros", Dtype::I32, &self.qzeros),
            scales: t("layer.scales", self.scales_dtype, &self.scales),
            g_idx: self.g_idx.as_ref().map(|g| t("layer.g_idx", Dtype::I32, g)),
        }
    }

    fn load(&self, zero: ZeroConvention) -> Result<GptqWeight> {
        GptqWeight::from_parts(self.layout, zero, &self.parts())
    }
}

fn layout(n_in: usize, n_out: usize, bits: Bits, group: GroupSize) -> GptqLayout {
    GptqLayout { in_features: n_in, out_features: n_out, bits, group_size: group }
}

/// 3-bit, 32×32, one group, every stored zero 3 (AutoRound sym), scale 0.5; q[10][0] = 5, q[21][0] = 7.
fn sym3() -> Result<Fixture> {
    let l = layout(32, 32, Bits::B3, GroupSize::Rows(32));
    let mut q = vec![4u8; 32 * 32];
    q[10 * 32] = 5;
    q[21 * 32] = 7;
    q[0] = 0;
    Fixture::new(l, &q, &[3; 32], &[0.5; 32], None)
}

#[test]
fn v1_adds_one_to_stored_zero() -> Result<()> {
    let w = sym3()?.load(ZeroConvention::V1)?;
    assert_eq!(w.zero(0, 0), 4);
    assert_eq!(w.weight(0, 10), 0.5); // 0.5 · (5 − 4)
    assert_eq!(w.weight(0, 21), 1.5); // 0.5 · (7 − 4)
    assert_eq!(w.weight(0, 0), -2.0); // 0.5 · (0 − 4)
    assert_eq!(w.weight(5, 7), 0.0);
    Ok(())
}

#[test]
fn v2_uses_stored_zero() -> Result<()> {
    let w = sym3()?.load(ZeroConvention::V2)?;
    assert_eq!(w.zero(0, 0), 3);
    assert_eq!(w.weight(0, 10), 1.0); // 0.5 · (5 − 3)
    assert_eq!(w.weight(0, 21), 2.0);
    assert_eq!(w.weight(5, 7), 0.5);
    Ok(())
}

#[test]
fn negative_scales_keep_their_sign() -> Result<()> {
    let l = layout(32, 32, Bits::B3, GroupSize::Rows(128));
    let mut s = vec![0.5f32; 32];
    s[1] = -0.25;
    let mut q = vec![4u8; 32 * 32];
    q[1] = 0; // row 0, column 1
    q[3 * 32 + 1] = 7;
    let w = Fixture::new(l, &q, &[3; 32], &s, None)?.load(ZeroConvention::V1)?;
    assert_eq!(w.weight(1, 0), 1.0); // −0.25 · (0 − 4)
    assert_eq!(w.weight(1, 3), -0.75); // −0.25 · (7 − 4)
    assert_eq!(w.scale(0, 1), -0.25);
    Ok(())
}

/// 64 inputs, groups of 32: group 0 has scale 1, group 1 scale 2; every field q = 5, stored zero 3.
fn two_groups(g_idx: Option<&[i32]>, group: GroupSize) -> Result<Fixture> {
    let l = layout(64, 32, Bits::B4, group);
    let n_groups = l.n_groups();
    let s: Vec<f32> = (0..n_groups * 32).map(|k| (k / 32 + 1) as f32).collect();
    Fixture::new(l, &[5; 64 * 32], &vec![3; n_groups * 32], &s, g_idx)
}

#[test]
fn absent_g_idx_means_row_over_group_size() -> Result<()> {
    let w = two_groups(None, GroupSize::Rows(32))?.load(ZeroConvention::V1)?;
    assert_eq!((w.group(31), w.group(32)), (0, 1));
    assert_eq!(w.weight(0, 31), 1.0); // 1 · (5 − 4)
    assert_eq!(w.weight(0, 32), 2.0); // 2 · (5 − 4)
    Ok(())
}

#[test]
fn permuted_g_idx_is_honoured() -> Result<()> {
    // desc_act style: rows alternate between groups instead of running in blocks of 32.
    let g: Vec<i32> = (0..64).map(|i| i % 2).collect();
    let w = two_groups(Some(&g), GroupSize::Rows(32))?.load(ZeroConvention::V1)?;
    assert_eq!(w.g_idx().map(|g| g[..4].to_vec()), Some(vec![0, 1, 0, 1]));
    assert_eq!(w.weight(0, 2), 1.0);
    assert_eq!(w.weight(0, 3), 2.0);
    assert_eq!(w.weight(9, 33), 2.0); // row 33 is group 1 both ways
    assert_eq!(w.weight(9, 32), 1.0); // row 32: group 0 by g_idx, group 1 by default
    let dense = w.dequantize();
    let expect: Vec<f32> = (0..32 * 64).map(|k| if (k % 64) % 2 == 0 { 1.0 } else { 2.0 }).collect();
    assert_eq!(dense, expect);
    Ok(())
}

#[test]
fn group_size_minus_one_is_one_group() -> Result<()> {
    let f = two_groups(None, GroupSize::All)?;
    assert_eq!(f.scales.1, [1, 32]);
    let w = f.load(ZeroConvention::V2)?;
    assert_eq!(w.group(63), 0);
    assert_eq!(w.weight(31, 63), 2.0); // 1 · (5 − 3)
    Ok(())
}

#[test]
fn zeros_vary_along_output_dim() -> Result<()> {
    // 8-bit: column j has stored zero j, so W[j, i] = 1 · (q − (j + 1)) under v1.
    let l = layout(32, 64, Bits::B8, GroupSize::All);
    let z: Vec<u8> = (0..64).collect();
    let w = Fixture::new(l, &[100; 32 * 64], &z, &[1.0; 64], None)?.load(ZeroConvention::V1)?;
    assert_eq!(w.weight(0, 0), 99.0);
    assert_eq!(w.weight(63, 5), 36.0);
    // 2-bit: stored zeros cycle 0,1,2,3 along columns.
    let l = layout(32, 32, Bits::B2, GroupSize::Rows(32));
    let z: Vec<u8> = (0..32).map(|j| (j % 4) as u8).collect();
    let w = Fixture::new(l, &[3; 32 * 32], &z, &[1.0; 32], None)?.load(ZeroConvention::V2)?;
    let row0: Vec<f32> = (0..4).map(|j| w.weight(j, 0)).collect();
    assert_eq!(row0, [3.0, 2.0, 1.0, 0.0]);
    Ok(())
}

#[test]
fn matvec_agrees_with_dequantize() -> Result<()> {
    let g: Vec<i32> = (0..64).map(|i| (63 - i) / 32).collect();
    let w = two_groups(Some(&g), GroupSize::Rows(32))?.load(ZeroConvention::V1)?;
    let x: Vec<f32> = (0..64).map(|i| i as f32 * 0.5 - 8.0).collect();
    let y = w.matvec(&x)?;
    let dense = w.dequantize();
    for (j, yj) in y.iter().enumerate() {
        let want: f32 = (0..64).map(|i| dense[j * 64 + i] * x[i]).sum();
        assert!((yj - want).abs() < 1e-4, "column {j}: {yj} vs {want}");
    }
    assert!(matches!(w.matvec(&x[1..]), Err(Error::InputLength { expected: 64, found: 63 })));
    Ok(())
}

#[test]
fn inconsistent_shapes_are_rejected_with_names() -> Result<()> {
    let f = sym3()?;
    let mut parts = f.parts();
    parts.qweight.shape = &[6, 32];
    let err = GptqWeight::from_parts(f.layout, ZeroConvention::V1, &parts).err();
    match &err {
        Some(Error::ShapeMismatch { tensor, expected, found }) => {
            assert_eq!(tensor, "layer.qweight");
            assert_eq!(expected, &[3, 32]);
            assert_eq!(found, &[6, 32]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    let msg = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("layer.qweight") && msg.contains("[3, 32]") && msg.contains("[6, 32]"), "{msg}");

    // The same tensors read as 4-bit: qweight and qzeros no longer fit.
    let four = GptqLayout { bits: Bits::B4, ..f.layout };
    let err = GptqWeight::from_parts(four, ZeroConvention::V1, &f.parts()).err();
    assert!(matches!(err, Some(Error::ShapeMismatch { ref tensor, .. }) if tensor == "layer.qweight"));

    let mut parts = f.parts();
    parts.scales.dtype = Dtype::BF16;
    let err = GptqWeight::from_parts(f.layout, ZeroConvention::V1, &parts).err();
    assert!(matches!(err, Some(Error::DtypeMismatch { ref tensor, .. }) if tensor == "layer.scales"));

    let mut parts = f.parts();
    parts.qzeros.shape = &[2, 3];
    let err = GptqWeight::from_parts(f.layout, ZeroConvention::V1, &parts).err();
    assert!(matches!(err, Some(Error::ShapeMismatch { ref tensor, .. }) if tensor == "layer.qzeros"));
    Ok(())
}

#[test]
fn g_idx_must_be_in_range_and_sized() -> Result<()> {
    let mut g: Vec<i32> = vec![0; 64];
    g[7] = 2; // only groups 0 and 1 exist
    let err = two_groups(Some(&g), GroupSize::Rows(32))?.load(ZeroConvention::V1).err();
    assert!(matches!(err, Some(Error::GroupIndexOutOfRange { row: 7, value: 2, groups: 2, .. })));
    g[7] = -1;
    let err = two_groups(Some(&g), GroupSize::Rows(32))?.load(ZeroConvention::V1).err();
    assert!(matches!(err, Some(Error::GroupIndexOutOfRange { row: 7, value: -1, .. })));
    let err = two_groups(Some(&[0; 63]), GroupSize::Rows(32))?.load(ZeroConvention::V1).err();
    assert!(matches!(err, Some(Error::ShapeMismatch { ref tensor, .. }) if tensor == "layer.g_idx"));
    Ok(())
}

#[test]
fn outputs_side_by_side_dequantize_to_the_stacked_matrices() -> Result<()> {
    // 3-bit (zeros straddle words), two groups, widths 32 and 64, distinct fields everywhere.
    let part = |n_out: usize, seed: usize| -> Result<GptqWeight> {
        let l = layout(64, n_out, Bits::B3, GroupSize::Rows(32));
        let q: Vec<u8> = (0..64 * n_out).map(|k| ((k * 7 + seed) % 8) as u8).collect();
        let z: Vec<u8> = (0..2 * n_out).map(|k| ((k * 3 + seed) % 8) as u8).collect();
        let s: Vec<f32> = (0..2 * n_out).map(|k| (k + seed) as f32 * 0.25 + 0.5).collect();
        Fixture::new(l, &q, &z, &s, None)?.load(ZeroConvention::V1)
    };
    let (a, b) = (part(32, 1)?, part(64, 5)?);
    let ab = GptqWeight::concat_outputs(&[&a, &b]).expect("same format");
    assert_eq!((ab.layout().in_features, ab.layout().out_features), (64, 96));
    let mut want = a.dequantize();
    want.extend(b.dequantize());
    assert_eq!(ab.dequantize(), want, "[out, in] rows of a, then of b");
    // Another group size (or bit width, zero convention, g_idx) cannot share the matrix.
    let other = Fixture::new(layout(64, 32, Bits::B3, GroupSize::Rows(64)), &[1; 64 * 32], &[3; 32], &[1.0; 32], None)?
        .load(ZeroConvention::V1)?;
    assert!(GptqWeight::concat_outputs(&[&a, &other]).is_none());
    assert!(GptqWeight::concat_outputs(&[]).is_none());
    Ok(())
}
