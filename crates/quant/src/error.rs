//! The crate's one error type. Every variant that concerns a tensor names it, so a message read in a log
//! points at the exact entry of the checkpoint.

/// Everything that can go wrong reading GPTQ/AutoRound data or its `quantization_config`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Only 2, 3, 4 and 8-bit GPTQ packing exists in the formats we read (16 means "not quantized").
    #[error("unsupported bit width {bits} (GPTQ packing supports 2, 3, 4 and 8)")]
    UnsupportedBits { bits: u32 },

    /// GPTQ packs whole blocks of 32 values, so both feature counts must be multiples of 32.
    #[error("in_features {in_features} and out_features {out_features} must both be multiples of 32 for GPTQ packing")]
    Unaligned { in_features: usize, out_features: usize },

    /// `group_size` must be a positive number of input rows, or -1 for one group over all rows.
    #[error("invalid group_size {group_size} (expected a positive number or -1)")]
    InvalidGroupSize { group_size: i64 },

    #[error("{tensor}: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch { tensor: String, expected: Vec<usize>, found: Vec<usize> },

    #[error("{tensor}: expected dtype {expected}, found {found}")]
    DtypeMismatch { tensor: String, expected: String, found: String },

    /// The byte length of a tensor's data does not match its dtype and shape.
    #[error("{tensor}: {found} bytes of data, expected {expected}")]
    DataLength { tensor: String, expected: usize, found: usize },

    /// A `g_idx` entry points at a group that has no scales/zeros row.
    #[error("{tensor}: g_idx[{row}] = {value} is outside 0..{groups}")]
    GroupIndexOutOfRange { tensor: String, row: usize, value: i64, groups: usize },

    /// A value handed to a packer does not fit in the bit width.
    #[error("value {value} at index {index} does not fit in {bits} bits")]
    ValueOutOfRange { index: usize, value: u32, bits: u32 },

    /// A buffer handed to a packer or unpacker has the wrong number of elements.
    #[error("{what}: expected {expected} elements, found {found}")]
    Length { what: &'static str, expected: usize, found: usize },

    /// An input vector's length does not match the layer's input features.
    #[error("input has {found} values, layer expects {expected}")]
    InputLength { expected: usize, found: usize },

    /// A `quantization_config` field is missing, has the wrong type, or holds a value we cannot honour.
    #[error("quantization_config.{field}: {reason}")]
    Config { field: String, reason: String },
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
