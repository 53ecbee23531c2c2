//! One CUDA device with pipemoe's kernels loaded: the libraries checked first (cudarc panics without them),
//! then the context, the device's own architecture, and every kernel compiled (or read from the cache) for it.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream};
use cudarc::nvrtc::Ptx;

use crate::error::{Error, Result, drv};
use crate::nvrtc;

/// Kernel symbols of each source file (`<op>_<dtype>`, STYLE.md §12).
const SYMBOLS: &[(&str, &[&str])] = &[
    ("attention.cu", &["mla_attention_f32", "indexer_scores_f32", "cache_store_f32"]),
    ("gptq_gemv.cu", GEMV_SYMBOLS),
    ("ops.cu", OPS_SYMBOLS),
    ("rms_norm.cu", &["rms_norm_bf16"]),
    ("stream_read.cu", &["stream_read_u32"]),
];

const OPS_SYMBOLS: &[&str] = &[
    "embed_f32",
    "rms_norm_f32",
    "layer_norm_f32",
    "add_f32",
    "scale_f32",
    "silu_mul_f32",
    "copy_rows_cols_f32",
    "scatter_add_scaled_f32",
    "cast_bf16_f32",
    "dense_gemv_f32",
    "rope_f32",
    "gptq_dequant_w2_f32",
    "gptq_dequant_w3_f32",
    "gptq_dequant_w4_f32",
    "gptq_dequant_w8_f32",
];

/// `gptq_gemv_w{bits}_b{batch}_{bf16,f32}` for bits 2/3/4/8, batch buckets 1/2/4/8/16 and the input type,
/// and the split reduction.
const GEMV_SYMBOLS: &[&str] = &[
    "gptq_gemv_w2_b1_bf16",
    "gptq_gemv_w2_b1_f32",
    "gptq_gemv_w2_b2_bf16",
    "gptq_gemv_w2_b2_f32",
    "gptq_gemv_w2_b4_bf16",
    "gptq_gemv_w2_b4_f32",
    "gptq_gemv_w2_b8_bf16",
    "gptq_gemv_w2_b8_f32",
    "gptq_gemv_w2_b16_bf16",
    "gptq_gemv_w2_b16_f32",
    "gptq_gemv_w3_b1_bf16",
    "gptq_gemv_w3_b1_f32",
    "gptq_gemv_w3_b2_bf16",
    "gptq_gemv_w3_b2_f32",
    "gptq_gemv_w3_b4_bf16",
    "gptq_gemv_w3_b4_f32",
    "gptq_gemv_w3_b8_bf16",
    "gptq_gemv_w3_b8_f32",
    "gptq_gemv_w3_b16_bf16",
    "gptq_gemv_w3_b16_f32",
    "gptq_gemv_w4_b1_bf16",
    "gptq_gemv_w4_b1_f32",
    "gptq_gemv_w4_b2_bf16",
    "gptq_gemv_w4_b2_f32",
    "gptq_gemv_w4_b4_bf16",
    "gptq_gemv_w4_b4_f32",
    "gptq_gemv_w4_b8_bf16",
    "gptq_gemv_w4_b8_f32",
    "gptq_gemv_w4_b16_bf16",
    "gptq_gemv_w4_b16_f32",
    "gptq_gemv_w8_b1_bf16",
    "gptq_gemv_w8_b1_f32",
    "gptq_gemv_w8_b2_bf16",
    "gptq_gemv_w8_b2_f32",
    "gptq_gemv_w8_b4_bf16",
    "gptq_gemv_w8_b4_f32",
    "gptq_gemv_w8_b8_bf16",
    "gptq_gemv_w8_b8_f32",
    "gptq_gemv_w8_b16_bf16",
    "gptq_gemv_w8_b16_f32",
    "gptq_reduce_f32",
];

pub fn driver_present() -> bool {
    // SAFETY: only dlopens libcuda and checks a symbol.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Why there is no usable GPU here, or `None` when there is one.
pub fn unavailable() -> Option<String> {
    if !driver_present() {
        return Some(Error::NoDriver.to_string());
    }
    if !nvrtc::nvrtc_present() {
        return Some(Error::NoNvrtc.to_string());
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => None,
        Ok(_) => Some("the CUDA driver reports no devices".into()),
        Err(e) => Some(format!("the CUDA driver failed to count devices: {e}")),
    }
}

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// `sm_86` on an RTX 3090, `sm_90` on an H200.
    pub arch: String,
    pub name: String,
    pub sm_count: u32,
    functions: HashMap<&'static str, CudaFunction>,
}

impl Gpu {
    pub fn open(ordinal: usize) -> Result<Gpu> {
        if !driver_present() {
            return Err(Error::NoDriver);
        }
        let count = CudaContext::device_count().map_err(drv("cuDeviceGetCount"))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).map_err(drv("cuCtxCreate"))?;
        let (major, minor) = ctx.compute_capability().map_err(drv("cuDeviceGetAttribute"))?;
        let arch = nvrtc::arch(major, minor);
        let name = ctx.name().map_err(drv("cuDeviceGetName"))?;
        let sm_count = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(drv("cuDeviceGetAttribute"))? as u32;
        let stream = ctx.new_stream().map_err(drv("cuStreamCreate"))?;
        let mut functions = HashMap::new();
        for (file, symbols) in SYMBOLS {
            let source = nvrtc::KERNELS.iter().find(|(f, _)| f == file).map(|(_, s)| *s).unwrap_or_default();
            let module = ctx
                .load_module(Ptx::from_binary(nvrtc::cubin(file, source, &arch)?))
                .map_err(drv("cuModuleLoadData"))?;
            for s in *symbols {
                functions.insert(*s, module.load_function(s).map_err(drv("cuModuleGetFunction"))?);
            }
        }
        Ok(Gpu { ctx, stream, arch, name, sm_count, functions })
    }

    pub fn function(&self, symbol: &str) -> Result<&CudaFunction> {
        self.functions
            .get(symbol)
            .ok_or_else(|| Error::Shape { what: "kernel", reason: format!("{symbol} is not loaded") })
    }

    pub fn describe(&self) -> String {
        format!("{} ({}, {} SMs)", self.name, self.arch, self.sm_count)
    }
}
