//! A borrowed view of one checkpoint tensor, and the checked conversions from its little-endian bytes.
//! safetensors gives no alignment guarantee for a tensor's data (DEPENDENCIES.md §6), so values are decoded
//! with `from_le_bytes`, never cast in place.

use half::{bf16, f16};
use safetensors::Dtype;

use crate::{Error, Result};

/// One tensor as it sits in a checkpoint: its name (for errors), dtype, shape and raw bytes.
#[derive(Clone, Copy, Debug)]
pub struct RawTensor<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

impl<'a> RawTensor<'a> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn expect_dtype(&self, expected: Dtype) -> Result<()> {
        if self.dtype == expected {
            return Ok(());
        }
        Err(Error::DtypeMismatch {
            tensor: self.name.to_string(),
            expected: expected.to_string(),
            found: self.dtype.to_string(),
        })
    }

    pub fn expect_shape(&self, expected: &[usize]) -> Result<()> {
        if self.shape == expected {
            return Ok(());
        }
        Err(Error::ShapeMismatch {
            tensor: self.name.to_string(),
            expected: expected.to_vec(),
            found: self.shape.to_vec(),
        })
    }

    /// Checks the data length against dtype and shape, then yields `N`-byte chunks.
    fn chunks<const N: usize>(&self) -> Result<impl Iterator<Item = [u8; N]> + 'a> {
        let expected = self.numel() * N;
        if self.data.len() != expected {
            return Err(Error::DataLength { tensor: self.name.to_string(), expected, found: self.data.len() });
        }
        // `chunks_exact` yields only N-byte slices, so the conversion to [u8; N] cannot fail.
        Ok(self.data.chunks_exact(N).map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            a
        }))
    }

    /// Int32 words reinterpreted as u32 (GPTQ packs with logical shifts), for `qweight`/`qzeros`.
    pub fn to_u32_words(&self) -> Result<Vec<u32>> {
        if !matches!(self.dtype, Dtype::I32 | Dtype::U32) {
            self.expect_dtype(Dtype::I32)?;
        }
        Ok(self.chunks::<4>()?.map(u32::from_le_bytes).collect())
    }

    /// Int32 values, for `g_idx`.
    pub fn to_i32(&self) -> Result<Vec<i32>> {
        self.expect_dtype(Dtype::I32)?;
        Ok(self.chunks::<4>()?.map(i32::from_le_bytes).collect())
    }

    /// F16 values, for `scales`.
    pub fn to_f16(&self) -> Result<Vec<f16>> {
        self.expect_dtype(Dtype::F16)?;
        Ok(self.chunks::<2>()?.map(f16::from_le_bytes).collect())
    }

    /// Any float tensor widened to f32 (BF16, F16 or F32), for unquantized weights and norms.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        match self.dtype {
            Dtype::F32 => Ok(self.chunks::<4>()?.map(f32::from_le_bytes).collect()),
            Dtype::F16 => Ok(self.chunks::<2>()?.map(|b| f16::from_le_bytes(b).to_f32()).collect()),
            Dtype::BF16 => Ok(self.chunks::<2>()?.map(|b| bf16::from_le_bytes(b).to_f32()).collect()),
            found => Err(Error::DtypeMismatch {
                tensor: self.name.to_string(),
                expected: "BF16|F16|F32".to_string(),
                found: found.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_little_endian_and_checks_length() -> Result<()> {
        let data = [0x01, 0x00, 0x00, 0x80, 0xFF, 0xFF, 0xFF, 0xFF];
        let t = RawTensor { name: "x.qweight", dtype: Dtype::I32, shape: &[2], data: &data };
        assert_eq!(t.to_u32_words()?, [0x8000_0001, u32::MAX]);
        assert_eq!(t.to_i32()?, [i32::MIN + 1, -1]);
        let short = RawTensor { data: &data[..7], ..t };
        assert!(matches!(short.to_u32_words(), Err(Error::DataLength { expected: 8, found: 7, .. })));
        let wrong = RawTensor { dtype: Dtype::F16, shape: &[4], ..t };
        let err = wrong.to_u32_words().err();
        assert!(matches!(&err, Some(Error::DtypeMismatch { tensor, .. }) if tensor == "x.qweight"));
        Ok(())
    }

    #[test]
    fn widens_floats() -> Result<()> {
        let bf = bf16::from_f32(-1.5).to_le_bytes();
        let t = RawTensor { name: "n.weight", dtype: Dtype::BF16, shape: &[1], data: &bf };
        assert_eq!(t.to_f32()?, [-1.5]);
        let h = f16::from_f32(0.25).to_le_bytes();
        let t = RawTensor { dtype: Dtype::F16, data: &h, ..t };
        assert_eq!(t.to_f32()?, [0.25]);
        assert_eq!(t.to_f16()?, [f16::from_f32(0.25)]);
        let t = RawTensor { dtype: Dtype::I8, ..t };
        assert!(t.to_f32().is_err());
        Ok(())
    }
}
