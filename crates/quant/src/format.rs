//! The small value types that describe one GPTQ linear: bit width, group size, zero convention, and the tensor
//! shapes they imply (MODEL_SPEC §3.2).

use crate::{Error, Result};

/// A GPTQ bit width: 2, 3, 4 or 8. Constructing one is the only place the width is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bits(u8);

impl Bits {
    pub const B2: Bits = Bits(2);
    pub const B3: Bits = Bits(3);
    pub const B4: Bits = Bits(4);
    pub const B8: Bits = Bits(8);

    /// Checks that `bits` is a width GPTQ packing supports.
    pub fn new(bits: u32) -> Result<Self> {
        match bits {
            2 | 3 | 4 | 8 => Ok(Bits(bits as u8)),
            _ => Err(Error::UnsupportedBits { bits }),
        }
    }

    pub const fn get(self) -> u32 {
        self.0 as u32
    }

    /// Largest value a field can hold (`2^bits - 1`).
    pub const fn max_value(self) -> u32 {
        (1 << self.0) - 1
    }
}

impl std::fmt::Display for Bits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// How many consecutive input rows share one row of `scales`/`qzeros`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GroupSize {
    /// `group_size: N`: rows `i` with the same `i / N` share a group (unless `g_idx` says otherwise).
    Rows(usize),
    /// `group_size: -1`: one group spans every input row.
    All,
}

impl GroupSize {
    /// Parses the config's integer, where -1 means [`GroupSize::All`].
    pub fn from_config(group_size: i64) -> Result<Self> {
        match group_size {
            -1 => Ok(GroupSize::All),
            n if n > 0 => Ok(GroupSize::Rows(n as usize)),
            _ => Err(Error::InvalidGroupSize { group_size }),
        }
    }

    /// Number of scale/zero rows for `in_features` input rows: `ceil(in / group)`.
    pub fn n_groups(self, in_features: usize) -> usize {
        match self {
            GroupSize::Rows(n) => in_features.div_ceil(n),
            GroupSize::All => 1,
        }
    }

    /// Group of input row `i` when the checkpoint has no `g_idx` (MODEL_SPEC §3.2: `g_idx[i] = i // group_size`).
    pub fn default_group(self, row: usize) -> usize {
        match self {
            GroupSize::Rows(n) => row / n,
            GroupSize::All => 0,
        }
    }
}

impl std::fmt::Display for GroupSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GroupSize::Rows(n) => write!(f, "{n}"),
            GroupSize::All => f.write_str("-1"),
        }
    }
}

/// What the stored `qzeros` fields mean (MODEL_SPEC §4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ZeroConvention {
    /// GPTQ v1 (AutoGPTQ, `auto_round:auto_gptq`): stored = zero − 1, so zero = stored + 1.
    V1,
    /// GPTQ v2 (GPTQModel `gptq_v2`, AutoRound native `auto_round` packing): stored = zero.
    V2,
}

impl ZeroConvention {
    /// The zero point a stored field stands for.
    pub const fn zero(self, stored: u32) -> i32 {
        match self {
            ZeroConvention::V1 => stored as i32 + 1,
            ZeroConvention::V2 => stored as i32,
        }
    }
}

/// The geometry of one quantized linear `y = x·Wᵀ` with `W: [out_features, in_features]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GptqLayout {
    pub in_features: usize,
    pub out_features: usize,
    pub bits: Bits,
    pub group_size: GroupSize,
}

impl GptqLayout {
    /// Checks the 32-alignment GPTQ packing needs on both dims: qweight packs 32 input rows into `bits`
    /// words, qzeros packs 32 output columns into `bits` words (AutoGPTQ `pack()`; AutoRound skips layers
    /// that do not meet it and leaves them unquantized).
    pub fn new(in_features: usize, out_features: usize, bits: Bits, group_size: GroupSize) -> Result<Self> {
        if !in_features.is_multiple_of(32) || !out_features.is_multiple_of(32) || in_features == 0 || out_features == 0
        {
            return Err(Error::Unaligned { in_features, out_features });
        }
        Ok(Self { in_features, out_features, bits, group_size })
    }

    pub fn n_groups(&self) -> usize {
        self.group_size.n_groups(self.in_features)
    }

    /// `qweight`: int32 `[in·bits/32, out]`.
    pub fn qweight_shape(&self) -> [usize; 2] {
        [self.in_features / 32 * self.bits.get() as usize, self.out_features]
    }

    /// `qzeros`: int32 `[ceil(in/group), out·bits/32]`.
    pub fn qzeros_shape(&self) -> [usize; 2] {
        [self.n_groups(), self.out_features / 32 * self.bits.get() as usize]
    }

    /// `scales`: f16 `[ceil(in/group), out]`.
    pub fn scales_shape(&self) -> [usize; 2] {
        [self.n_groups(), self.out_features]
    }

    /// `g_idx` (optional): int32 `[in]`.
    pub fn g_idx_shape(&self) -> [usize; 1] {
        [self.in_features]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_accepts_only_gptq_widths() {
        for ok in [2, 3, 4, 8] {
            assert_eq!(Bits::new(ok).map(Bits::get).ok(), Some(ok));
        }
        for bad in [0, 1, 5, 6, 7, 16, 32] {
            assert!(matches!(Bits::new(bad), Err(Error::UnsupportedBits { bits }) if bits == bad));
        }
        assert_eq!(Bits::B3.max_value(), 7);
    }

    #[test]
    fn shapes_follow_the_spec() -> Result<()> {
        let l = GptqLayout::new(7168, 2048, Bits::B3, GroupSize::Rows(128))?;
        assert_eq!(l.qweight_shape(), [672, 2048]);
        assert_eq!(l.qzeros_shape(), [56, 192]);
        assert_eq!(l.scales_shape(), [56, 2048]);
        // A group size that does not divide `in` rounds the group count up.
        let l = GptqLayout::new(160, 32, Bits::B4, GroupSize::Rows(64))?;
        assert_eq!(l.scales_shape(), [3, 32]);
        let l = GptqLayout::new(160, 32, Bits::B2, GroupSize::All)?;
        assert_eq!(l.qzeros_shape(), [1, 2]);
        assert!(matches!(GptqLayout::new(48, 32, Bits::B4, GroupSize::All), Err(Error::Unaligned { .. })));
        assert!(matches!(GptqLayout::new(64, 48, Bits::B4, GroupSize::All), Err(Error::Unaligned { .. })));
        Ok(())
    }

    #[test]
    fn group_size_parsing() {
        assert_eq!(GroupSize::from_config(-1).ok(), Some(GroupSize::All));
        assert_eq!(GroupSize::from_config(64).ok(), Some(GroupSize::Rows(64)));
        assert!(GroupSize::from_config(0).is_err());
        assert!(GroupSize::from_config(-2).is_err());
        assert_eq!(GroupSize::Rows(32).default_group(63), 1);
        assert_eq!(GroupSize::All.default_group(1000), 0);
    }

    #[test]
    fn zero_conventions() {
        assert_eq!(ZeroConvention::V1.zero(3), 4);
        assert_eq!(ZeroConvention::V2.zero(3), 3);
    }
}
