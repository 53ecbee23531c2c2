//! The latent KV cache on the device: per layer, per sequence, the normed latent, the roped k_pe and (V3.2) the
//! indexer key, each a contiguous buffer in the recipe's `kv_cache_dtype` that doubles when full, plus one scale
//! per position and component (fp8 e4m3 stores `x / scale` with `scale = max|x| / 448`; f32 and bf16 store 1).
//! (First version: the block-paged cache sized from the memory budget comes next; see docs/CUDA.md.)

use std::collections::HashMap;
use std::str::FromStr;

use cudarc::driver::CudaSlice;
use pipemoe_model::backend::{IndexerDims, MlaDims, SeqId};

use crate::error::{Error, Result, drv};
use crate::gpu::Gpu;

/// How cached values are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// Exact (the reference and the tests' default).
    #[default]
    F32,
    Bf16,
    /// e4m3 with a scale per position and component.
    Fp8,
}

impl KvDtype {
    /// Kernel code: 0 = f32, 1 = bf16, 2 = fp8.
    pub fn code(self) -> i32 {
        match self {
            KvDtype::F32 => 0,
            KvDtype::Bf16 => 1,
            KvDtype::Fp8 => 2,
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 => 2,
            KvDtype::Fp8 => 1,
        }
    }
}

impl FromStr for KvDtype {
    type Err = String;

    /// A recipe's `kv_cache_dtype`: `auto` is bf16 (the model's activation dtype).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(KvDtype::F32),
            "auto" | "bf16" | "bfloat16" => Ok(KvDtype::Bf16),
            "fp8" | "fp8_e4m3" => Ok(KvDtype::Fp8),
            other => Err(format!("{other:?} is not a kv_cache_dtype (expected auto, bf16, fp8 or f32)")),
        }
    }
}

pub struct SeqBuf {
    pub latent: CudaSlice<u8>,
    pub k_pe: CudaSlice<u8>,
    pub index_k: CudaSlice<u8>,
    /// `[cap, 3]`: latent, k_pe, indexer-key scale of each position.
    pub scales: CudaSlice<f32>,
    pub len: usize,
    pub cap: usize,
}

pub struct GpuLayerCache {
    pub lora: usize,
    pub rope: usize,
    pub index_dim: usize,
    pub dtype: KvDtype,
    pub seqs: HashMap<SeqId, SeqBuf>,
}

impl GpuLayerCache {
    pub fn new(d: &MlaDims, ix: Option<&IndexerDims>, dtype: KvDtype) -> Self {
        Self { lora: d.kv_lora, rope: d.qk_rope, index_dim: ix.map_or(0, |i| i.head_dim), dtype, seqs: HashMap::new() }
    }

    pub fn len(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).map_or(0, |s| s.len)
    }

    /// The buffer of `seq`, grown to hold at least `need` positions.
    pub fn reserve(&mut self, gpu: &Gpu, seq: SeqId, need: usize) -> Result<&mut SeqBuf> {
        let es = self.dtype.bytes();
        let (lora, rope, idim) = (self.lora * es, self.rope * es, self.index_dim.max(1) * es);
        let s = &gpu.stream;
        if let std::collections::hash_map::Entry::Vacant(slot) = self.seqs.entry(seq) {
            let cap = need.max(64);
            slot.insert(SeqBuf {
                latent: s.alloc_zeros(cap * lora).map_err(drv("alloc cache"))?,
                k_pe: s.alloc_zeros(cap * rope).map_err(drv("alloc cache"))?,
                index_k: s.alloc_zeros(cap * idim).map_err(drv("alloc cache"))?,
                scales: s.alloc_zeros(cap * 3).map_err(drv("alloc cache"))?,
                len: 0,
                cap,
            });
        }
        let buf =
            self.seqs.get_mut(&seq).ok_or(Error::Shape { what: "cache", reason: format!("sequence {seq} lost") })?;
        if need > buf.cap {
            let cap = need.max(buf.cap * 2);
            let len = buf.len;
            fn grow<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
                s: &std::sync::Arc<cudarc::driver::CudaStream>,
                old: &CudaSlice<T>,
                used: usize,
                size: usize,
            ) -> Result<CudaSlice<T>> {
                let mut new = s.alloc_zeros(size).map_err(drv("grow cache"))?;
                s.memcpy_dtod(&old.slice(..used), &mut new.slice_mut(..used)).map_err(drv("grow cache"))?;
                Ok(new)
            }
            let latent = grow(s, &buf.latent, len * lora, cap * lora)?;
            let k_pe = grow(s, &buf.k_pe, len * rope, cap * rope)?;
            let index_k = grow(s, &buf.index_k, len * idim, cap * idim)?;
            let scales = grow(s, &buf.scales, len * 3, cap * 3)?;
            *buf = SeqBuf { latent, k_pe, index_k, scales, len, cap };
        }
        Ok(buf)
    }
}
