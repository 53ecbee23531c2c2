//! One GPTQ linear held in host memory, checked once on construction, with the CPU reference dequant
//! (MODEL_SPEC §4.3): `W[j, i] = scales[g(i), j] · (q[i, j] − zero[g(i), j])`, where `g(i)` is `g_idx[i]`
//! when the checkpoint has one and `i / group_size` otherwise. Math is f32; kernels must agree with it.

use half::f16;
use safetensors::Dtype;

use crate::pack::{qweight_field, qzeros_field};
use crate::{Error, GptqLayout, RawTensor, Result, ZeroConvention};

/// The tensors of one quantized linear `<prefix>.{qweight,qzeros,scales[,g_idx]}`.
#[derive(Clone, Copy, Debug)]
pub struct GptqParts<'a> {
    pub qweight: RawTensor<'a>,
    pub qzeros: RawTensor<'a>,
    pub scales: RawTensor<'a>,
    pub g_idx: Option<RawTensor<'a>>,
}

impl GptqParts<'_> {
    /// Checks dtypes and shapes against `layout` (MODEL_SPEC §3.2) without decoding any data.
    pub fn check(&self, layout: &GptqLayout) -> Result<()> {
        self.qweight.expect_dtype(Dtype::I32)?;
        self.qweight.expect_shape(&layout.qweight_shape())?;
        self.qzeros.expect_dtype(Dtype::I32)?;
        self.qzeros.expect_shape(&layout.qzeros_shape())?;
        self.scales.expect_dtype(Dtype::F16)?;
        self.scales.expect_shape(&layout.scales_shape())?;
        if let Some(g) = &self.g_idx {
            g.expect_dtype(Dtype::I32)?;
            g.expect_shape(&layout.g_idx_shape())?;
        }
        Ok(())
    }
}

/// A GPTQ linear `y = x·Wᵀ`, `W: [out, in]`, in its packed form.
#[derive(Clone, Debug)]
pub struct GptqWeight {
    layout: GptqLayout,
    zero: ZeroConvention,
    /// `[in·bits/32, out]`, row-major.
    qweight: Vec<u32>,
    /// `[groups, out·bits/32]`, row-major.
    qzeros: Vec<u32>,
    /// `[groups, out]`, row-major; sign kept (AutoRound writes negative scales, MODEL_SPEC §4.4).
    scales: Vec<f16>,
    /// `[in]`, each `< groups`; `None` when the checkpoint has no g_idx.
    g_idx: Option<Vec<u32>>,
}

impl GptqWeight {
    /// Checks and decodes the parts. Errors name the offending tensor.
    pub fn from_parts(layout: GptqLayout, zero: ZeroConvention, parts: &GptqParts<'_>) -> Result<Self> {
        parts.check(&layout)?;
        let g_idx = match &parts.g_idx {
            None => None,
            Some(t) => Some(decode_g_idx(t, layout.n_groups())?),
        };
        Ok(Self {
            layout,
            zero,
            qweight: parts.qweight.to_u32_words()?,
            qzeros: parts.qzeros.to_u32_words()?,
            scales: parts.scales.to_f16()?,
            g_idx,
        })
    }

    pub fn layout(&self) -> &GptqLayout {
        &self.layout
    }

    pub fn zero_convention(&self) -> ZeroConvention {
        self.zero
    }

    /// Packed words, `[in·bits/32, out]`, for repacking into kernel layouts.
    pub fn qweight(&self) -> &[u32] {
        &self.qweight
    }

    /// Packed words, `[groups, out·bits/32]`.
    pub fn qzeros(&self) -> &[u32] {
        &self.qzeros
    }

    /// `[groups, out]`.
    pub fn scales(&self) -> &[f16] {
        &self.scales
    }

    pub fn g_idx(&self) -> Option<&[u32]> {
        self.g_idx.as_deref()
    }

    /// The quantized field of input row `row`, output column `col` (`0..2^bits`).
    pub fn q(&self, row: usize, col: usize) -> u32 {
        qweight_field(&self.qweight, self.layout.out_features, self.layout.bits, row, col)
    }

    /// The zero point of `group`, `col` after the checkpoint's zero convention.
    pub fn zero(&self, group: usize, col: usize) -> i32 {
        let stored = qzeros_field(&self.qzeros, self.layout.out_features, self.layout.bits, group, col);
        self.zero.zero(stored)
    }

