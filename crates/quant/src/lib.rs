//! GPTQ / AutoRound quantized weights (MODEL_SPEC §3.2, §4).
//!
//! - `format`: bit width, group size, zero convention (v1 stores zero − 1, v2 stores zero) and the tensor shapes
//!   of one quantized linear.
//! - `config`: the checkpoint's `quantization_config`, resolved per module (`extra_config`, `dynamic`).
//! - `pack`: the GPTQ bit layout for 2/3/4/8 bits (3-bit values pack 32 to a little-endian 96-bit block).
//! - `tensor`: a borrowed checkpoint tensor and checked decoding of its bytes.
//! - `weight`: one quantized linear in host memory with the CPU reference dequant and matvec.

mod config;
mod error;
mod format;
pub mod pack;
mod tensor;
mod weight;

pub use config::{GptqParams, ModuleQuant, QuantConfig, QuantMethod};
pub use error::{Error, Result};
pub use format::{Bits, GptqLayout, GroupSize, ZeroConvention};
pub use safetensors::Dtype;
pub use tensor::RawTensor;
pub use weight::{GptqParts, GptqWeight};