    pub fn scale(&self, group: usize, col: usize) -> f32 {
        self.scales[group * self.layout.out_features + col].to_f32()
    }

    /// The scale/zero group of input row `row`.
    pub fn group(&self, row: usize) -> usize {
        match &self.g_idx {
            Some(g) => g[row] as usize,
            None => self.layout.group_size.default_group(row),
        }
    }

    /// `W[col, row]` in nn.Linear orientation (`col` = output, `row` = input).
    pub fn weight(&self, col: usize, row: usize) -> f32 {
        let g = self.group(row);
        self.scale(g, col) * (self.q(row, col) as i32 - self.zero(g, col)) as f32
    }

    /// The matrices side by side along the outputs, `[in, Σ out]`: projections of one input run as one GEMV.
    /// `None` unless all share in_features, bit width, group size, zero convention and row order (g_idx). Every
    /// out_features is a multiple of 32 (GptqLayout), so each part's packed zeros are whole words.
    pub fn concat_outputs(parts: &[&GptqWeight]) -> Option<GptqWeight> {
        let first = *parts.first()?;
        let l0 = first.layout;
        let same = |w: &GptqWeight| {
            w.layout.in_features == l0.in_features
                && w.layout.bits == l0.bits
                && w.layout.group_size == l0.group_size
                && w.zero == first.zero
                && w.g_idx == first.g_idx
        };
        if !parts.iter().all(|w| same(w)) {
            return None;
        }
        let out = parts.iter().map(|w| w.layout.out_features).sum();
        let layout = GptqLayout::new(l0.in_features, out, l0.bits, l0.group_size).ok()?;
        // Row r of a [rows, width(w)] matrix of every part, in part order.
        fn side_by_side<T: Copy>(
            parts: &[&GptqWeight],
            rows: usize,
            of: impl Fn(&GptqWeight) -> (&[T], usize),
        ) -> Vec<T> {
            let mut v = Vec::new();
            for r in 0..rows {
                for w in parts {
                    let (data, width) = of(w);
                    v.extend_from_slice(&data[r * width..(r + 1) * width]);
                }
            }
            v
        }
        let zero_words = |w: &GptqWeight| w.layout.qzeros_shape()[1];
        Some(GptqWeight {
            layout,
            zero: first.zero,
            qweight: side_by_side(parts, layout.qweight_shape()[0], |w| (&w.qweight, w.layout.out_features)),
            qzeros: side_by_side(parts, layout.n_groups(), |w| (&w.qzeros, zero_words(w))),
            scales: side_by_side(parts, layout.n_groups(), |w| (&w.scales, w.layout.out_features)),
            g_idx: first.g_idx.clone(),
        })
    }

    /// The whole matrix, `[out, in]` row-major (nn.Linear layout).
    pub fn dequantize(&self) -> Vec<f32> {
        let (n_in, n_out) = (self.layout.in_features, self.layout.out_features);
        let mut w = vec![0f32; n_out * n_in];
        for i in 0..n_in {
            let g = self.group(i);
            for j in 0..n_out {
                let q = self.q(i, j) as i32;
                w[j * n_in + i] = self.scale(g, j) * (q - self.zero(g, j)) as f32;
            }
        }
        w
    }

    /// Reference `y = x·Wᵀ` for one input vector `x: [in]` → `y: [out]`.
    pub fn matvec(&self, x: &[f32]) -> Result<Vec<f32>> {
        let (n_in, n_out) = (self.layout.in_features, self.layout.out_features);
        if x.len() != n_in {
            return Err(Error::InputLength { expected: n_in, found: x.len() });
        }
        let mut y = vec![0f32; n_out];
        for (i, &xi) in x.iter().enumerate() {
            let g = self.group(i);
            for (j, yj) in y.iter_mut().enumerate() {
                *yj += xi * self.scale(g, j) * (self.q(i, j) as i32 - self.zero(g, j)) as f32;
            }
        }
        Ok(y)
    }
}

fn decode_g_idx(t: &RawTensor<'_>, groups: usize) -> Result<Vec<u32>> {
    let raw = t.to_i32()?;
    raw.iter()
        .enumerate()
        .map(|(row, &v)| match usize::try_from(v) {
            Ok(g) if g < groups => Ok(g as u32),
            _ => Err(Error::GroupIndexOutOfRange { tensor: t.name.to_string(), row, value: i64::from(v), groups }),
        })
        .collect()
}

#[cfg(test)]
#[path = "weight_tests.rs"]
mod tests;
